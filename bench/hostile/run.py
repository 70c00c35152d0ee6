"""Hostile-input campaign (issue 11) as a repeatable script.

    .venv/bin/python bench/hostile/run.py                 # every phase, router defaults
    .venv/bin/python bench/hostile/run.py --fuzz 2000 --phases fuzz,flood

A real router process (``python -m router run -c``, WAHA adapter, memory
store, a webhook relay with signing keys, ``limits`` at the router's
defaults unless ``--header-timeout`` / ``--body-timeout`` / ``--idle-timeout``
say otherwise) in front of 3 simulator processes; one session (``bench``)
is created first and the good requests send to it.

Phases (``--phases``, in this order):

``fuzz``
    ``--fuzz`` raw requests from the grammar of ``tests/support/hostile.py``
    (request ``i`` is ``random.Random(seed + i)``), ``--fuzz-clients`` at a
    time, each on its own connection: status counts, answers that break a
    rule of ``hostile.problems`` (5xx, undocumented error JSON, no answer
    within the bound, a key of the config in the answer), and afterwards: the
    sentinel (a listener named in Host / absolute targets / X-Forwarded-Host
    / X-Instance-Url, in no config) got no connection, no session runs that
    no create named, none runs twice.
``flood``
    ``--good`` good requests (``POST /api/sendText`` with the router key, a
    fresh connection each, one at a time): p50 / p99 without load, then the
    same while ``--flood-clients`` clients (another process) post 10 MB
    JSON bodies without a key as fast as the router takes them; router RSS
    before, peak during (sampled every 20 ms) and after (/proc).
``slow``
    ``--slow`` connections at once, split evenly: half a request head, a
    head and half its body (with the key), nothing at all, and half a
    webhook body; when the router closed each (or "open" at ``--slow-cap``),
    and good requests (fresh connections) meanwhile.
``webhooks``
    ``--hooks`` unsigned 8 MiB webhook posts at once (``/webhooks/waha/wa-1``,
    the ingest cap): their answers, how long, good requests meanwhile, RSS
    before / peak / after.

At the end: the router's log holds no key of the config, and it still
answers ``/healthz`` and a send. Every process started here is stopped on
exit, on an exception and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from router.config import Limits  # noqa: E402
from tests.support.hostile import (  # noqa: E402
    WAHA_INVENTED,
    Keys,
    RandomChooser,
    RouterProcess,
    Sentinel,
    Sessions,
    Sink,
    Target,
    build_request,
    exchange,
    leaks,
    problems,
    request_bytes,
    running_sessions,
    sim_state,
)
from tests.support.simulator import SimFleet  # noqa: E402
from tests.support.webhook_target import free_port  # noqa: E402

MB10 = 10_000_000
MIB8 = 8 * 1024 * 1024


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.keys = Keys.fresh()
        self.fleet = SimFleet(work / "fleet", 3, dialect="waha", api_key=self.keys.instance)
        self.sentinel = Sentinel()
        self.sink = Sink()
        self.port = free_port()
        self.router: RouterProcess | None = None
        self.sessions = Sessions.for_dialect("waha")
        self.allowed: set[str] = set()
        self.fuzz_creates = 0
        self.sent_texts = 0
        self.lines: list[str] = []

    # -- setup ----------------------------------------------------------------------------

    def start(self) -> None:
        from tests.support.hostile import write_config

        self.fleet.start()
        cfg = self.work / "router.yaml"
        env = write_config(
            cfg,
            dialect="waha",
            port=self.port,
            instances=[(p.name, p.url) for p in self.fleet],
            keys=self.keys,
            sink_url=self.sink.url,
            header_timeout=self.args.header_timeout,
            body_timeout=self.args.body_timeout,
            idle_timeout=self.args.idle_timeout,
        )
        self.router = RouterProcess(cfg, self.port, self.work / "router.log", env).start()
        for name in (*self.sessions.live, self.sessions.final):
            self.allowed.add(name)
            answer = self.call("POST", "/api/sessions", {"name": name})
            assert answer.status == 201, answer.raw[:300]
        deadline = time.monotonic() + 15
        while True:
            states = {
                s["name"]: s["status"] for p in self.fleet for s in sim_state(p.url)["sessions"]
            }
            if all(states.get(n) == "WORKING" for n in (*self.sessions.live, self.sessions.final)):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.05)

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        self.fleet.stop()
        self.sentinel.close()
        self.sink.close()

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    # -- requests -------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, deadline: float = 30) -> Any:
        data = request_bytes(
            method,
            path,
            host=f"127.0.0.1:{self.port}",
            headers={"X-Api-Key": self.keys.router},
            body=body,
        )
        return exchange("127.0.0.1", self.port, data, deadline=deadline)

    def good(self) -> tuple[bool, float]:
        """One send with the router key on a fresh connection: (2xx?, seconds)."""
        self.sent_texts += 1
        body = {"session": self.sessions.final, "chatId": "1@c.us", "text": f"g{self.sent_texts}"}
        started = time.perf_counter()
        try:
            answer = self.call("POST", "/api/sendText", body, deadline=30)
        except OSError:
            return False, time.perf_counter() - started
        return answer.status == 201, time.perf_counter() - started

    def good_series(
        self, n: int | None = None, until: Callable[[], bool] | None = None, pause: float = 0.0
    ) -> tuple[list[float], int]:
        """Good requests one at a time (``n`` of them, or until ``until()``)."""
        lat: list[float] = []
        failed = 0
        while (n is None or len(lat) + failed < n) and not (until is not None and until()):
            ok, took = self.good()
            if ok:
                lat.append(took)
            else:
                failed += 1
            if pause:
                time.sleep(pause)
        return lat, failed

    def rss(self) -> tuple[int, int]:
        assert self.router is not None
        return self.router.status("VmRSS"), self.router.status("VmHWM")

    def sample_rss(self, stop: threading.Event, out: list[int]) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                out.append(self.rss()[0])
            time.sleep(0.02)

    # -- phases -----------------------------------------------------------------------------

    def phase_fuzz(self) -> None:
        a = self.args
        assert self.router is not None
        target = Target(
            dialect="waha",
            host="127.0.0.1",
            port=self.port,
            keys=self.keys,
            sessions=self.sessions,
            instances=tuple(p.name for p in self.fleet),
            sentinel_port=self.sentinel.port,
        )
        bound = a.header_timeout + a.body_timeout + 5
        statuses: Counter[str] = Counter()
        broken: Counter[str] = Counter()
        examples: dict[str, str] = {}
        lock = threading.Lock()

        def one(i: int) -> None:
            built = build_request(RandomChooser(random.Random(a.seed + i)), target)
            try:
                answer = exchange(
                    "127.0.0.1",
                    self.port,
                    built.data,
                    deadline=bound + 2,
                    head_only=built.method.upper() == "HEAD",
                )
            except OSError as exc:
                with lock:
                    statuses[f"connect:{type(exc).__name__}"] += 1
                return
            found = problems(built, answer, bound=bound, keys=self.keys)
            with lock:
                if built.creates:
                    self.fuzz_creates += 1
                    self.allowed |= built.names
                statuses[str(answer.status) if answer.status is not None else "closed"] += 1
                for f in found:
                    key = f.split(" (")[0]
                    if answer.status is not None and answer.status >= 500:
                        doc = answer.json()
                        code = doc.get("error") if isinstance(doc, dict) else None
                        key = f"status {answer.status} {code or 'upstream'}"
                    broken[key] += 1
                    examples.setdefault(
                        key,
                        f"request #{i} (seed {a.seed + i}): "
                        f"{built.data[:300]!r}\n      -> {answer.raw[:300]!r}",
                    )

        started = time.monotonic()
        with ThreadPoolExecutor(a.fuzz_clients) as pool:
            list(pool.map(one, range(a.fuzz)))
        took = time.monotonic() - started
        self.say(f"## fuzz: {a.fuzz} raw requests, {a.fuzz_clients} at a time, {took:.1f} s")
        self.say("status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
        if broken:
            self.say("rule violations:")
            for k, v in broken.most_common():
                self.say(f"  {v:6d}  {k}")
                self.say(f"      e.g. {examples[k]}")
        else:
            self.say("rule violations: none")
        time.sleep(1.5)  # restores started by the last requests settle
        running = running_sessions((p.name, p.url) for p in self.fleet)
        allowed = self.allowed | ({"default", "undefined"} if self.fuzz_creates else set())
        unnamed = {
            s
            for s in running
            if s not in allowed and not (self.fuzz_creates and WAHA_INVENTED.fullmatch(s))
        }
        twice = {s: w for s, w in running.items() if len(w) > 1}
        self.say(f"sentinel connections: {len(self.sentinel.connections)}")
        self.say(f"sessions running that no create named: {sorted(unnamed) or 'none'}")
        self.say(f"sessions running on two instances: {twice or 'none'}")
        self.say(f"router alive: {self.router.alive}")
        self.say()

    def phase_flood(self) -> None:
        a = self.args
        self.say(f"## flood: {a.flood_clients} clients posting 10 MB JSON without a key")
        base, base_failed = self.good_series(a.good)
        rss0, _ = self.rss()
        stop = multiprocessing.Event()
        counts: Any = multiprocessing.Manager().dict()
        proc = multiprocessing.Process(
            target=flood, args=(self.port, a.flood_clients, stop, counts), daemon=True
        )
        proc.start()
        samples: list[int] = []
        halt = threading.Event()
        sampler = threading.Thread(target=self.sample_rss, args=(halt, samples), daemon=True)
        sampler.start()
        time.sleep(1.0)  # the flood is under way
        started = time.monotonic()
        under, under_failed = self.good_series(a.good)
        during = time.monotonic() - started
        stop.set()
        proc.join(30)
        halt.set()
        sampler.join()
        time.sleep(1.0)
        rss1, hwm = self.rss()
        flood_counts = dict(counts)
        posts = sum(v for k, v in flood_counts.items() if k != "bytes")
        self.say(f"good requests ({a.good} each, one at a time, fresh connection each):")
        self.say(
            f"  without the flood: p50 {ms(pct(base, 0.5))}, p99 {ms(pct(base, 0.99))},"
            f" failed {base_failed}"
        )
        self.say(
            f"  during the flood:  p50 {ms(pct(under, 0.5))}, p99 {ms(pct(under, 0.99))},"
            f" failed {under_failed}"
        )
        self.say(
            f"flood: {posts} posts in {during + 1:.1f} s"
            f" ({flood_counts.get('bytes', 0) / 1e9:.1f} GB written),"
            f" answers {dict((k, v) for k, v in flood_counts.items() if k != 'bytes')}"
        )
        self.say(
            f"router RSS: before {rss0 / 1024:.0f} MiB, peak during"
            f" {max(samples, default=0) / 1024:.0f} MiB, after {rss1 / 1024:.0f} MiB"
            f" (VmHWM {hwm / 1024:.0f} MiB)"
        )
        self.say()

    def phase_slow(self) -> None:
        a = self.args
        kinds = ("half_head", "half_body", "silent", "webhook_half_body")
        self.say(
            f"## slow connections: {a.slow} at once ({a.slow // len(kinds)} of each kind),"
            f" header_timeout {a.header_timeout:g} s, body_timeout {a.body_timeout:g} s,"
            f" idle_timeout {a.idle_timeout:g} s"
        )
        done = threading.Event()
        result: dict[str, Any] = {}

        def run() -> None:
            result.update(asyncio.run(slow_connections(self, kinds, a.slow, a.slow_cap)))
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        time.sleep(2.0)  # all opened
        lat, failed = self.good_series(until=done.is_set, pause=0.2)
        t.join()
        for kind in kinds:
            closes = result[kind]["closed"]
            still = result[kind]["open"]
            answers = result[kind]["answers"]
            line = f"  {kind:18s} closed {len(closes):4d}"
            if closes:
                line += (
                    f" after min {min(closes):.1f} s / median {statistics.median(closes):.1f} s"
                    f" / max {max(closes):.1f} s"
                )
            line += f", still open at {a.slow_cap:g} s: {still}, answers {dict(answers)}"
            self.say(line)
        self.say(
            f"good requests meanwhile (one every 0.2 s): {len(lat)} ok, {failed} failed,"
            f" p50 {ms(pct(lat, 0.5))}, p99 {ms(pct(lat, 0.99))}, max {ms(max(lat, default=0))}"
        )
        self.say(f"connections that could not be opened: {result['refused']}")
        self.say()

    def phase_webhooks(self) -> None:
        a = self.args
        self.say(f"## webhooks: {a.hooks} unsigned 8 MiB posts at once to /webhooks/waha/wa-1")
        rss0, _ = self.rss()
        samples: list[int] = []
        halt = threading.Event()
        sampler = threading.Thread(target=self.sample_rss, args=(halt, samples), daemon=True)
        sampler.start()
        body = b'{"event":"message","session":"x","pad":"' + b"a" * (MIB8 - 44) + b'"}'
        assert len(body) <= MIB8
        head = (
            f"POST /webhooks/waha/wa-1 HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        answers: Counter[str] = Counter()
        times: list[float] = []
        finished = threading.Event()

        def post(_: int) -> None:
            t0 = time.monotonic()
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=120)
                s.sendall(head)
                s.sendall(body)
                answer = exchange("127.0.0.1", self.port, b"", deadline=120, sock=s)
                key = str(answer.status) if answer.status else "closed"
            except OSError as exc:
                key = type(exc).__name__
            answers[key] += 1
            times.append(time.monotonic() - t0)

        def all_posts() -> None:
            with ThreadPoolExecutor(a.hooks) as pool:
                list(pool.map(post, range(a.hooks)))
            finished.set()

        started = time.monotonic()
        poster = threading.Thread(target=all_posts, daemon=True)
        poster.start()
        lat, failed = self.good_series(until=finished.is_set, pause=0.05)
        poster.join()
        took = time.monotonic() - started
        time.sleep(1.0)
        halt.set()
        sampler.join()
        rss1, hwm1 = self.rss()
        self.say(
            f"answers {dict(answers)} in {took:.1f} s (each: median"
            f" {statistics.median(times):.1f} s, max {max(times):.1f} s)"
        )
        self.say(
            f"good requests meanwhile: {len(lat)} ok, {failed} failed,"
            f" p50 {ms(pct(lat, 0.5))}, p99 {ms(pct(lat, 0.99))}"
        )
        self.say(
            f"router RSS: before {rss0 / 1024:.0f} MiB, peak during"
            f" {max(samples, default=0) / 1024:.0f} MiB (VmHWM {hwm1 / 1024:.0f} MiB),"
            f" after {rss1 / 1024:.0f} MiB"
        )
        self.say()

    def finish(self) -> None:
        assert self.router is not None
        health = exchange(
            "127.0.0.1", self.port, request_bytes("GET", "/healthz", host=f"127.0.0.1:{self.port}")
        )
        ok, _ = self.good()
        self.say("## afterwards")
        self.say(
            f"/healthz {health.status}, a send {'ok' if ok else 'FAILED'},"
            f" router alive {self.router.alive}"
        )
        self.router.stop()
        log = self.router.log_text()
        found = leaks(log.encode(), self.keys.secrets())
        self.say(
            f"keys in the router log: {found or 'none'};"
            f" tracebacks: {log.count('Traceback')}; log lines: {log.count(chr(10))}"
        )


def flood(port: int, clients: int, stop: Any, counts: Any) -> None:
    """(Another process.) ``clients`` threads posting 10 MB without a key, as fast as they can."""
    body = b'{"session":"bench","pad":"' + b"a" * (MB10 - 30) + b'"}'
    head = (
        f"POST /api/sendText HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    local: Counter[str] = Counter()
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            written = 0
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(head)
                    written = len(head)
                    with contextlib.suppress(OSError):
                        s.sendall(body)
                        written += len(body)
                    s.settimeout(10)
                    first = s.recv(64)
                key = first.split(b" ", 2)[1].decode() if first.startswith(b"HTTP/") else "closed"
            except OSError as exc:
                key = type(exc).__name__
            with lock:
                local[key] += 1
                local["bytes"] += written

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts.update(local)


async def slow_connections(
    bench: Bench, kinds: tuple[str, ...], n: int, cap: float
) -> dict[str, Any]:
    port = bench.port
    key = bench.keys.router
    partial = {
        "half_head": b"POST /api/sendText HTTP/1.1\r\nHost: x\r\nX-Api",
        "half_body": (
            "POST /api/sendText HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Api-Key: {key}\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        + b'{"session": "'
        + b"a" * 480,
        "silent": b"",
        "webhook_half_body": (
            b"POST /webhooks/waha/wa-1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        + b'{"event": "'
        + b"a" * 480,
    }
    out: dict[str, Any] = {k: {"closed": [], "open": 0, "answers": Counter()} for k in kinds}
    out["refused"] = 0

    async def one(kind: str) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            out["refused"] += 1
            return
        t0 = time.monotonic()
        if partial[kind]:
            writer.write(partial[kind])
        try:
            async with asyncio.timeout(cap):
                data = await reader.read()
            out[kind]["closed"].append(time.monotonic() - t0)
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "none"
            out[kind]["answers"][status] += 1
        except TimeoutError:
            out[kind]["open"] += 1
        except OSError:
            out[kind]["closed"].append(time.monotonic() - t0)
            out[kind]["answers"]["reset"] += 1
        finally:
            writer.close()

    per = n // len(kinds)
    await asyncio.gather(*(one(k) for k in kinds for _ in range(per)))
    return out


def main() -> int:
    d = Limits()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--phases", default="fuzz,flood,slow,webhooks")
    p.add_argument("--fuzz", type=int, default=10_000, help="raw fuzz requests (10000)")
    p.add_argument("--fuzz-clients", type=int, default=32)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--good", type=int, default=500, help="good requests per measurement (500)")
    p.add_argument("--flood-clients", type=int, default=16)
    p.add_argument("--slow", type=int, default=1000, help="slow connections (1000)")
    p.add_argument("--slow-cap", type=float, default=d.idle_timeout + 30.0)
    p.add_argument("--hooks", type=int, default=200, help="unsigned 8 MiB webhook posts (200)")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout)
    p.add_argument("--body-timeout", type=float, default=d.body_timeout)
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--rev", default=None, help="the router revision to print (default: git HEAD)")
    args = p.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="wa-hostile-"))
    bench = Bench(args, work)
    try:
        bench.start()
        bench.say(
            f"# hostile-input campaign: router {args.rev or git_head()}, 3 WAHA simulators,"
            f" limits header {args.header_timeout:g} s / body {args.body_timeout:g} s /"
            f" idle {args.idle_timeout:g} s"
        )
        bench.say()
        phases = args.phases.split(",")
        for name in ("fuzz", "flood", "slow", "webhooks"):
            if name in phases:
                getattr(bench, f"phase_{name}")()
        bench.finish()
    finally:
        bench.stop()
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def git_head() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
