"""Webhook relay benchmark: durable ingest rate and ingest-to-delivery latency, per backend.

    .venv/bin/python bench/webhooks/run.py                       # both backends
    .venv/bin/python bench/webhooks/run.py --backends redis --duration 10
    .venv/bin/python bench/webhooks/run.py --write /tmp/webhooks-bench.md

For each backend (``sqlite``: the embedded file, ``synchronous=FULL``;
``redis``: a private ``redis-server`` with ``appendonly yes``,
``appendfsync everysec``):

1. **Ingest rate.** The relay runs alone in one process (uvloop), delivery
   off, behind its HTTP endpoint; ``wrk`` POSTs signed Blazz events
   (``X-HMAC-Signature`` verified on every request) over ``--connections``
   connections for ``--duration`` seconds. Every 200 means "stored"; the
   stored count is checked against the 200s afterwards.
2. **Latency.** The relay process delivers to a target (an aiohttp server in
   this process) while this process sends events at ``--rate`` per second
   over 16 sessions; latency = target receipt time - client send time, so
   it includes the ingest round trip, the commit and the delivery.

Needs ``wrk`` and (for redis) ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

KEY = "bench-instance-key"
APP_KEY = "bench-app-key"
ADMIN = "bench-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the relay process ---------------------------------------------------------


async def serve(ns: argparse.Namespace) -> None:
    import logging

    from aiohttp import web

    from router.config import (
        InstanceConfig,
        RouterConfig,
        StoreConfig,
        WebhookConfig,
        WebhookDelivery,
        WebhookIngest,
        WebhookTarget,
    )
    from router.webhooks.relay import WebhookRelay

    logging.basicConfig(level=logging.WARNING)
    cfg = RouterConfig(
        instances=(InstanceConfig("wa-1", "http://127.0.0.1:9"),),
        store=StoreConfig(url=ns.redis or "memory", key_prefix=ns.prefix),
        admin_key=ADMIN,
        webhooks=WebhookConfig(
            targets=(WebhookTarget(url=ns.target, name="app", hmac_key=APP_KEY),),
            ingest=WebhookIngest(blazz_hmac_key=KEY),
            delivery=WebhookDelivery(concurrency=64, timeout=5.0),
            sqlite_path=ns.sqlite,
            sqlite_synchronous=ns.synchronous,
            consumer_name="bench",
        ),
    )
    relay = WebhookRelay(cfg, deliver=ns.deliver)
    await relay.start()

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        return await relay.handle(request)

    runner = web.ServerRunner(web.Server(dispatch), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"READY {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await relay.stop()


class RelayProcess:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"relay did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- helpers -------------------------------------------------------------------------


def signed(body: bytes) -> dict[str, str]:
    ts = str(int(time.time()))
    return {
        "Content-Type": "application/json",
        "X-Timestamp": ts,
        "X-HMAC-Signature": hmac.new(KEY.encode(), ts.encode() + body, hashlib.sha256).hexdigest(),
    }


def event_body(session: str, n: int) -> bytes:
    return json.dumps(
        {
            "event": "message_received",
            "data": {
                "workspace_id": 1,
                "session_id": session,
                "n": n,
                "message": {"from": "6281234567890@c.us", "body": "hello " * 20},
            },
        }
    ).encode()


async def stats(url: str) -> dict[str, Any]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/admin/webhooks/stats", headers={"X-Admin-Key": ADMIN}) as resp,
    ):
        data: dict[str, Any] = await resp.json()
        return data


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Redis:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not on PATH")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# -- phase 1: ingest rate ---------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[{body}]]
{headers}
"""


def ingest_rate(relay: RelayProcess, ns: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not on PATH (apt-get install wrk)")
    body = event_body("webjs_1_1700000000_abcdefgh", 1)
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in signed(body).items())
    script = workdir / "ingest.lua"
    script.write_text(WRK_SCRIPT.format(body=body.decode(), headers=headers))
    before = asyncio.run(stats(relay.url))["pending"]
    out = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{ns.connections}",
            f"-d{ns.duration}s",
            "--latency",
            "-s",
            str(script),
            f"{relay.url}/webhooks/blazz/wa-1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    lat = dict(re.findall(r"\s+(50|99)%\s+([\d.]+\w+)", out))
    stored = asyncio.run(stats(relay.url))["pending"] - before
    return {
        "rps": rps,
        "requests": total,
        "errors": errors,
        "stored": stored,
        "p50": lat.get("50"),
        "p99": lat.get("99"),
    }


# -- phase 2: latency -------------------------------------------------------------------


async def latency(relay_args: list[str], ns: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    got: dict[int, float] = {}
    done = asyncio.Event()
    warm = ns.warmup
    total = warm + ns.latency_events

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        n = json.loads(body)["data"]["n"]
        got.setdefault(n, now)
        if len(got) >= total:
            done.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    relay = await asyncio.to_thread(
        RelayProcess, [*relay_args, "--target", f"http://127.0.0.1:{port}/hook", "--deliver"]
    )
    sent: dict[int, float] = {}
    acks: dict[int, float] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

            async def one(n: int) -> None:
                body = event_body(f"webjs_1_1700000000_s{n % 16:07d}", n)
                headers = signed(body)
                t0 = time.time()
                sent[n] = t0
                async with http.post(
                    f"{relay.url}/webhooks/blazz/wa-1", data=body, headers=headers
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                acks[n] = time.time() - t0

            interval = 1.0 / ns.rate
            start = time.monotonic()
            tasks = []
            for n in range(total):
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)
            await asyncio.wait_for(done.wait(), 60)
    finally:
        await asyncio.to_thread(relay.stop)
        await runner.cleanup()
    # The first ``warm`` events (connections opening, scripts loading) are not counted.
    lat = [got[n] - sent[n] for n in range(warm, total)]
    ack_times = [acks[n] for n in range(warm, total)]
    if os.environ.get("WH_BENCH_TRACE"):
        step = max(1, len(lat) // 20)
        for k in range(0, len(lat), step):
            chunk = lat[k : k + step]
            print(
                f"  events {k}..: p50 {statistics.median(chunk) * 1000:.1f} ms"
                f" max {max(chunk) * 1000:.1f} ms",
                file=sys.stderr,
            )
    return {
        "events": total - warm,
        "rate": ns.rate,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "max_ms": max(lat) * 1000,
        "ack_p50_ms": statistics.median(ack_times) * 1000,
        "ack_p99_ms": pct(ack_times, 0.99) * 1000,
    }


# -- main ---------------------------------------------------------------------------------


def run_backend(name: str, ns: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    redis: Redis | None = None
    base: list[str] = ["--synchronous", ns.synchronous]
    if name == "redis":
        redis = Redis(workdir)
        base += ["--redis", redis.url]
    try:
        args = [*base, "--sqlite", str(workdir / f"{name}-ingest.db"), "--prefix", "bench1:"]
        relay = RelayProcess([*args, "--target", "http://127.0.0.1:9/hook"])
        try:
            ingest = ingest_rate(relay, ns, workdir)
        finally:
            relay.stop()
        args = [*base, "--sqlite", str(workdir / f"{name}-latency.db"), "--prefix", "bench2:"]
        lat = asyncio.run(latency(args, ns))
    finally:
        if redis is not None:
            redis.stop()
    return {"ingest": ingest, "latency": lat}


def report(results: dict[str, dict[str, Any]], ns: argparse.Namespace) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s),"
        f" Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"Ingest: wrk -t1 -c{ns.connections} -d{ns.duration}s, signed Blazz events"
        f" (~{len(event_body('webjs_1_1700000000_abcdefgh', 1))} B), delivery off.",
        f"Latency: {ns.latency_events} events at {ns.rate:g}/s over 16 sessions, target up"
        f" (after {ns.warmup} warm-up events, not counted).",
        f"SQLite synchronous={ns.synchronous.upper()}; redis appendonly yes, appendfsync everysec.",
        "",
        "| backend | ingest events/s | ingest p50 / p99 | 200s = stored"
        " | delivery p50 | delivery p99 | max | 200 p50 / p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        i, lat = r["ingest"], r["latency"]
        ok = "yes" if i["stored"] >= i["requests"] - i["errors"] and not i["errors"] else "NO"
        lines.append(
            f"| {name} | {i['rps']:,.0f} | {i['p50']} / {i['p99']} | {ok} ({i['stored']:,})"
            f" | {lat['p50_ms']:.1f} ms | {lat['p99_ms']:.1f} ms | {lat['max_ms']:.1f} ms"
            f" | {lat['ack_p50_ms']:.1f} / {lat['ack_p99_ms']:.1f} ms |"
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sp = argparse.ArgumentParser()
        sp.add_argument("serve")
        sp.add_argument("--redis")
        sp.add_argument("--prefix", default="bench:")
        sp.add_argument("--sqlite", required=True)
        sp.add_argument("--synchronous", default="full")
        sp.add_argument("--target", required=True)
        sp.add_argument("--deliver", action="store_true")
        sns = sp.parse_args()
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        asyncio.run(serve(sns))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backends", default="sqlite,redis")
    ap.add_argument("--duration", type=int, default=5, help="seconds of the wrk ingest run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rate", type=float, default=300.0, help="events/s in the latency run")
    ap.add_argument("--latency-events", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300, help="latency run: first events not counted")
    ap.add_argument("--synchronous", default="full", choices=("full", "normal"))
    ap.add_argument("--write", help="also write the table to this markdown file")
    ns = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wh-bench-") as tmp:
        for name in ns.backends.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            results[name] = run_backend(name.strip(), ns, Path(tmp))
            print(json.dumps(results[name], indent=2), file=sys.stderr, flush=True)
    table = report(results, ns)
    print(table)
    if ns.write:
        Path(ns.write).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
