"""Rediscovery at start and reconciliation, against real simulator processes.

Sessions are put on the instances behind the router's back (the simulator's
``/_sim/bulk_sessions`` or its own API), as after a router restart or an
operator acting on an instance directly.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import aiohttp

from router.adapters.base import SessionInfo, SessionStatus
from router.config import DiscoveryConfig, InstanceConfig
from router.discovery import pick_owner
from router.instances import Instance
from tests.support.router import INSTANCE_KEY, RouterHandle, StartRouter
from tests.support.simulator import SimFleet, SimFleetFactory, SimProcess


async def bulk(proc: SimProcess, **body: Any) -> int:
    """Sessions straight into a simulator's memory (WORKING unless ``status``)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proc.url}/_sim/bulk_sessions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        created: int = (await resp.json())["created"]
        return created


async def direct(proc: SimProcess, method: str, path: str, body: Any = None) -> int:
    """A WAHA call straight to an instance, with the instance key."""
    async with (
        aiohttp.ClientSession(headers={"X-Api-Key": INSTANCE_KEY}) as http,
        http.request(method, proc.url + path, json=body) as resp,
    ):
        await resp.read()
        return resp.status


async def router_for(fleet: SimFleet, start_router: StartRouter, **kwargs: Any) -> RouterHandle:
    return await start_router(fleet.urls, names=[p.name for p in fleet], **kwargs)


def kinds(router: RouterHandle, kind: str) -> list[dict[str, Any]]:
    return router.runtime.events.recent(500, kind)


async def test_discovery_at_start_maps_sessions_and_routes_without_probing(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["a1", "a2"])
    await bulk(fleet[1], names=["b1"], status="STOPPED")
    await bulk(fleet[2], names=["c1"])
    router = await router_for(fleet, start_router)
    rt = router.runtime
    assert {s: rt.smap.cached(s) for s in ("a1", "a2", "b1", "c1")} == {
        "a1": "wa-1",
        "a2": "wa-1",
        "b1": "wa-2",  # stopped there, but that is where it lives
        "c1": "wa-3",
    }
    [event] = kinds(router, "discovery")
    assert event["sessions"] == 4 and event["assigned"] == 4 and event["failed"] == []

    probes: list[str] = []
    real_probe = rt.adapter.probe

    async def counting_probe(
        http: aiohttp.ClientSession, inst: InstanceConfig, session: str
    ) -> SessionInfo | None:
        probes.append(session)
        return await real_probe(http, inst, session)

    rt.adapter.probe = counting_probe  # type: ignore[method-assign]
    async with router.client() as http:
        for session, owner in (("a1", "wa-1"), ("a2", "wa-1"), ("c1", "wa-3")):
            async with http.get(f"{router.url}/api/{session}/chats") as resp:
                assert resp.status == 200
                assert (await resp.json())["instance"] == owner
    assert probes == []


async def test_ten_thousand_sessions_on_four_instances_are_mapped_at_start(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(4, api_key=INSTANCE_KEY)
    for proc in fleet:
        assert await bulk(proc, prefix=f"{proc.name}-s", count=2500) == 2500
    t0 = time.monotonic()
    router = await router_for(fleet, start_router)
    startup = time.monotonic() - t0
    rt = router.runtime
    report = rt.discovery.last if rt.discovery is not None else None
    assert report is not None and report.initial
    print(
        f"\ndiscovery: {report.sessions} sessions on {len(report.listed)} instances "
        f"listed and mapped in {report.seconds:.3f}s (whole router start {startup:.3f}s)"
    )
    assert len(rt.smap) == 10_000
    assert dict(rt.smap.counts()) == {p.name: 2500 for p in fleet}
    assert rt.smap.cached("wa-3-s1234") == "wa-3"
    assert report.seconds < 10  # target 1 s; generous against a loaded CI box


async def test_reconcile_applies_an_owner_change_made_behind_the_routers_back(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY, start_delay=0.05)
    await bulk(fleet[0], names=["mover", "stayer"], auth=True)
    # The periodic loop does the work here: wait for rounds, not for time.
    router = await router_for(fleet, start_router, discovery=DiscoveryConfig(interval=0.05))
    rt = router.runtime
    assert rt.discovery is not None
    assert rt.smap.cached("mover") == "wa-1"

    assert await direct(fleet[0], "POST", "/api/sessions/mover/stop") == 201
    assert await direct(fleet[1], "POST", "/api/sessions/mover/start") == 201
    await fleet[1].wait_session("mover")
    # A round that started after the change has finished:
    await rt.discovery.wait_round(after=rt.discovery.rounds + 1)
    assert rt.smap.cached("mover") == "wa-2"
    assert rt.smap.cached("stayer") == "wa-1"
    changes = kinds(router, "owner_change")
    assert [(e["session"], e["old"], e["new"], e["cause"]) for e in changes] == [
        ("mover", "wa-1", "wa-2", "reconcile")
    ]
    async with router.client() as http, http.get(f"{router.url}/api/mover/chats") as resp:
        assert (await resp.json())["instance"] == "wa-2"


async def test_duplicates_are_reported_once_and_stopped_when_configured(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["dup"])
    await bulk(fleet[1], names=["dup"])
    await bulk(fleet[0], names=["half"], status="STARTING")  # stays STARTING
    await bulk(fleet[2], names=["half"])

    # Report only.
    watcher = await router_for(fleet, start_router)
    rt = watcher.runtime
    assert rt.discovery is not None
    assert rt.discovery.duplicates == {"dup": ("wa-1", "wa-2"), "half": ("wa-1", "wa-3")}
    # Owner: the READY copy beats config order; among READY copies config order.
    assert rt.smap.cached("dup") == "wa-1"
    assert rt.smap.cached("half") == "wa-3"
    await rt.discovery.reconcile_now()
    reported = kinds(watcher, "duplicate")
    assert sorted(e["session"] for e in reported) == ["dup", "half"]  # once each
    assert await fleet[1].session_status("dup") == "WORKING"
    assert await fleet[0].session_status("half") == "STARTING"

    # Stop the extra copies: keep the READY one, then the mapped one.
    stopper = await router_for(
        fleet, start_router, discovery=DiscoveryConfig(interval=0, stop_duplicates=True)
    )
    assert await fleet[1].session_status("dup") == "STOPPED"
    assert await fleet[0].session_status("dup") == "WORKING"
    assert await fleet[0].session_status("half") == "STOPPED"
    assert await fleet[2].session_status("half") == "WORKING"

    await bulk(fleet[1], names=["mapped"])
    srt = stopper.runtime
    assert srt.discovery is not None
    await srt.discovery.reconcile_now()
    assert srt.smap.cached("mapped") == "wa-2"
    await bulk(fleet[0], names=["mapped"])  # a second copy, first in config order
    await srt.discovery.reconcile_now()
    assert srt.smap.cached("mapped") == "wa-2"
    assert await fleet[0].session_status("mapped") == "STOPPED"
    assert await fleet[1].session_status("mapped") == "WORKING"
    stopped = [e for e in kinds(stopper, "duplicate") if e.get("action") == "stopped"]
    assert sorted((e["session"], e["instance"]) for e in stopped) == [
        ("dup", "wa-2"),
        ("half", "wa-1"),
        ("mapped", "wa-1"),
    ]
    await srt.discovery.reconcile_now()
    assert srt.discovery.duplicates == {}


async def test_an_orphan_is_forgotten_only_after_two_rounds(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["gone", "kept"])
    router = await router_for(fleet, start_router)
    rt = router.runtime
    discovery = rt.discovery
    assert discovery is not None
    assert await direct(fleet[0], "DELETE", "/api/sessions/gone") == 200

    first = await discovery.reconcile_now()
    assert first.orphans == ["gone"] and first.forgotten == []
    assert discovery.orphans == {"gone"}
    assert rt.smap.cached("gone") == "wa-1"  # one round is no proof

    second = await discovery.reconcile_now()
    assert second.forgotten == ["gone"]
    assert rt.smap.cached("gone") is None
    assert discovery.orphans == frozenset()
    assert rt.smap.cached("kept") == "wa-1"
    assert [e["action"] for e in kinds(router, "orphan")] == ["seen", "forgotten"]


async def test_sessions_of_an_instance_whose_list_failed_are_never_forgotten(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    await bulk(fleet[0], names=["x1"])
    await bulk(fleet[1], names=["x2"])
    await bulk(fleet[2], names=["x3"])
    router = await router_for(fleet, start_router)
    rt = router.runtime
    discovery = rt.discovery
    assert discovery is not None

    await fleet[1].fault("error", status=500, paths="/api/sessions")  # answers, with an error
    fleet[2].kill(signal.SIGKILL)  # does not answer at all
    for _ in range(3):
        result = await discovery.reconcile_now()
        assert sorted(result.failed) == ["wa-2", "wa-3"]
        assert result.orphans == []
    assert {s: rt.smap.cached(s) for s in ("x1", "x2", "x3")} == {
        "x1": "wa-1",
        "x2": "wa-2",
        "x3": "wa-3",
    }
    assert kinds(router, "orphan") == []

    # Once wa-2 lists again, what it really lacks is an orphan like any other.
    await fleet[1].fault("none")
    assert await direct(fleet[1], "DELETE", "/api/sessions/x2") == 200
    await discovery.reconcile_now()
    await discovery.reconcile_now()
    assert rt.smap.cached("x2") is None
    assert rt.smap.cached("x3") == "wa-3"


async def test_a_hint_is_trusted_only_after_a_probe(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    router = await router_for(fleet, start_router)
    rt = router.runtime
    discovery = rt.discovery
    assert discovery is not None
    await bulk(fleet[1], names=["h"])

    assert not await discovery.hint("h", "wa-1")  # wa-1 does not run it
    assert rt.smap.cached("h") is None
    assert not await discovery.hint("h", "nowhere")
    assert await discovery.hint("h", "wa-2")
    assert rt.smap.cached("h") == "wa-2"
    assert await discovery.hint("h", "wa-2")  # idempotent

    await bulk(fleet[0], names=["h"])
    assert not await discovery.hint("h", "wa-1")  # wa-2 still runs it: a duplicate
    assert rt.smap.cached("h") == "wa-2"
    assert await direct(fleet[1], "POST", "/api/sessions/h/stop") == 201
    assert await discovery.hint("h", "wa-1")
    assert rt.smap.cached("h") == "wa-1"
    assert [(e["old"], e["new"]) for e in kinds(router, "owner_change")] == [
        (None, "wa-2"),
        ("wa-2", "wa-1"),
    ]


def test_pick_owner_prefers_ready_then_the_mapped_copy_then_config_order() -> None:
    def inst(name: str) -> Instance:
        return Instance(InstanceConfig(name, "http://127.0.0.1:1"), None)  # type: ignore[arg-type]

    a, b, c = inst("a"), inst("b"), inst("c")
    order = {"a": 0, "b": 1, "c": 2}

    def copy(i: Instance, status: SessionStatus) -> tuple[Instance, SessionInfo]:
        return i, SessionInfo("s", status)

    ready_b = [copy(a, SessionStatus.STARTING), copy(b, SessionStatus.READY)]
    assert pick_owner(ready_b, "a", order)[0] is b
    both = [copy(a, SessionStatus.READY), copy(c, SessionStatus.READY)]
    assert pick_owner(both, "c", order)[0] is c
    assert pick_owner(both, None, order)[0] is a
    auth = [copy(a, SessionStatus.STOPPED), copy(b, SessionStatus.NEEDS_AUTH)]
    assert pick_owner(auth, "a", order)[0] is b
