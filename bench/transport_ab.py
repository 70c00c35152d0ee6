"""A/B of the upstream transport alone: the same router, fast vs aiohttp transport.

    .venv/bin/python bench/transport_ab.py [--rounds 3] [--dur 6]

Starts the static nginx upstreams of ``bench/peers/peers.sh`` once, then,
alternating, a router with ``--transport fast`` and one with ``--transport
aiohttp`` (everything else identical) and loads each with wrk (32 connections,
then 1). Reports per variant the median requests/s, p50, c1_p50 and the
router's own CPU time per request (utime + stime from /proc, so time spent
preempted by wrk or nginx does not count): on a shared, noisy machine the CPU
per request is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def wrk(port: int, conns: int, dur: int) -> tuple[float, float, int]:
    out = subprocess.run(
        [
            *("wrk", "-t1", f"-c{conns}", f"-d{dur}s", "--latency"),
            *("-s", str(PEERS / "sessions.lua"), f"http://127.0.0.1:{port}"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50 is not None
    scale = {"us": 1.0, "ms": 1000.0, "s": 1e6}[p50.group(2)]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, float(p50.group(1)) * scale, total


def run_variant(transport: str, port: int, dur: int) -> dict[str, float]:
    proc = subprocess.Popen(
        [
            *(sys.executable, str(HERE / "serve_router.py"), "--port", str(port)),
            *("--sessions", "100000", "--transport", transport),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith("ROUTER READY"):
            if proc.poll() is not None:
                raise SystemExit("router did not start")
        c0 = cpu_seconds(proc.pid)
        rps, p50, n = wrk(port, 32, dur)
        c1 = cpu_seconds(proc.pid)
        _, c1_p50, n1 = wrk(port, 1, 3)
        c2 = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return {
        "rps": rps,
        "p50": p50,
        "cpu_us": (c1 - c0) / n * 1e6,
        "c1_p50": c1_p50,
        "c1_cpu_us": (c2 - c1) / n1 * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dur", type=int, default=6)
    ap.add_argument("--port", type=int, default=18400)
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as run:
        nginx = subprocess.Popen(
            ["nginx", "-p", run, "-e", "stderr", "-c", str(PEERS / "upstream-nginx.conf")],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
        results: dict[str, list[dict[str, float]]] = {"fast": [], "aiohttp": []}
        try:
            for r in range(ns.rounds):
                for variant in ("fast", "aiohttp") if r % 2 == 0 else ("aiohttp", "fast"):
                    res = run_variant(variant, ns.port, ns.dur)
                    results[variant].append(res)
                    print(
                        f"round {r + 1} {variant:8} rps={res['rps']:.0f} p50={res['p50']:.0f}us "
                        f"cpu/req={res['cpu_us']:.0f}us c1_p50={res['c1_p50']:.0f}us "
                        f"c1 cpu/req={res['c1_cpu_us']:.0f}us",
                        flush=True,
                    )
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
    print("\nmedians:")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    for v, m in med.items():
        print(
            f"  {v:8} rps={m['rps']:.0f} p50={m['p50']:.0f}us cpu/req={m['cpu_us']:.0f}us "
            f"c1_p50={m['c1_p50']:.0f}us c1 cpu/req={m['c1_cpu_us']:.0f}us"
        )
    f, a = med["fast"], med["aiohttp"]
    print(
        f"  fast/aiohttp: throughput {f['rps'] / a['rps']:.2f}x, "
        f"router CPU per request {f['cpu_us'] / a['cpu_us']:.2f}x, "
        f"c1_p50 {f['c1_p50'] - a['c1_p50']:+.0f}us"
    )


if __name__ == "__main__":
    main()
