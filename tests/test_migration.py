"""Drain, move and rebalance against real simulator processes and a real router."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from router.config import DiscoveryConfig
from router.instances import AdminState
from router.migration import Migration, MoveError
from tests.support.router import INSTANCE_KEY, RouterHandle, StartRouter
from tests.support.simulator import SimFleet, SimFleetFactory, SimProcess

RUNNING = {"STARTING", "SCAN_QR_CODE", "WORKING"}


async def bulk(proc: SimProcess, **body: Any) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{proc.url}/_sim/bulk_sessions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def running_on(proc: SimProcess) -> set[str]:
    return {s["name"] for s in (await proc.state())["sessions"] if s["status"] in RUNNING}


async def fleet_router(
    sim_fleet: SimFleetFactory, start_router: StartRouter, n: int, **kwargs: Any
) -> tuple[SimFleet, RouterHandle, Migration]:
    fleet = sim_fleet(n, api_key=INSTANCE_KEY, start_delay=0.05)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], **kwargs)
    migration = router.runtime.migration
    assert migration is not None
    return fleet, router, migration


async def create(http: aiohttp.ClientSession, router: RouterHandle, name: str) -> None:
    async with http.post(f"{router.url}/api/sessions", json={"name": name}) as resp:
        assert resp.status == 201, await resp.text()


async def send(http: aiohttp.ClientSession, router: RouterHandle, session: str, text: str) -> int:
    body = {"session": session, "chatId": "1@c.us", "text": text}
    async with http.post(f"{router.url}/api/sendText", json=body) as resp:
        await resp.read()
        return resp.status


async def test_drain_moves_every_session_one_copy_at_a_time_and_loses_no_message(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router, migration = await fleet_router(
        sim_fleet,
        start_router,
        3,
        discovery=DiscoveryConfig(interval=0, migrate_concurrency=3),
    )
    rt = router.runtime
    names = [f"d{i}" for i in range(15)]
    async with router.client() as http:
        for name in names:
            await create(http, router, name)
        for name in names:
            owner = rt.smap.cached(name)
            assert owner is not None
            await fleet.by_name(owner).wait_session(name)
        victims = rt.smap.sessions_on("wa-1")
        assert len(victims) == 5
        source, targets = fleet.by_name("wa-1"), [fleet.by_name("wa-2"), fleet.by_name("wa-3")]

        overlaps: list[tuple[str, str]] = []
        done = asyncio.Event()

        async def watch() -> None:
            # Targets first, then the source: a session seen on a target and
            # *afterwards* still on the source ran on both at once (it moves
            # source -> target only, never back).
            while not done.is_set():
                on_targets: dict[str, str] = {}
                for proc in targets:
                    for s in await running_on(proc):
                        if s in on_targets:
                            overlaps.append((s, f"{on_targets[s]}+{proc.name}"))
                        on_targets[s] = proc.name
                for s in await running_on(source) & on_targets.keys():
                    overlaps.append((s, f"{on_targets[s]}+{source.name}"))

        acked: list[str] = []

        async def sender() -> None:
            # A client that retries what the router refused (never what it accepted).
            i = 0
            while not done.is_set() or i < 2 * len(victims):
                session = victims[i % len(victims)]
                text = f"{session}-{i}"
                deadline = time.monotonic() + 20
                while (status := await send(http, router, session, text)) != 201:
                    assert status in (404, 422, 502, 503), status
                    assert time.monotonic() < deadline, f"{text}: still {status}"
                    await asyncio.sleep(0.01)  # client back-off, not synchronisation
                acked.append(text)
                i += 1

        watcher, sending = asyncio.create_task(watch()), asyncio.create_task(sender())
        job = await migration.drain("wa-1")
        assert await job.wait(30)
        done.set()
        await asyncio.gather(watcher, sending)

    summary = job.as_dict()
    assert summary["state"] == "done"
    assert (summary["moved"], summary["failed"], summary["total"]) == (5, 0, 5)
    assert overlaps == []
    assert rt.smap.sessions_on("wa-1") == []
    assert await running_on(source) == set()
    for name in victims:
        owner = rt.smap.cached(name)
        assert owner in ("wa-2", "wa-3")
        assert await fleet.by_name(owner).session_status(name) == "WORKING"
    counts = dict(rt.smap.counts())
    assert counts == {"wa-2": 7, "wa-3": 8} or counts == {"wa-2": 8, "wa-3": 7}

    # Every acknowledged message was delivered, exactly once; nothing else was.
    recorded = Counter(r["text"] for r in fleet.sent())
    assert sorted(recorded) == sorted(acked)
    assert set(recorded.values()) == {1}
    assert len(acked) >= 2 * len(victims)
    moves = [e for e in rt.events.recent(100, "move") if e["reason"] == "drain"]
    assert len(moves) == 5 and all(e["ok"] for e in moves)

    # Draining: no new session lands on wa-1.
    drained = rt.fleet.get("wa-1")
    assert drained is not None and drained.admin is AdminState.DRAINING
    async with router.client() as http:
        await create(http, router, "after-drain")
    assert rt.smap.cached("after-drain") != "wa-1"


async def test_move_to_a_named_instance_and_the_requests_it_refuses(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router, migration = await fleet_router(sim_fleet, start_router, 3)
    rt = router.runtime
    async with router.client() as http:
        await create(http, router, "m1")
        await fleet.by_name(rt.smap.cached("m1") or "").wait_session("m1")
    source = rt.smap.cached("m1")
    target = "wa-3" if source != "wa-3" else "wa-2"

    result = await migration.move("m1", target)
    assert result.ok and result.outcome == "moved", result
    assert (result.source, result.target) == (source, target)
    assert rt.smap.cached("m1") == target
    # Moved once it runs there; it is READY (WORKING) right after.
    await fleet.by_name(target).wait_session("m1")
    assert await fleet.by_name(source or "").session_status("m1") == "STOPPED"

    again = await migration.move("m1", target)
    assert again.ok and again.outcome == "already_there"

    with pytest.raises(MoveError) as err:
        await migration.move("m1", "nowhere")
    assert (err.value.status, err.value.error) == (404, "unknown_instance")
    with pytest.raises(MoveError) as err:
        await migration.move("ghost", target)
    assert (err.value.status, err.value.error) == (404, "unknown_session")
    other = next(n for n in ("wa-1", "wa-2", "wa-3") if n != target)
    migration.maintenance(other)
    with pytest.raises(MoveError) as err:
        await migration.move("m1", other)
    assert (err.value.status, err.value.error) == (409, "target_not_active")
    assert rt.fleet.get(other).admin is AdminState.MAINTENANCE  # type: ignore[union-attr]
    migration.undrain(other)
    assert rt.fleet.get(other).admin is AdminState.ACTIVE  # type: ignore[union-attr]
    assert [e["new"] for e in rt.events.recent(10, "admin_state")] == ["maintenance", "active"]

    # Undrain before the drain got going: it stops, having moved nothing.
    job = await migration.drain(target)
    assert await migration.drain(target) is job  # one drain per instance at a time
    migration.undrain(target)
    assert await job.wait(5)
    assert (job.state, job.moved) == ("cancelled", 0)
    assert rt.smap.cached("m1") == target
    assert rt.fleet.get(target).admin is AdminState.ACTIVE  # type: ignore[union-attr]


async def test_a_failed_start_rolls_back_to_the_old_instance(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router, migration = await fleet_router(sim_fleet, start_router, 2)
    rt = router.runtime
    await bulk(fleet[0], names=["rb"], auth=True)
    assert rt.discovery is not None
    await rt.discovery.reconcile_now()
    assert rt.smap.cached("rb") == "wa-1"
    # wa-2 answers every session call with a 500: it cannot take the session.
    await fleet[1].fault("error", status=500, paths="/api/sessions")

    result = await migration.move("rb", "wa-2")
    assert not result.ok
    assert result.error == "start_failed", result
    assert rt.smap.cached("rb") == "wa-1"
    await fleet[0].wait_session("rb")
    assert await running_on(fleet[1]) == set()
    [event] = rt.events.recent(10, "move")
    assert event["error"] == "start_failed" and event["source"] == "wa-1"


async def test_rebalance_moves_from_the_most_to_the_least_loaded_within_bounds(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY, start_delay=0.05)
    await bulk(fleet[0], prefix="r", count=8, auth=True)
    router = await start_router(
        fleet.urls,
        names=[p.name for p in fleet],
        max_sessions=10,
        discovery=DiscoveryConfig(
            interval=0, rebalance=True, rebalance_threshold=0.25, migrate_concurrency=2
        ),
    )
    rt = router.runtime
    migration = rt.migration
    assert migration is not None
    assert dict(rt.smap.counts()) == {"wa-1": 8}

    first = await migration.rebalance()  # at most migrate_concurrency moves a round
    assert [r.outcome for r in first] == ["moved", "moved"]
    assert dict(rt.smap.counts()) == {"wa-1": 6, "wa-2": 2}
    second = await migration.rebalance()
    assert [r.outcome for r in second] == ["moved"]
    assert dict(rt.smap.counts()) == {"wa-1": 5, "wa-2": 3}  # spread 0.2 <= 0.25
    assert await migration.rebalance() == []
    for s, owner in ((f"r{i}", rt.smap.cached(f"r{i}")) for i in range(8)):
        assert owner is not None
        await fleet.by_name(owner).wait_session(s)
    assert len(await running_on(fleet[0])) == 5
    assert len(await running_on(fleet[1])) == 3


async def test_the_reconcile_loop_runs_rebalance_when_enabled(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY, start_delay=0.05)
    await bulk(fleet[0], prefix="q", count=4, auth=True)
    router = await start_router(
        fleet.urls,
        names=[p.name for p in fleet],
        max_sessions=4,
        discovery=DiscoveryConfig(interval=0.05, rebalance=True, rebalance_threshold=0.5),
    )
    rt = router.runtime
    deadline = time.monotonic() + 10
    while dict(rt.smap.counts()) != {"wa-1": 3, "wa-2": 1}:  # 0.75 - 0.25 <= 0.5
        assert time.monotonic() < deadline, dict(rt.smap.counts())
        await asyncio.sleep(0.02)  # polling "until state X", with a deadline
    assert rt.events.recent(10, "rebalance")


async def test_drain_on_a_blazz_fleet_keeps_workspace_and_login(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, dialect="blazz", api_key=INSTANCE_KEY, start_delay=0.05)
    ids = [f"webjs_7_1700000000_abcd000{i}" for i in range(3)]
    await bulk(fleet[0], names=ids, workspace_id=7, auth=True)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], adapter="blazz")
    rt = router.runtime
    migration = rt.migration
    assert migration is not None
    assert rt.smap.sessions_on("blazz-1") == ids

    job = await migration.drain("blazz-1")
    assert await job.wait(20)
    assert (job.moved, job.failed) == (3, 0), job.as_dict()
    for s in ids:
        await fleet[1].wait_session(s)
    state = await fleet[1].state()
    assert sorted(s["name"] for s in state["sessions"] if s["status"] == "WORKING") == ids
    assert {s["workspace_id"] for s in state["sessions"]} == {7}
    assert (await fleet[0].state())["sessions"] == []  # Blazz's DELETE: gone, auth kept
    assert all(fleet.auth_file(s).exists() for s in ids)
