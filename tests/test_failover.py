"""Failover against real simulated instance processes: SIGKILL, SIGSTOP,
restart with empty memory, "session not found", faults, both stores.

Every test that sends checks the simulators' shared send record: no message
may ever be delivered twice.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from typing import Any

import aiohttp
import pytest

from router.config import FailoverConfig, HealthConfig, OutlierConfig, Timeouts
from tests.support.metrics import scrape
from tests.support.router import (
    INSTANCE_KEY,
    RouterHandle,
    StartRouter,
    create_ready,
    router_config,
)
from tests.support.simulator import SimFleet, SimFleetFactory, where_running


@pytest.fixture(params=["memory", "redis"])
def store_kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    return {
        "store": request.getfixturevalue("redis_url"),
        "key_prefix": request.getfixturevalue("redis_prefix"),
    }


async def setup(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    n: int = 3,
    dialect: str = "waha",
    **kwargs: Any,
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(n, api_key=INSTANCE_KEY, dialect=dialect)
    cfg = router_config(
        fleet.urls,
        names=[p.name for p in fleet],
        adapter=dialect,
        **{k: v for k, v in kwargs.items() if k not in ("failover", "outlier")},
    )
    import dataclasses

    cfg = dataclasses.replace(
        cfg,
        failover=kwargs.get("failover", FailoverConfig(wait=10, ready_timeout=5)),
        outlier=kwargs.get("outlier", OutlierConfig()),
    )
    router = await start_router(config=cfg)
    return fleet, router


async def send(
    http: aiohttp.ClientSession, router: RouterHandle, session: str, text: str, **headers: str
) -> tuple[int, dict[str, Any]]:
    body = {"session": session, "chatId": "1@c.us", "text": text}
    async with http.post(f"{router.url}/api/sendText", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def assert_no_duplicates(fleet: SimFleet) -> None:
    texts = Counter((r["session"], r["text"]) for r in fleet.sent())
    assert [k for k, n in texts.items() if n > 1] == []


async def test_sigkill_owner_sessions_come_back_on_another_instance(
    sim_fleet: SimFleetFactory, start_router: StartRouter, store_kwargs: dict[str, Any]
) -> None:
    fleet, router = await setup(sim_fleet, start_router, **store_kwargs)
    async with router.client() as http:
        owners = {s: await create_ready(http, router, fleet, s) for s in ("k1", "k2", "k3", "k4")}
        victim = owners["k1"]
        fleet.by_name(victim).kill()
        affected = [s for s, o in owners.items() if o == victim]
        # A send (non-idempotent) whose connection is refused provably never
        # arrived: it is replayed on the restored session.
        for s in affected:
            status, body = await send(http, router, s, f"after-kill {s}")
            assert status == 201, body
            async with http.get(f"{router.url}/api/{s}/me") as resp:
                assert resp.status == 200
                assert (await resp.json())["instance"] != victim
            assert router.runtime.smap.cached(s) not in (None, victim)
            assert await where_running(fleet, s) == [router.runtime.smap.cached(s)]
    assert sorted(r["text"] for r in fleet.sent()) == sorted(f"after-kill {s}" for s in affected)
    events = router.runtime.events.recent(kind="failover")
    assert {e["session"] for e in events} == set(affected)
    assert all(e["outcome"] == "restored" for e in events)


async def test_many_waiting_requests_share_one_restore(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(sim_fleet, start_router)
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "busy")
        fleet.by_name(owner).kill()
        results = await asyncio.gather(
            *(send(http, router, "busy", f"m{i}") for i in range(20)),
            *(http.get(f"{router.url}/api/busy/me") for _ in range(10)),
        )
    statuses = [r[0] for r in results[:20]] + [r.status for r in results[20:]]  # type: ignore[union-attr,index]
    assert statuses == [201] * 20 + [200] * 10
    assert len(await where_running(fleet, "busy")) == 1
    assert len(router.runtime.events.recent(kind="failover")) == 1
    assert sorted(r["text"] for r in fleet.sent("busy")) == sorted(f"m{i}" for i in range(20))


async def test_restarted_owner_answers_session_not_found_and_is_recovered(
    sim_fleet: SimFleetFactory, start_router: StartRouter, store_kwargs: dict[str, Any]
) -> None:
    # Slow health checks: the restart must be seen through "session not found",
    # not through the owner being marked down while it restarts.
    slow = HealthConfig(interval=30, timeout=1, rise=1, fall=3)
    fleet, router = await setup(sim_fleet, start_router, health=slow, **store_kwargs)
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "amnesia")
        await fleet.by_name(owner).restart_async()  # same port, empty memory
        status, body = await send(http, router, "amnesia", "hello again")
        assert status == 201, body
    assert len(await where_running(fleet, "amnesia")) == 1
    assert [r["text"] for r in fleet.sent("amnesia")] == ["hello again"]
    assert router.runtime.events.recent(kind="failover")[-1]["reason"] == "session_missing"


async def test_blazz_session_not_found_is_recovered(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    slow = HealthConfig(interval=30, timeout=1, rise=1, fall=3)
    fleet, router = await setup(sim_fleet, start_router, n=2, dialect="blazz", health=slow)
    session = "webjs_7_1700000000_abcd1234"
    payload = {"session_id": session, "workspace_id": 7, "account_id": 1, "priority": 1}
    async with router.client() as http:
        async with http.post(f"{router.url}/api/sessions", json=payload) as resp:
            assert resp.status in (200, 201), await resp.text()
        owner = router.runtime.smap.cached(session)
        assert owner is not None
        await fleet.by_name(owner).wait_session(session)  # internal status names are WAHA's
        await fleet.by_name(owner).restart_async()
        msg = {
            "session_id": session,
            "workspace_id": 7,
            "recipient_phone": "123",
            "message": "hi blazz",
            "type": "text",
        }
        async with http.post(f"{router.url}/api/messages/send", json=msg) as resp:
            assert resp.status == 200, await resp.text()
    assert [r["text"] for r in fleet.sent(session)] == ["hi blazz"]


async def test_response_lost_after_delivery_is_not_replayed(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(sim_fleet, start_router, n=2)
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "lossy")
        await fleet.by_name(owner).fault("drop_after", count=1, paths="/api/sendText")
        status, body = await send(http, router, "lossy", "exactly once")
        assert status == 502
        assert body["error"] == "upstream_error"
        assert body["session"] == "lossy"
    # The instance received and acted on it: replaying would send it twice.
    assert [r["text"] for r in fleet.sent("lossy")] == ["exactly once"]


async def test_hung_owner_times_out_sends_without_duplicates_and_recovers_reads(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(
        sim_fleet,
        start_router,
        timeouts=Timeouts(connect=0.5, read=0.5, idle_keepalive=4.0),
    )
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "frozen")
        # Keep a pooled connection to the owner, then freeze the process.
        async with http.get(f"{router.url}/api/frozen/me") as resp:
            assert resp.status == 200
        fleet.by_name(owner).pause()
        try:
            status, body = await send(http, router, "frozen", "maybe")
            assert status == 504
            assert body["error"] == "upstream_timeout"
            # Once health checks mark the owner down, reads fail over.
            while router.runtime.fleet.get(owner).healthy:  # type: ignore[union-attr]
                await router.server.health.wait_round()  # type: ignore[union-attr]
            async with http.get(f"{router.url}/api/frozen/me") as resp:
                assert resp.status == 200
                assert (await resp.json())["instance"] != owner
        finally:
            fleet.by_name(owner).resume()
    assert_no_duplicates(fleet)


async def test_idempotency_key_answers_repeats_from_the_first_result(
    sim_fleet: SimFleetFactory, start_router: StartRouter, store_kwargs: dict[str, Any]
) -> None:
    fleet, router = await setup(sim_fleet, start_router, n=2, **store_kwargs)
    async with router.client() as http:
        await create_ready(http, router, fleet, "idem")
        first = await send(http, router, "idem", "once", **{"Idempotency-Key": "abc"})
        again = await send(http, router, "idem", "once", **{"Idempotency-Key": "abc"})
        other = await send(http, router, "idem", "once", **{"Idempotency-Key": "def"})
        assert first[0] == again[0] == other[0] == 201
        assert first[1] == again[1]
        assert other[1]["id"] != first[1]["id"]
        body = {"session": "idem", "chatId": "1@c.us", "text": "once"}
        async with http.post(
            f"{router.url}/api/sendText", json=body, headers={"Idempotency-Key": "abc"}
        ) as resp:
            assert resp.headers.get("Idempotent-Replayed") == "true"
    assert len(fleet.sent("idem")) == 2


async def test_no_instance_left_gives_503_with_retry_after(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(
        sim_fleet, start_router, n=2, failover=FailoverConfig(wait=3, ready_timeout=1)
    )
    async with router.client() as http:
        await create_ready(http, router, fleet, "alone")
        for proc in fleet:
            proc.kill()
        status, body = await send(http, router, "alone", "nobody home")
        async with http.get(f"{router.url}/api/alone/me") as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) > 0
    assert status == 503
    assert body["error"] == "session_unavailable"
    assert body["session"] == "alone"
    assert fleet.sent() == []


async def test_passive_outlier_detection_ejects_an_erroring_instance(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(
        sim_fleet,
        start_router,
        n=3,
        outlier=OutlierConfig(consecutive_failures=3, base_ejection=30, max_ejected_percent=34),
    )
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "flaky")
        await fleet.by_name(owner).fault("error", status=503, paths="/api/flaky")
        for _ in range(3):
            async with http.get(f"{router.url}/api/flaky/me") as resp:
                assert resp.status == 503  # an upstream 5xx with a body passes through
        inst = router.runtime.fleet.get(owner)
        assert inst is not None and not inst.healthy
        # Never more than max_ejected_percent of the fleet: a second one stays in.
        other = await create_ready(http, router, fleet, "flaky2")
        assert other != owner
        await fleet.by_name(other).fault("error", status=502, paths="/api/flaky2")
        for _ in range(4):
            async with http.get(f"{router.url}/api/flaky2/me") as resp:
                assert resp.status == 502
    ejected = router.runtime.events.recent(kind="ejected")
    assert [e["instance"] for e in ejected] == [owner]
    assert sum(1 for i in router.runtime.fleet if not i.healthy) == 1


async def test_application_500s_never_eject_a_healthy_instance(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """Blazz answers 500 for a failed send or create of one session: that
    instance is alive, and ejecting it would fail over every session on it."""
    fleet, router = await setup(
        sim_fleet,
        start_router,
        n=3,
        outlier=OutlierConfig(consecutive_failures=3, base_ejection=30, max_ejected_percent=34),
    )
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "app-errors")
        await fleet.by_name(owner).fault("error", status=500, paths="/api/app-errors")
        for _ in range(10):
            async with http.get(f"{router.url}/api/app-errors/me") as resp:
                assert resp.status == 500
    inst = router.runtime.fleet.get(owner)
    assert inst is not None and inst.healthy
    assert router.runtime.events.recent(kind="ejected") == []
    assert router.runtime.smap.cached("app-errors") == owner


async def test_sigkill_during_steady_load_loses_no_idempotent_request(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await setup(sim_fleet, start_router, n=3)
    sessions = [f"load{i}" for i in range(30)]
    async with router.client() as http:
        for s in sessions:
            await create_ready(http, router, fleet, s)
        victim = router.runtime.smap.cached(sessions[0])
        assert victim is not None
        stop = asyncio.Event()
        statuses: Counter[int] = Counter()

        async def reader(s: str) -> None:
            while not stop.is_set():
                async with http.get(f"{router.url}/api/{s}/me") as resp:
                    statuses[resp.status] += 1

        tasks = [asyncio.create_task(reader(s)) for s in sessions]
        await asyncio.sleep(0.3)  # steady load before the kill (the scenario)
        fleet.by_name(victim).kill(signal.SIGKILL)
        deadline = asyncio.get_running_loop().time() + 10
        while any(router.runtime.smap.cached(s) == victim for s in sessions):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
    assert set(statuses) == {200}, statuses


async def test_idle_sessions_of_a_down_instance_come_back_without_a_request(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """A session that only receives messages sends no request: when health
    checks take its instance down, it must be recovered all the same."""
    fleet, router = await setup(sim_fleet, start_router, n=3)
    async with router.client() as http:
        owners = {
            s: await create_ready(http, router, fleet, s) for s in (f"idle{i}" for i in range(9))
        }
    victim = owners["idle0"]
    affected = [s for s, o in owners.items() if o == victim]
    fleet.by_name(victim).kill()
    deadline = asyncio.get_running_loop().time() + 10
    while any(router.runtime.smap.cached(s) in (None, victim) for s in affected):
        assert asyncio.get_running_loop().time() < deadline, {
            s: router.runtime.smap.cached(s) for s in affected
        }
        await asyncio.sleep(0.05)
    for s in affected:
        assert await where_running(fleet, s) == [router.runtime.smap.cached(s)]
    evacuations = router.runtime.events.recent(kind="evacuate")
    assert [e["instance"] for e in evacuations] == [victim]


async def test_create_of_a_session_whose_owner_died_recovers_it_without_deadlock(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """A create for a mapped session must not hold the session lock while the
    failover it triggers needs that same lock."""
    fleet, router = await setup(
        sim_fleet, start_router, failover=FailoverConfig(wait=10, ready_timeout=8)
    )
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "again")
        fleet.by_name(owner).kill()
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with http.post(f"{router.url}/api/sessions", json={"name": "again"}) as resp:
            # The restored session already exists on its new instance: WAHA's 422.
            assert resp.status in (200, 201, 422), await resp.text()
        assert loop.time() - started < 5
    assert len(await where_running(fleet, "again")) == 1
    assert router.runtime.smap.cached("again") not in (None, owner)


async def test_a_create_is_not_placed_while_an_instance_cannot_say_it_lacks_the_session(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """'Could not ask' is not 'not running': a hung instance may run it already."""
    fleet, router = await setup(sim_fleet, start_router, n=2)
    fleet[0].pause()
    try:
        async with router.client() as http:
            async with http.post(f"{router.url}/api/sessions", json={"name": "fresh"}) as resp:
                assert resp.status == 503
                body = await resp.json()
    finally:
        fleet[0].resume()
    assert body["error"] == "session_unknown"
    assert body["session"] == "fresh"
    assert router.runtime.smap.cached("fresh") is None
    assert await where_running(fleet, "fresh") == []


async def test_a_failover_moves_the_failover_metrics_on_a_real_metrics_endpoint(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """wa_router_failovers_total and wa_router_restore_duration_seconds feed two
    alerts and two dashboard panels: a SIGKILLed owner must move both."""
    fleet, router = await setup(sim_fleet, start_router)
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "metrics-fo")
        before = await scrape(http, router.url)
        fleet.by_name(owner).kill()
        status, body = await send(http, router, "metrics-fo", "after the kill")
        assert status == 201, body
        after = await scrape(http, router.url)
    new_owner = router.runtime.smap.cached("metrics-fo")
    assert new_owner not in (None, owner)
    restored = after.delta(before, "wa_router_failovers_total", outcome="restored")
    assert restored >= 1, after.series("wa_router_failovers_total")
    assert after.delta(before, "wa_router_restore_duration_seconds_count") >= 1
    # The time is the restore's own: positive, and within the configured wait.
    took = after.delta(before, "wa_router_restore_duration_seconds_sum")
    assert 0 < took < 10
    assert fleet.sent("metrics-fo") and len(fleet.sent("metrics-fo")) == 1
