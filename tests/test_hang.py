"""A hung instance (process alive, answers nothing: SIGSTOP) with the default
health settings: found out in about 2 s, what waits on it is released, its
sessions serve again from recovered copies, and when it wakes up it is fenced
(the sessions moved away are stopped there) before anything goes to it again.

Real simulator processes; the shared send record proves no send went twice.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from router.config import FailoverConfig, HealthConfig, Timeouts
from tests.support.router import (
    INSTANCE_KEY,
    RouterHandle,
    StartRouter,
    create_ready,
    next_event,
    router_config,
)
from tests.support.simulator import SimFleet, SimFleetFactory


async def hung_setup(
    sim_fleet: SimFleetFactory, start_router: StartRouter, **kwargs: Any
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    cfg = router_config(
        fleet.urls,
        names=[p.name for p in fleet],
        # The defaults under test: the health settings and a 30 s read timeout.
        health=HealthConfig(),
        timeouts=Timeouts(connect=1.0, read=30.0, idle_keepalive=4.0),
        failover=FailoverConfig(),
        **kwargs,
    )
    return fleet, await start_router(config=cfg)


async def test_a_hung_instance_is_down_within_two_seconds_and_releases_what_waits_on_it(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await hung_setup(sim_fleet, start_router)
    async with router.client() as http:
        names = [f"h{i}" for i in range(9)]
        owners = {n: await create_ready(http, router, fleet, n, wait=False) for n in names}
        for n in names:
            await fleet.by_name(owners[n]).wait_session(n)
        victim = owners["h0"]
        mine = [n for n in names if owners[n] == victim]
        assert mine
        proc = fleet.by_name(victim)

        # Requests already waiting on it when it freezes: reads, and one send.
        await proc.fault("slow", delay=2.0, paths="/api/")
        reads = [asyncio.ensure_future(http.get(f"{router.url}/api/{n}/me")) for n in mine]
        body = {"session": mine[0], "chatId": "1@c.us", "text": "in flight"}
        send = asyncio.ensure_future(
            http.post(f"{router.url}/api/sendText", json=body, headers={"Idempotency-Key": "k1"})
        )
        await asyncio.sleep(0.3)  # the requests are on their way (the scenario)
        down = next_event(router.runtime, "down", within=10, instance=victim)
        frozen_at = time.monotonic()
        proc.pause()
        try:
            down_at = await down
            assert down_at - frozen_at < 2.5, down_at - frozen_at

            # The send may have reached it: answered at once, outcome unknown.
            resp = await send
            answer = await resp.json()
            assert resp.status == 504, answer
            assert answer["error"] == "upstream_timeout" and answer["outcome"] == "unknown"
            assert time.monotonic() - frozen_at < 5  # not timeouts.read (30 s)
            # Its Idempotency-Key now says so too, rather than sending again.
            async with http.post(
                f"{router.url}/api/sendText", json=body, headers={"Idempotency-Key": "k1"}
            ) as again:
                assert again.status == 504
                assert again.headers.get("Idempotent-Replayed") == "true"

            # The reads were released and replayed to recovered copies.
            for r in reads:
                resp = await r
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["instance"] != victim
            first_new = time.monotonic()
            async with http.get(f"{router.url}/api/{mine[0]}/me") as resp:
                assert resp.status == 200
            assert time.monotonic() - first_new < 1.5
            # Every session of the hung instance serves within 5 s of it going down.
            for n in mine:
                async with http.get(f"{router.url}/api/{n}/me") as resp:
                    assert resp.status == 200, await resp.text()
            assert time.monotonic() - down_at < 5
            assert all(router.runtime.smap.cached(n) != victim for n in mine)
        finally:
            proc.resume()
    # The send that was in flight was not sent again by the router.
    assert len([r for r in fleet.sent(mine[0]) if r["text"] == "in flight"]) <= 1


async def test_a_hung_instance_that_wakes_up_is_fenced_before_it_serves_again(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await hung_setup(sim_fleet, start_router)
    async with router.client() as http:
        owners = {
            n: await create_ready(http, router, fleet, n, wait=False)
            for n in ("f0", "f1", "f2", "f3")
        }
        for n, o in owners.items():
            await fleet.by_name(o).wait_session(n)
        victim = owners["f0"]
        mine = [n for n, o in owners.items() if o == victim]
        proc = fleet.by_name(victim)
        down = next_event(router.runtime, "down", within=10, instance=victim)
        proc.pause()
        await down
        # Its sessions are evacuated: they run elsewhere now.
        for n in mine:
            async with http.get(f"{router.url}/api/{n}/me") as resp:
                assert resp.status == 200
        inst = router.runtime.fleet.get(victim)
        assert inst is not None and not inst.healthy
        healthy = next_event(router.runtime, "healthy", within=15, instance=victim)
        fenced = [
            next_event(router.runtime, "fenced", within=15, session=n, instance=victim)
            for n in mine
        ]
        proc.resume()  # it wakes up still running every session it had
        fenced_at = max(await asyncio.gather(*fenced))
        healthy_at = await healthy
        assert fenced_at <= healthy_at  # stopped there before anything is routed to it
        for n in mine:
            assert await proc.session_status(n) in (None, "STOPPED")
            owner = router.runtime.smap.cached(n)
            assert owner not in (None, victim)
            assert await fleet.by_name(owner).session_status(n) == "WORKING"


async def test_a_slow_but_alive_instance_is_not_declared_down(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await hung_setup(sim_fleet, start_router)
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "slow1")
        # A 3 s media send while /health answers at once (Node's loop is free).
        await fleet.by_name(owner).fault("slow", delay=3.0, paths="/api/sendText", count=1)
        body = {"session": "slow1", "chatId": "1@c.us", "text": "big media"}
        started = time.monotonic()
        async with http.post(f"{router.url}/api/sendText", json=body) as resp:
            assert resp.status == 201, await resp.text()
        assert time.monotonic() - started >= 3
    inst = router.runtime.fleet.get(owner)
    assert inst is not None and inst.healthy
    assert router.runtime.events.recent(kind="down") == []
    assert len(fleet.sent("slow1")) == 1


# -- a restored copy is not ready until the instance says so -------------------------


async def restore_setup(
    sim_fleet: SimFleetFactory, start_router: StartRouter, *, start_delay: float, wait: float = 20
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY, start_delay=start_delay, auto_auth=False)
    cfg = router_config(
        fleet.urls,
        names=[p.name for p in fleet],
        failover=FailoverConfig(wait=wait, ready_timeout=10),
    )
    return fleet, await start_router(config=cfg)


async def paired(
    http: aiohttp.ClientSession, router: RouterHandle, fleet: SimFleet, name: str
) -> str:
    owner = await create_ready(http, router, fleet, name, wait=False)
    proc = fleet.by_name(owner)
    await proc.wait_session(name, "SCAN_QR_CODE")
    await proc.pair(name)
    await proc.wait_session(name, within=10)
    return owner


async def send_text(
    http: aiohttp.ClientSession, router: RouterHandle, session: str, text: str
) -> tuple[int, dict[str, Any]]:
    body = {"session": session, "chatId": "1@c.us", "text": text}
    async with http.post(f"{router.url}/api/sendText", json=body) as resp:
        return resp.status, await resp.json()


async def test_requests_wait_for_a_restored_copy_to_be_ready(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await restore_setup(sim_fleet, start_router, start_delay=1.5)
    async with router.client() as http:
        owner = await paired(http, router, fleet, "slowstart")
        fleet.by_name(owner).kill()
        started = time.monotonic()
        status, body = await send_text(http, router, "slowstart", "after the crash")
        assert status == 201, body  # never the upstream's "not ready" from the new copy
        assert time.monotonic() - started >= 1.0  # it waited for the copy to be WORKING
        new = router.runtime.smap.cached("slowstart")
        assert new not in (None, owner)
        assert await fleet.by_name(new).session_status("slowstart") == "WORKING"
    assert len(fleet.sent("slowstart")) == 1


async def test_a_restored_copy_asking_for_a_qr_is_session_needs_auth(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await restore_setup(sim_fleet, start_router, start_delay=0.2)
    async with router.client() as http:
        owner = await paired(http, router, fleet, "lostlogin")
        fleet.auth_file("lostlogin").unlink()  # the stored login is gone
        fleet.by_name(owner).kill()
        payload = {"session": "lostlogin", "chatId": "1@c.us", "text": "hi"}
        async with http.post(f"{router.url}/api/sendText", json=payload) as resp:
            body = await resp.json()
            assert (resp.status, body["error"]) == (503, "session_needs_auth"), body
            assert int(resp.headers["Retry-After"]) > 0
    assert fleet.sent("lostlogin") == []


async def test_a_copy_still_starting_at_the_deadline_is_503_with_retry_after(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await restore_setup(sim_fleet, start_router, start_delay=8, wait=1.5)
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "verylong", wait=False)
        await fleet.by_name(owner).wait_session("verylong", "SCAN_QR_CODE", within=12)
        await fleet.by_name(owner).pair("verylong")
        await fleet.by_name(owner).wait_session("verylong", within=12)
        fleet.by_name(owner).kill()
        body = {"session": "verylong", "chatId": "1@c.us", "text": "hi"}
        async with http.post(f"{router.url}/api/sendText", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 503, answer
            assert answer["error"] == "session_unavailable"
            assert int(resp.headers["Retry-After"]) > 0
    assert fleet.sent("verylong") == []
