"""One side-by-side benchmark run: the router next to direct, nginx, HAProxy and
a minimal aiohttp proxy, all measured by ``bench/peers/peers.sh`` in ONE run.

    .venv/bin/python bench/run.py                 # or: bench/run.sh
    .venv/bin/python bench/run.py --dur 8 --write bench/RESULTS.md

Starts the router (``bench/serve_router.py``: memory store, 100,000 mapped
sessions, four static nginx upstreams on 127.0.0.1:18001-18004), runs
peers.sh with it as an extra target, and prints requests/s, p50, p99 and
c1_p50 per target, the router's ratios to HAProxy and to the minimal aiohttp
proxy, and the latency the router adds at one connection (router c1_p50 minus
direct c1_p50). Needs nginx, haproxy and wrk (Debian packages; installed with
apt-get when missing). Compare ratios, not absolute figures: every process
shares the same cores.

Unless ``--no-floor``, the same run also measures ``aiohttp-floor``
(``bench/floor_server.py``: aiohttp's low-level server on uvloop answering a
constant body, no routing, no upstream), the floor of any router built on
aiohttp's server; router minus floor is what routing and the upstream hop cost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_PEERS = HERE / "peers" / "peers.sh"
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}
_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


@dataclass
class Row:
    name: str
    rps: float
    p50: float  # microseconds
    p99: float
    c1_p50: float
    errors: str = ""


def to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse(lines: list[str]) -> list[Row]:
    rows = []
    for line in lines:
        if not line.startswith("== "):
            continue
        name = line.split()[1]
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        errors = ""
        for marker in ("Non-2xx", "Socket errors"):
            if marker in line:
                errors += line[line.index(marker) :].strip() + " "
        rows.append(
            Row(
                name,
                float(fields.get("rps", "nan")),
                to_us(fields.get("p50", "")),
                to_us(fields.get("p99", "")),
                to_us(fields.get("c1_p50", "")),
                errors.strip(),
            )
        )
    return rows


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    print(f"installing {', '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def start_router(port: int, sessions: int, uvloop: bool, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(HERE / "serve_router.py"), "--port", str(port)]
    cmd += ["--sessions", str(sessions), *extra]
    if not uvloop:
        cmd.append("--no-uvloop")
    return start(cmd, "ROUTER READY")


def start(cmd: list[str], ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(ready):
            return proc
    proc.kill()
    raise SystemExit(f"{cmd[1]} did not start")


def machine_note() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def fmt_us(v: float) -> str:
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def report(rows: list[Row]) -> str:
    by = {r.name: r for r in rows}
    out = ["| target | requests/s | p50 | p99 | c1_p50 | errors |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(
            f"| {r.name} | {r.rps:,.0f} | {fmt_us(r.p50)} | {fmt_us(r.p99)} | "
            f"{fmt_us(r.c1_p50)} | {r.errors} |"
        )
    router = by.get("router")
    if router is not None:
        out.append("")
        for peer in ("haproxy", "minimal-aiohttp", "nginx", "direct"):
            p = by.get(peer)
            if p is not None and p.rps:
                out.append(f"- router / {peer} throughput: **{router.rps / p.rps:.2f}x**")
        floor = by.get("aiohttp-floor")
        if floor is not None and floor.rps:
            out.append(
                f"- router / aiohttp-floor throughput: **{router.rps / floor.rps:.2f}x**; "
                f"router c1_p50 - aiohttp-floor c1_p50: "
                f"**{(router.c1_p50 - floor.c1_p50) / 1000:.3f} ms**"
            )
        bare = by.get("router-nometrics")
        if bare is not None and bare.rps:
            out.append(
                f"- metrics cost: router / router-nometrics throughput: "
                f"**{router.rps / bare.rps:.2f}x** ({(1 - router.rps / bare.rps) * 100:.1f} % "
                "of throughput)"
            )
        direct = by.get("direct")
        if direct is not None:
            added = router.c1_p50 - direct.c1_p50
            out.append(
                f"- router c1_p50 - direct c1_p50 (latency added at one connection): "
                f"**{added / 1000:.3f} ms** ({fmt_us(router.c1_p50)} - {fmt_us(direct.c1_p50)})"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--dur", type=int, default=8, help="seconds of each loaded wrk run")
    ap.add_argument("--peers", type=Path, default=DEFAULT_PEERS)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--no-floor", action="store_true", help="skip the aiohttp-floor target")
    ap.add_argument(
        "--metrics-cost",
        action="store_true",
        help="also run a router with per-request metrics off (target router-nometrics)",
    )
    ap.add_argument("--floor-port", type=int, default=18450)
    ap.add_argument("--write", type=Path, help="also write the figures (markdown) here")
    ns = ap.parse_args()

    ensure_tools()
    floor = None
    targets = [f"router {ns.port}"]
    if not ns.no_floor:
        floor = start(
            [sys.executable, str(HERE / "floor_server.py"), str(ns.floor_port)], "FLOOR READY"
        )
        targets.append(f"aiohttp-floor {ns.floor_port}")
    router = start_router(ns.port, ns.sessions, not ns.no_uvloop)
    nometrics = None
    if ns.metrics_cost:
        nometrics = start_router(ns.port + 1, ns.sessions, not ns.no_uvloop, "--no-metrics")
        targets.append(f"router-nometrics {ns.port + 1}")
    try:
        env = {**os.environ, "DUR": str(ns.dur), "PY": sys.executable}
        run = subprocess.run(
            ["bash", str(ns.peers), *targets],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        for proc in (router, floor, nometrics):
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("== ")]
    print("\n".join(lines))
    rows = parse(lines)
    if not rows:
        print(run.stdout, run.stderr, file=sys.stderr)
        raise SystemExit("peers.sh printed no results")
    text = report(rows)
    print()
    print(text)
    if ns.write is not None:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        block = (
            f"Run of {when} on {machine_note()}; DUR={ns.dur}s, "
            f"{ns.sessions:,} mapped sessions.\n\n"
            "Raw peers.sh lines:\n\n```\n" + "\n".join(lines) + "\n```\n\n" + text + "\n"
        )
        ns.write.write_text(block)
        print(f"\nwritten to {ns.write}")


if __name__ == "__main__":
    main()
