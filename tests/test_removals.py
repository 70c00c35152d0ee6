"""A session a client removed stays removed (router/removals.py).

Before, ``DELETE /api/sessions/tmp1`` then ``GET /api/tmp1/me`` made the router
"fail over" and start tmp1 again on another instance. Real simulator
processes; two replicas share a private redis-server.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.support.router import INSTANCE_KEY, RouterHandle, StartRouter, create_ready, next_event
from tests.support.simulator import SimFleet, SimFleetFactory


async def running_on(fleet: SimFleet, session: str) -> list[str]:
    found = []
    for proc in fleet:
        if proc.alive and await proc.session_status(session) in ("STARTING", "WORKING"):
            found.append(proc.name)
    return found


async def get_me(
    http: aiohttp.ClientSession, router: RouterHandle, session: str
) -> tuple[int, Any]:
    async with http.get(f"{router.url}/api/{session}/me") as resp:
        return resp.status, await resp.json()


async def test_a_deleted_session_is_not_started_again(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet])
    async with router.client() as http:
        await create_ready(http, router, fleet, "tmp1")
        async with http.delete(f"{router.url}/api/sessions/tmp1") as resp:
            assert resp.status == 200, await resp.text()
        for _ in range(3):
            status, body = await get_me(http, router, "tmp1")
            assert (status, body["error"]) == (404, "unknown_session"), body
        assert await running_on(fleet, "tmp1") == []
        assert router.runtime.smap.cached("tmp1") is None
        assert [e["session"] for e in router.runtime.events.recent(kind="removed")] == ["tmp1"]
        assert router.runtime.events.recent(kind="failover") == []
        # A create brings it back, like any new session.
        await create_ready(http, router, fleet, "tmp1")
        status, _ = await get_me(http, router, "tmp1")
        assert status == 200


async def test_a_stopped_session_stays_stopped_until_started_where_it_was(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet])
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "tmp2")
        async with http.post(f"{router.url}/api/sessions/tmp2/stop") as resp:
            assert resp.status in (200, 201), await resp.text()
        status, body = await get_me(http, router, "tmp2")
        assert (status, body["error"]) == (404, "unknown_session"), body
        assert await running_on(fleet, "tmp2") == []
        # WAHA keeps the stopped session: starting it again goes back there.
        async with http.post(f"{router.url}/api/sessions/tmp2/start") as resp:
            assert resp.status in (200, 201), await resp.text()
        assert router.runtime.smap.cached("tmp2") == owner
        await fleet.by_name(owner).wait_session("tmp2")
        status, _ = await get_me(http, router, "tmp2")
        assert status == 200


async def test_evacuating_a_dead_instance_skips_what_a_client_removed(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], max_sessions=[10, 10])
    async with router.client() as http:
        names = [f"ev{i}" for i in range(4)]
        owners = {n: await create_ready(http, router, fleet, n) for n in names}
        victim = owners["ev0"]
        gone = [n for n in names if owners[n] == victim]
        kept = gone[1:]
        async with http.delete(f"{router.url}/api/sessions/{gone[0]}") as resp:
            assert resp.status == 200
        down = next_event(router.runtime, "down", within=20, instance=victim)
        fleet.by_name(victim).kill()
        await down
        await router.runtime.failover.evacuate(router.runtime.fleet.get(victim))  # type: ignore[arg-type]
        for n in kept:
            assert await running_on(fleet, n) != []
        assert await running_on(fleet, gone[0]) == []
        status, _ = await get_me(http, router, gone[0])
        assert status == 404


async def test_a_delete_through_one_replica_holds_on_the_other(
    sim_fleet: SimFleetFactory, start_router: StartRouter, redis_url: str, redis_prefix: str
) -> None:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    kwargs: dict[str, Any] = {
        "names": [p.name for p in fleet],
        "store": redis_url,
        "key_prefix": redis_prefix,
    }
    a = await start_router(fleet.urls, **kwargs)
    b = await start_router(fleet.urls, **kwargs)
    async with a.client() as http_a, b.client() as http_b:
        await create_ready(http_a, a, fleet, "shared")
        status, _ = await get_me(http_b, b, "shared")
        assert status == 200  # b knows it (and caches it)
        async with http_a.delete(f"{a.url}/api/sessions/shared") as resp:
            assert resp.status == 200
        status, body = await get_me(http_b, b, "shared")
        assert (status, body["error"]) == (404, "unknown_session"), body
        assert await running_on(fleet, "shared") == []
        assert b.runtime.events.recent(kind="failover") == []


async def test_discovery_takes_a_session_stopped_on_its_instance_as_removed(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet])
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "outside")
        # Stopped on the instance itself, not through the router.
        proc = fleet.by_name(owner)
        async with aiohttp.ClientSession(headers={"X-Api-Key": INSTANCE_KEY}) as direct:
            async with direct.post(f"{proc.url}/api/sessions/outside/stop") as resp:
                assert resp.status in (200, 201)
        assert router.runtime.discovery is not None
        await router.runtime.discovery.reconcile_now()
        status, body = await get_me(http, router, "outside")
        assert (status, body["error"]) == (404, "unknown_session"), body
        assert await running_on(fleet, "outside") == []
