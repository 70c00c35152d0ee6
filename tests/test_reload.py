"""Live config reload under load (router.reload), SIGHUP, the file watch and SIGTERM.

The in-process tests run ``router.server.Server`` on a config file in
``tmp_path`` with real simulator processes behind it, and keep requests
flowing while the file changes. The signal tests run ``python -m router run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.config_loader import load
from router.instances import AdminState, Instance, Pools
from router.metrics import CONFIG_LAST_RELOAD_SUCCESS, CONFIG_RELOADS
from router.reload import Reloader
from router.server import Server
from router.transport import FastTransport
from tests.support.router import INSTANCE_KEY, ROUTER_KEY, RouterHandle
from tests.support.simulator import REPO_ROOT, SimFleet, SimFleetFactory, SimProcess

ADMIN_KEY = "reload-admin-key"
RUNNING = {"STARTING", "SCAN_QR_CODE", "WORKING"}


# -- config files ---------------------------------------------------------------------


@dataclass
class Inst:
    name: str
    url: str
    max_sessions: int = 1000
    weight: float = 1.0


def config_text(
    instances: Sequence[Inst],
    *,
    read: float = 5.0,
    connect: float = 1.0,
    port: int = 0,
    adapter: str = "waha",
    extra: str = "",
) -> str:
    lines = [
        f"listen: {{host: 127.0.0.1, port: {port}}}",
        f"admin_key: {ADMIN_KEY}",
        f"api_keys: [{ROUTER_KEY}]",
        f"adapter: {{kind: {adapter}}}",
        f"timeouts: {{connect: {connect}, read: {read}, idle_keepalive: 4}}",
        "health: {interval: 0.2, timeout: 0.15, rise: 1, fall: 2}",
        "discovery: {interval: 0, migrate_concurrency: 4}",
        "failover: {ready_timeout: 10}",
    ]
    if extra:
        lines.append(extra)
    lines.append("instances:")
    for i in instances:
        lines.append(f"  - name: {i.name}")
        lines.append(f"    url: {i.url}")
        lines.append(f"    max_sessions: {i.max_sessions}")
        lines.append(f"    weight: {i.weight}")
        lines.append(f"    api_key: {INSTANCE_KEY}")
    return "\n".join(lines) + "\n"


def fleet_insts(procs: Iterable[SimProcess]) -> list[Inst]:
    return [Inst(p.name, p.url) for p in procs]


def write(path: Path, text: str) -> None:
    # Atomic, like an editor or a ConfigMap swap.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


StartFileRouter = Callable[..., Awaitable[RouterHandle]]


@pytest.fixture
async def start_file_router() -> AsyncIterator[StartFileRouter]:
    """``await start_file_router(path, watch_interval=None)``: a Server on a config file."""
    servers: list[Server] = []

    async def start(path: Path, *, watch_interval: float | None = None) -> RouterHandle:
        server = Server(load(str(path)), drain_timeout=5.0, watch_interval=watch_interval)
        servers.append(server)
        await server.startup()
        assert server.reloader is not None
        server.reloader.retire_grace = 0.2  # tests wait for retired pools to close
        return RouterHandle(server, f"http://127.0.0.1:{server.port}", ROUTER_KEY)

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            await server.shutdown()


def reloader(router: RouterHandle) -> Reloader:
    found = router.server.reloader
    assert found is not None
    return found


async def admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers={"X-Admin-Key": ADMIN_KEY}) as http,
        http.request(method, url + path, json=body) as resp,
    ):
        return resp.status, await resp.json()


def metric(counter: Any, **labels: str) -> float:
    child = counter.labels(**labels) if labels else counter
    return float(child._value.get())


async def all_arrived(proc: SimProcess) -> None:
    """Wait until a counted fault has been used up: every request it holds arrived."""
    async with asyncio.timeout(10):
        while True:
            if (await proc._sim("GET", "/_sim/fault"))["mode"] == "none":
                return
            await asyncio.sleep(0.02)  # polling another process


async def running_on(proc: SimProcess) -> set[str]:
    return {s["name"] for s in (await proc.state())["sessions"] if s["status"] in RUNNING}


# -- traffic ---------------------------------------------------------------------------


@dataclass
class Traffic:
    """Clients sending messages through the router while the config changes.

    ``strict`` sessions must never see anything but success; ``moving``
    sessions (on an instance being removed) may be refused while their move
    is in flight, and the client then sends again (never after a success).
    """

    router: RouterHandle
    strict: list[str]
    moving: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _send(self, http: aiohttp.ClientSession, session: str, text: str) -> tuple[int, str]:
        body = {"session": session, "chatId": "1@c.us", "text": text}
        async with http.post(f"{self.router.url}/api/sendText", json=body) as resp:
            return resp.status, await resp.text()

    async def _worker(self, sessions: list[str], strict: bool, n: int) -> None:
        i = 0
        async with self.router.client() as http:
            while not self.stop.is_set():
                session = sessions[i % len(sessions)]
                text = f"{session}-w{n}-{i}"
                i += 1
                deadline = time.monotonic() + 20
                while True:
                    try:
                        status, answer = await self._send(http, session, text)
                    except aiohttp.ClientError as exc:
                        status, answer = 0, repr(exc)
                    async with self.progress:
                        self.sent += 1
                        self.progress.notify_all()
                    if status == 201:
                        self.acked.append(text)
                        break
                    if strict or status not in (404, 422, 502, 503):
                        self.failures.append((text, status, answer[:200]))
                        break
                    self.refused[status] += 1
                    if time.monotonic() > deadline:
                        self.failures.append((text, status, "still refused after 20 s"))
                        break
                    await asyncio.sleep(0.01)  # client back-off, not synchronisation

    def start(self, workers: int = 4) -> None:
        for n in range(workers):
            self.tasks.append(asyncio.create_task(self._worker(self.strict, True, n)))
        if self.moving:
            for n in range(2):
                self.tasks.append(asyncio.create_task(self._worker(self.moving, False, 100 + n)))

    async def pace(self, n: int = 20) -> None:
        """Let at least ``n`` more requests through (traffic really is flowing)."""
        target = self.sent + n
        async with asyncio.timeout(20), self.progress:
            await self.progress.wait_for(lambda: self.sent >= target)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def create(router: RouterHandle, name: str) -> str:
    async with (
        router.client() as http,
        http.post(f"{router.url}/api/sessions", json={"name": name}) as resp,
    ):
        assert resp.status == 201, await resp.text()
    owner = router.runtime.smap.cached(name)
    assert owner is not None
    return owner


# -- reloads under load -------------------------------------------------------------------


async def test_reloads_under_load_add_reweight_retime_remove_and_reject_bad_files(
    sim_fleet: SimFleetFactory, start_file_router: StartFileRouter, tmp_path: Path
) -> None:
    fleet = sim_fleet(4, api_key=INSTANCE_KEY, start_delay=0.05)
    one, two, three, four = fleet
    path = tmp_path / "router.yaml"
    insts = fleet_insts([one, two, three])
    write(path, config_text(insts))
    router = await start_file_router(path)
    rt = router.runtime
    url = router.url

    names = [f"s{i}" for i in range(12)]
    owners = {name: await create(router, name) for name in names}
    for name, owner in owners.items():
        await fleet.by_name(owner).wait_session(name)
    assert Counter(owners.values()) == {"wa-1": 4, "wa-2": 4, "wa-3": 4}
    on_three = [s for s, o in owners.items() if o == "wa-3"]
    traffic = Traffic(router, strict=[s for s in names if s not in on_three], moving=on_three)
    traffic.start()
    await traffic.pace()

    # 1. Add an instance: it takes new sessions, ramping up from 10 % of its
    #    capacity (slow start; tests/test_autoscaling.py measures the ramp).
    write(path, config_text([*insts, Inst("wa-4", four.url)]))
    status, body = await admin(url, "POST", "/admin/reload")
    assert status == 200, body
    assert (body["ok"], body["added"], body["changed"]) == (True, ["wa-4"], True)
    assert rt.fleet.names() == ["wa-1", "wa-2", "wa-3", "wa-4"]
    assert rt.fleet.get("wa-4").placeable  # type: ignore[union-attr]
    await create(router, "fresh-1")
    await traffic.pace()

    # 2. Re-weight and resize in place: the same objects, health and pools kept.
    before = {i.name: i for i in rt.fleet}
    pools = {i.name: i.transport for i in rt.fleet}
    insts = [
        Inst("wa-1", one.url, weight=0.5),
        Inst("wa-2", two.url, max_sessions=50),
        Inst("wa-3", three.url),
        Inst("wa-4", four.url, weight=3),
    ]
    write(path, config_text(insts))
    status, body = await admin(url, "POST", "/admin/reload")
    assert status == 200, body
    assert body["updated"] == {"wa-1": ["weight"], "wa-2": ["max_sessions"], "wa-4": ["weight"]}
    assert body["repooled"] == [] and body["added"] == []
    assert all(rt.fleet.get(n) is inst for n, inst in before.items())
    assert all(rt.fleet.get(n).transport is t for n, t in pools.items())  # type: ignore[union-attr]
    assert rt.fleet.get("wa-4").config.weight == 3  # type: ignore[union-attr]
    assert router.server.config is rt.config
    await traffic.pace()

    # 3. New timeouts: every instance gets new pools; requests keep flowing
    #    and the old pools close once idle.
    write(path, config_text(insts, read=6.0))
    status, body = await admin(url, "POST", "/admin/reload")
    assert status == 200, body
    assert body["settings"] == ["timeouts"]
    assert sorted(body["repooled"]) == ["wa-1", "wa-2", "wa-3", "wa-4"]
    assert all(rt.fleet.get(n).transport is not t for n, t in pools.items())  # type: ignore[union-attr]
    assert rt.config.timeouts.read == 6.0
    await traffic.pace()
    await reloader(router).wait_pools_closed()

    # 4. Bad files are rejected with file:line: reason; nothing changes.
    good = rt.config
    failures = metric(CONFIG_RELOADS, result="failure")
    path.write_text(config_text(insts, read=6.0) + "  - name: [unclosed\n")
    status, body = await admin(url, "POST", "/admin/reload")
    assert status == 422 and body["error"] == "config_rejected", body
    assert re.match(rf"{re.escape(str(path))}:\d+: ", body["message"]), body["message"]
    assert body["file"] == str(path) and isinstance(body["line"], int)
    assert metric(CONFIG_LAST_RELOAD_SUCCESS) == 0
    assert metric(CONFIG_RELOADS, result="failure") == failures + 1
    text = config_text(insts, read=6.0).replace("max_sessions: 50", "max_sessions: -5")
    path.write_text(text)
    line = text.splitlines().index("    max_sessions: -5") + 1
    status, body = await admin(url, "POST", "/admin/reload")
    assert status == 422, body
    assert body["message"].startswith(f"{path}:{line}: ") and "max_sessions" in body["reason"]
    assert rt.config is good and router.server.config is good
    await traffic.pace()

    # 5. Remove an instance: it drains (its sessions move, one copy at a time),
    #    then leaves the fleet.
    insts = [i for i in insts if i.name != "wa-3"]
    write(path, config_text(insts, read=6.0))
    status, body = await admin(url, "POST", "/admin/reload")
    assert status == 200, body
    assert body["removed"] == ["wa-3"] and metric(CONFIG_LAST_RELOAD_SUCCESS) == 1
    assert rt.fleet.get("wa-3").admin is AdminState.DRAINING  # type: ignore[union-attr]
    status, listing = await admin(url, "GET", "/admin/instances")
    assert [(i["name"], i["removed"]) for i in listing["instances"]][-1] == ("wa-3", True)
    await asyncio.wait_for(reloader(router).wait_retired("wa-3"), 30)
    assert rt.fleet.names() == ["wa-1", "wa-2", "wa-4"]
    await traffic.pace()
    await traffic.finish()

    assert traffic.failures == []
    assert len(traffic.acked) > 100
    # Every session runs on exactly one instance, the one the map names.
    running = {p.name: await running_on(p) for p in fleet}
    assert running["wa-3"] == set()
    for name in [*names, "fresh-1"]:
        where = [p for p, sessions in running.items() if name in sessions]
        assert where == [rt.smap.cached(name)], (name, where)
    assert rt.smap.counts().get("wa-3") is None
    # Every acknowledged message was delivered exactly once, nothing else.
    recorded = Counter(r["text"] for r in fleet.sent())
    assert sorted(recorded) == sorted(traffic.acked)
    assert set(recorded.values()) == {1}
    kinds = [e["kind"] for e in rt.events.recent(500)]
    assert "instance_removed" in kinds and kinds.count("config_reload") == 6


async def test_requests_in_flight_finish_on_the_pools_a_reload_replaces(
    sim_fleet: SimFleetFactory, start_file_router: StartFileRouter, tmp_path: Path
) -> None:
    fleet = sim_fleet(1, api_key=INSTANCE_KEY, start_delay=0.05)
    proc = fleet[0]
    path = tmp_path / "router.yaml"
    write(path, config_text(fleet_insts(fleet)))
    router = await start_file_router(path)
    rt = router.runtime
    await create(router, "slow")
    await proc.wait_session("slow")
    old: Instance = rt.fleet.get("wa-1")  # type: ignore[assignment]
    old_pools = old.pools

    await proc.fault("slow", delay=1.0, paths="/api/sendText", count=5)
    async with router.client() as http:

        async def send(i: int) -> int:
            body = {"session": "slow", "chatId": "1@c.us", "text": f"slow-{i}"}
            async with http.post(f"{router.url}/api/sendText", json=body) as resp:
                await resp.read()
                return resp.status

        sends = [asyncio.create_task(send(i)) for i in range(5)]
        await all_arrived(proc)

        # Same instance at a new address (localhost for 127.0.0.1), new timeouts.
        moved = Inst("wa-1", proc.url.replace("127.0.0.1", "localhost"))
        write(path, config_text([moved], read=7.0))
        result = await reloader(router).reload("manual")
        assert result.ok and result.readdressed == ["wa-1"], result
        new = rt.fleet.get("wa-1")
        assert new is not None and new is not old and new.transport is not old_pools.transport
        assert old_pools.busy() >= 5 and not old_pools.http.closed

        # New requests take the new pools while the old ones finish.
        body = {"session": "slow", "chatId": "1@c.us", "text": "new"}
        async with http.post(f"{router.url}/api/sendText", json=body) as resp:
            assert resp.status == 201
        assert isinstance(new.transport, FastTransport) and new.transport.open_connections == 1

        assert await asyncio.gather(*sends) == [201] * 5
    await reloader(router).wait_pools_closed()
    assert old_pools.http.closed and old_pools.busy() == 0
    assert isinstance(old_pools.transport, FastTransport)
    assert old_pools.transport.pool.closing
    assert sorted(r["text"] for r in fleet.sent()) == ["new"] + [f"slow-{i}" for i in range(5)]


async def test_adapter_change_and_restart_only_sections(
    sim_fleet: SimFleetFactory, start_file_router: StartFileRouter, tmp_path: Path
) -> None:
    fleet = sim_fleet(1, api_key=INSTANCE_KEY)
    path = tmp_path / "router.yaml"
    insts = fleet_insts(fleet)
    write(path, config_text(insts))
    router = await start_file_router(path)
    rt = router.runtime
    old_adapter = rt.adapter

    # Unchanged file: a success that changes nothing.
    result = await reloader(router).reload("api")
    assert result.ok and not result.changed and rt.adapter is old_adapter

    # A listen change waits for a restart; the rest applies.
    write(path, config_text(insts, port=9, adapter="wwebjs"))
    result = await reloader(router).reload("api")
    assert result.ok and result.adapter_changed and result.restart_required == ["listen"]
    assert type(rt.adapter).__name__ == "WwebjsAdapter"
    assert rt.config.listen.port == 0  # what is in force
    status, state = await admin(router.url, "GET", "/admin/reload")
    assert status == 200 and state["last"]["restart_required"] == ["listen"]
    assert state["applied"] == 2 and state["source"] == str(path)


async def test_the_file_watch_reloads_changes_skips_touches_and_rejects_bad_files(
    sim_fleet: SimFleetFactory, start_file_router: StartFileRouter, tmp_path: Path
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    path = tmp_path / "router.yaml"
    write(path, config_text(fleet_insts([fleet[0]])))
    router = await start_file_router(path, watch_interval=0.05)
    rt = router.runtime
    watch = reloader(router)

    seen = watch.attempts
    write(path, config_text(fleet_insts(fleet)))
    result = await asyncio.wait_for(watch.wait_attempt(seen), 10)
    assert (result.ok, result.cause, result.added) == (True, "file", ["wa-2"])
    assert rt.fleet.names() == ["wa-1", "wa-2"]

    # A touch is no change: noticed, not reloaded.
    seen, noticed = watch.attempts, watch.changes_seen
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    await asyncio.wait_for(watch.wait_change_seen(noticed), 10)
    assert watch.attempts == seen
    text = path.read_text()
    path.write_text(text.replace("weight: 1.0", "weight: [", 1))  # in place, broken
    result = await asyncio.wait_for(watch.wait_attempt(seen), 10)
    assert watch.attempts == seen + 1
    assert not result.ok and result.cause == "file" and result.line is not None
    assert metric(CONFIG_LAST_RELOAD_SUCCESS) == 0
    assert rt.fleet.names() == ["wa-1", "wa-2"]

    # Fixed again (the same content as in force): a success, the metric recovers.
    seen = watch.attempts
    path.write_text(text)
    result = await asyncio.wait_for(watch.wait_attempt(seen), 10)
    assert result.ok and not result.changed and metric(CONFIG_LAST_RELOAD_SUCCESS) == 1


async def test_fleet_plan_keeps_what_it_can(tmp_path: Path) -> None:
    insts = [Inst("a", "http://127.0.0.1:1"), Inst("b", "http://127.0.0.1:2")]
    path = tmp_path / "r.yaml"
    write(path, config_text(insts))
    cfg = load(str(path))
    from router.instances import Fleet

    fleet = Fleet.build(cfg)
    a, b = fleet.get("a"), fleet.get("b")
    assert a is not None and b is not None
    a.admin = AdminState.MAINTENANCE
    write(path, config_text([Inst("a", "http://127.0.0.1:9"), Inst("c", "http://127.0.0.1:3")]))
    new_cfg = load(str(path))
    change = fleet.plan(new_cfg, keep=lambda inst: inst.name == "b")
    assert (change.added, change.readdressed, change.removed, change.dropped) == (
        ["c"],
        ["a"],
        ["b"],
        [],
    )
    assert change.fleet.names() == ["a", "c", "b"]
    new_a = change.fleet.get("a")
    assert new_a is not None and new_a is not a and new_a.admin is AdminState.MAINTENANCE
    assert change.fleet.get("b") is b
    assert change.retired == [Pools(a.http, a.transport)]
    assert fleet.get("a") is a  # the fleet in force never changes
    assert change.fleet.without("b").names() == ["a", "c"]
    await change.fleet.close()
    await a.close()


# -- signals on a real router process ---------------------------------------------------------


class RouterProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.url = ""
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: Path, *args: str) -> RouterProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            "run",
            "-c",
            str(config),
            *args,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self = cls(proc)
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while not self.url:
                line = (await proc.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("router exited:\n" + "".join(self.lines))
                self.lines.append(line)
                m = re.search(r"router listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
        self._drain = asyncio.create_task(self._read_rest())
        return self

    async def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode())

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, within: float = 20) -> int:
        code = await asyncio.wait_for(self.proc.wait(), within)
        if self._drain is not None:
            await self._drain
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain


@pytest.fixture
async def router_process() -> AsyncIterator[Callable[..., Awaitable[RouterProcess]]]:
    started: list[RouterProcess] = []

    async def start(config: Path, *args: str) -> RouterProcess:
        proc = await RouterProcess.start(config, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        await proc.kill()


async def wait_attempts(url: str, n: int) -> dict[str, Any]:
    """The router process's reload status once it has made ``n`` attempts."""
    async with asyncio.timeout(15):
        while True:
            status, state = await admin(url, "GET", "/admin/reload")
            if status == 200 and state["attempts"] >= n:
                return state
            await asyncio.sleep(0.05)  # polling another process


async def test_sighup_reloads_a_running_router(
    sim_fleet: SimFleetFactory,
    router_process: Callable[..., Awaitable[RouterProcess]],
    tmp_path: Path,
) -> None:
    fleet: SimFleet = sim_fleet(2, api_key=INSTANCE_KEY)
    path = tmp_path / "router.yaml"
    write(path, config_text(fleet_insts([fleet[0]])))
    proc = await router_process(path, "--watch-interval", "0")

    write(path, config_text(fleet_insts(fleet)))
    proc.signal(signal.SIGHUP)
    state = await wait_attempts(proc.url, 1)
    assert state["last"]["ok"] and state["last"]["cause"] == "sighup", state
    assert state["last"]["added"] == ["wa-2"] and not state["watching"]
    _, listing = await admin(proc.url, "GET", "/admin/instances")
    assert [i["name"] for i in listing["instances"]] == ["wa-1", "wa-2"]

    path.write_text("instances: nope\n")
    proc.signal(signal.SIGHUP)
    state = await wait_attempts(proc.url, 2)
    assert not state["last"]["ok"]
    assert state["last"]["error"].startswith(f"{path}:1: instances")
    async with aiohttp.ClientSession() as http, http.get(proc.url + "/metrics") as resp:
        text = await resp.text()
    assert "wa_router_config_last_reload_successful 0.0" in text
    assert 'wa_router_config_reloads_total{result="failure"} 1.0' in text
    async with aiohttp.ClientSession() as http, http.get(proc.url + "/readyz") as resp:
        assert resp.status == 200  # still serving with the last good config
    assert any("config reload (sighup) rejected" in line for line in proc.lines)

    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0


async def test_sigterm_finishes_requests_in_flight_and_refuses_new_connections(
    sim_fleet: SimFleetFactory,
    router_process: Callable[..., Awaitable[RouterProcess]],
    tmp_path: Path,
) -> None:
    fleet = sim_fleet(1, api_key=INSTANCE_KEY, start_delay=0.05)
    sim = fleet[0]
    path = tmp_path / "router.yaml"
    write(path, config_text(fleet_insts(fleet)))
    proc = await router_process(path, "--drain-timeout", "10")
    headers = {"X-Api-Key": ROUTER_KEY}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{proc.url}/api/sessions", json={"name": "t1"}) as resp:
            assert resp.status == 201
        await sim.wait_session("t1")
        await sim.fault("slow", delay=2.0, paths="/api/sendText", count=5)

        async def send(i: int) -> tuple[int, str]:
            body = {"session": "t1", "chatId": "1@c.us", "text": f"term-{i}"}
            async with http.post(f"{proc.url}/api/sendText", json=body) as resp:
                return resp.status, await resp.text()

        sends = [asyncio.create_task(send(i)) for i in range(5)]
        await all_arrived(sim)

        proc.signal(signal.SIGTERM)
        host, port = proc.url.removeprefix("http://").rsplit(":", 1)
        refused = False
        async with asyncio.timeout(1.5):
            while not refused:
                try:
                    _, writer = await asyncio.open_connection(host, int(port))
                except ConnectionRefusedError:
                    refused = True
                else:
                    writer.close()
                    await asyncio.sleep(0.01)  # polling another process
        assert not any(t.done() for t in sends)  # refused while they were in flight
        results = await asyncio.gather(*sends)
    assert [status for status, _ in results] == [201] * 5, results
    assert await proc.wait() == 0
    assert sorted(r["text"] for r in fleet.sent()) == [f"term-{i}" for i in range(5)]
    assert any("router stopped" in line for line in proc.lines)
