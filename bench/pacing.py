"""Send pacing benchmark (issue 13.1): what pacing costs a send under its
limit, and a burst of one session's sends over two replicas.

    .venv/bin/python bench/pacing.py                  # both parts, print the figures
    .venv/bin/python bench/pacing.py --minute         # also a burst held by per_minute (~3.5 min)

Everything runs on this machine: two WAHA simulator processes
(``tests/support/simulator.SimFleet``, one shared send record), a private
``redis-server`` and router processes (``python -m router run``, uvloop);
the clients run in this process.

1. **Cost under the limit.** Four router configurations side by side in one
   run, each its own process: the memory store and a redis store, each with
   pacing off and on. "On" is a rule for every session whose limits are never
   reached (so nothing waits) but whose whole path runs: the send is
   recognised, its recipient read and hashed, a slot reserved (on redis: the
   Lua script, one round trip) and the 0 s wait skipped. Per configuration:
   sequential sends (one client: latency p50 / p99) and concurrent sends
   (``--concurrency`` clients: throughput), rounds interleaved so that every
   configuration sees the same machine; the figures are medians over rounds,
   and "on / off" ratios are given per store.
2. **A burst over two replicas.** Two router processes share the redis
   store. A burst of ``--burst`` sends of one session is sent to them
   alternately, each one issued once the previous has its slot (the admin
   API's count says so), so the order of the burst is defined. The rule:
   ``min_gap`` / ``jitter`` (``--gap``, ``--jitter``). From the simulators'
   record: every send went out once (none lost, none duplicated), in the
   order sent, and the gaps between consecutive sends (never below min_gap)
   and the rate. ``--minute`` adds a burst held by ``per_minute: 30``: at most
   30 sends in any 60 s window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.simulator import SimFleet, read_records  # noqa: E402
from tests.support.webhook_target import free_port  # noqa: E402

ROUTER_KEY = "bench-router-key"
INSTANCE_KEY = "bench-instance-key"
ADMIN_KEY = "bench-admin-key"
COST_SESSIONS = [f"cost_{i}" for i in range(20)]
CONTACTS = [f"1555{i:07d}@c.us" for i in range(100)]


@dataclass
class RouterProc:
    name: str
    config: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "router", "--log-level", "warning", "run"]
        self.proc = subprocess.Popen([*cmd, "-c", str(self.config), "--watch-interval", "0"])

    async def start(self) -> None:
        self.spawn()
        assert self.proc is not None
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                if self.proc.poll() is not None:
                    raise RuntimeError(f"router {self.name} exited")
                await asyncio.sleep(0.05)
        raise RuntimeError(f"router {self.name} not ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def router_yaml(fleet: SimFleet, port: int, store: str, prefix: str, pacing: str) -> str:
    instances = "".join(
        f"  - {{name: {p.name}, url: {p.url}, api_key: {INSTANCE_KEY}, max_sessions: 1000}}\n"
        for p in fleet
    )
    return (
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"store: {{url: {store}, key_prefix: '{prefix}'}}\n"
        f"api_keys: [{ROUTER_KEY}]\n"
        f"admin_key: {ADMIN_KEY}\n"
        "discovery: {interval: 0}\n"
        f"instances:\n{instances}"
        f"{pacing}"
    )


def pacing_yaml(enabled: bool, gap: float, jitter: float, minute: bool) -> str:
    burst_minute = "per_minute: 30, " if minute else "per_minute: 100000, "
    return (
        "pacing:\n"
        f"  enabled: {str(enabled).lower()}\n"
        "  max_wait: 300\n"
        "  rules:\n"
        # Never reached, so nothing waits; the whole path runs.
        "    - {sessions: 'cost_*', per_minute: 1000000, per_hour: 10000000,"
        " recipients_per_day: 1000000}\n"
        # per_minute far above the burst: counts its slots (admin API) for the client.
        f"    - {{sessions: 'burst_*', per_minute: 100000, min_gap: {gap}, jitter: {jitter}}}\n"
        f"    - {{sessions: 'minute_*', {burst_minute}min_gap: {gap}, jitter: {jitter}}}\n"
    )


async def send(
    http: aiohttp.ClientSession, url: str, session: str, text: str, chat: str
) -> tuple[int, float]:
    started = time.perf_counter()
    body = {"session": session, "chatId": chat, "text": text}
    async with http.post(url + "/api/sendText", json=body) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - started


# -- 1. cost under the limit -----------------------------------------------------------------


@dataclass
class Figures:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, sequential: int, concurrent: int, workers: int) -> tuple[float, ...]:
    headers = {"X-Api-Key": ROUTER_KEY}
    conn = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(headers=headers, connector=conn) as http:
        for i in range(200):  # warm up: pools, caches
            await send(http, url, COST_SESSIONS[i % 20], f"w{i}", CONTACTS[i % 100])
        latencies = []
        for i in range(sequential):
            status, took = await send(http, url, COST_SESSIONS[i % 20], f"s{i}", CONTACTS[i % 100])
            assert status == 201, status
            latencies.append(took)
        counter = iter(range(concurrent))

        async def worker() -> None:
            for i in counter:
                status, _ = await send(http, url, COST_SESSIONS[i % 20], f"c{i}", CONTACTS[i % 100])
                assert status == 201, status

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        rate = concurrent / (time.perf_counter() - started)
    return pct(latencies, 0.5), pct(latencies, 0.99), rate


async def cost(
    fleet: SimFleet, redis_url: str, workdir: Path, args: argparse.Namespace
) -> dict[str, Figures]:
    variants: dict[str, RouterProc] = {}
    for store in ("memory", "redis"):
        for on in (False, True):
            name = f"{store}, pacing {'on' if on else 'off'}"
            port = free_port()
            url = "memory" if store == "memory" else redis_url
            path = workdir / f"cost-{store}-{on}.yaml"
            text = pacing_yaml(on, args.gap, args.jitter, minute=False)
            path.write_text(router_yaml(fleet, port, url, f"cost-{store}-{on}:", text))
            variants[name] = RouterProc(name, path, port)
    figures = {name: Figures() for name in variants}
    try:
        for proc in variants.values():
            await proc.start()
        for r in range(args.rounds):
            for name, proc in variants.items():
                p50, p99, rate = await measure(
                    proc.url, args.sequential, args.concurrent, args.concurrency
                )
                f = figures[name]
                f.p50.append(p50)
                f.p99.append(p99)
                f.rate.append(rate)
                print(
                    f"  round {r + 1} {name:<22} p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms"
                    f"  {rate:7.0f} sends/s",
                    flush=True,
                )
    finally:
        for proc in variants.values():
            proc.stop()
    return figures


# -- 2. a burst over two replicas -------------------------------------------------------------


async def slots_of(http: aiohttp.ClientSession, url: str, session: str) -> int:
    """Slots reserved in the last minute and ahead (every replica's)."""
    async with http.get(
        f"{url}/admin/sessions/{session}/pacing", headers={"X-Admin-Key": ADMIN_KEY}
    ) as resp:
        state = await resp.json()
    return int(state["per_minute"]["used"])


async def burst(
    replicas: list[RouterProc], fleet: SimFleet, session: str, n: int
) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers={"X-Api-Key": ROUTER_KEY}) as http:
        tasks = []
        issued = time.time()
        for i in range(n):
            url = replicas[i % 2].url
            tasks.append(
                asyncio.create_task(send(http, url, session, f"{session}-{i:04d}", CONTACTS[i]))
            )
            # The next is issued once this one has its slot: the burst has a
            # defined order (it still arrives within a fraction of a second).
            # (Another process's state: there is no event to await.)
            while await slots_of(http, url, session) < i + 1:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        issue_span = time.time() - issued
        answers = await asyncio.gather(*tasks)
    records = [r for r in read_records(fleet.record) if r["session"] == session]
    texts = [r["text"] for r in records]
    ts = [r["ts"] for r in records]
    gaps = [b - a for a, b in pairwise(ts)]
    return {
        "answers": sorted({status for status, _ in answers}),
        "recorded": len(records),
        "unique": len(set(texts)),
        "in_order": texts == [f"{session}-{i:04d}" for i in range(n)],
        "by_instance": {p.name: sum(1 for r in records if r["instance"] == p.name) for p in fleet},
        "issue_span": issue_span,
        "gap_min": min(gaps),
        "gap_mean": statistics.mean(gaps),
        "gap_max": max(gaps),
        "span": ts[-1] - ts[0],
        "max_in_60s": max(sum(1 for u in ts if t - 60 < u <= t) for t in ts),
    }


def print_burst(title: str, b: dict[str, Any], gap: float, jitter: float, n: int) -> None:
    print(f"\n{title}")
    print(f"  issued to the replicas alternately in {b['issue_span']:.2f} s")
    print(f"  answers: {b['answers']}; recorded {b['recorded']} of {n}, {b['unique']} distinct")
    print(f"  in the order sent: {b['in_order']}; by instance: {b['by_instance']}")
    print(
        f"  gaps between sends: min {b['gap_min'] * 1e3:.1f} ms, mean {b['gap_mean'] * 1e3:.1f} ms,"
        f" max {b['gap_max'] * 1e3:.1f} ms (rule: {gap * 1e3:.0f} ms + 0..{jitter * 1e3:.0f} ms)"
    )
    rate = (b["recorded"] - 1) / b["span"] if b["span"] else 0.0
    print(
        f"  {b['recorded']} sends in {b['span']:.2f} s: {rate:.2f} sends/s"
        f" (at most {1 / gap:.2f} by min_gap; {1 / (gap + jitter / 2):.2f} expected with jitter)"
    )
    print(f"  most sends in any 60 s window: {b['max_in_60s']}")


# -- main -------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wa-pacing-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def main(args: argparse.Namespace) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found on PATH")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; everything on this machine"
    )
    with workdir() as work:
        redis = RedisServer(binary, work / "redis")
        (work / "redis").mkdir()
        redis.start()
        fleet = SimFleet(work / "fleet", 2, api_key=INSTANCE_KEY, start_delay=0.05).start()
        try:
            names = {0: [s for i, s in enumerate(COST_SESSIONS) if i % 2 == 0], 1: []}
            names[1] = [s for s in COST_SESSIONS if s not in names[0]]
            names[0] += ["burst_1", "minute_1"]
            async with aiohttp.ClientSession() as http:
                for i, proc in enumerate(fleet):
                    async with http.post(
                        f"{proc.url}/_sim/bulk_sessions", json={"names": names[i]}
                    ) as resp:
                        assert resp.status == 200

            if not args.skip_cost:
                print(
                    f"\n1. cost under the limit: {args.sequential} sequential sends, then"
                    f" {args.concurrent} sends over {args.concurrency} clients, per round"
                )
                figures = await cost(fleet, redis.url, work, args)
                print("\n  medians over rounds:")
                med = {
                    name: (
                        statistics.median(f.p50),
                        statistics.median(f.p99),
                        statistics.median(f.rate),
                    )
                    for name, f in figures.items()
                }
                for name, (p50, p99, rate) in med.items():
                    print(
                        f"  {name:<22} p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms"
                        f"  {rate:7.0f} sends/s"
                    )
                for store in ("memory", "redis"):
                    off, on = med[f"{store}, pacing off"], med[f"{store}, pacing on"]
                    print(
                        f"  {store}: pacing on / off: p50 x{on[0] / off[0]:.2f}"
                        f" (+{(on[0] - off[0]) * 1e3:.2f} ms), p99 x{on[1] / off[1]:.2f},"
                        f" throughput x{on[2] / off[2]:.2f}"
                    )

            replicas = []
            for i in range(2):
                port = free_port()
                path = work / f"replica-{i}.yaml"
                text = pacing_yaml(True, args.gap, args.jitter, minute=True)
                path.write_text(router_yaml(fleet, port, redis.url, "burst:", text))
                replicas.append(RouterProc(f"replica-{i}", path, port))
            try:
                for proc in replicas:
                    await proc.start()
                b = await burst(replicas, fleet, "burst_1", args.burst)
                print_burst(
                    f"2. a burst of {args.burst} sends of one session over two replicas",
                    b,
                    args.gap,
                    args.jitter,
                    args.burst,
                )
                if args.minute:
                    m = await burst(replicas, fleet, "minute_1", args.burst)
                    print_burst(
                        f"2b. a burst of {args.burst} sends held by per_minute: 30",
                        m,
                        args.gap,
                        args.jitter,
                        args.burst,
                    )
            finally:
                for proc in replicas:
                    proc.stop()
        finally:
            fleet.stop()
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--gap", type=float, default=0.05, help="min_gap of the burst's rule")
    parser.add_argument("--jitter", type=float, default=0.02, help="jitter of the burst's rule")
    parser.add_argument("--minute", action="store_true", help="also a burst held by per_minute")
    parser.add_argument("--skip-cost", action="store_true", help="only the burst")
    asyncio.run(main(parser.parse_args()))
