"""The router in front of Blazz-dialect simulators that are as strict as the
real whatsapp-service (issue 9; the facts are in router/simulator/blazz.py):
JSON read only with its Content-Type, keys only where each handler reads them,
a distinct key per instance, a profile lock per session (SingletonLock),
qr_scanning while a restore opens the stored login, and webhooks to LARAVEL_URL.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from router.adapters.blazz import workspace_from_id
from router.config import (
    FailoverConfig,
    Timeouts,
    WebhookConfig,
    WebhookDelivery,
    WebhookIngest,
    WebhookTarget,
)
from tests.support.metrics import scrape
from tests.support.router import (
    ROUTER_KEY,
    RouterHandle,
    StartRouter,
    next_event,
    router_config,
)
from tests.support.simulator import SimFleet, SimFleetFactory, where_running
from tests.support.webhook_target import TargetServer

KEYS = ["key-of-b1", "key-of-b2", "key-of-b3"]
HMAC_SECRET = "blazz-hmac-secret"


def sid(n: int) -> str:
    return f"webjs_7_1700000000_s{n:07d}"


async def fleet_and_router(
    sim_fleet: SimFleetFactory,
    start_router: StartRouter,
    *,
    extra_args: tuple[str, ...] = (),
    adapter_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(3, dialect="blazz", api_keys=KEYS, extra_args=extra_args)
    cfg = router_config(
        fleet.urls,
        names=[p.name for p in fleet],
        adapter="blazz",
        adapter_options=adapter_options,
        instance_keys=KEYS,
        **{k: v for k, v in kwargs.items() if k not in ("failover", "webhooks")},
    )
    cfg = dataclasses.replace(
        cfg,
        failover=kwargs.get("failover", FailoverConfig(wait=10, ready_timeout=8)),
        webhooks=kwargs.get("webhooks"),
    )
    return fleet, await start_router(config=cfg)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def create(
    http: aiohttp.ClientSession, router: RouterHandle, fleet: SimFleet, session: str, **extra: Any
) -> str:
    body = {
        "session_id": session,
        "workspace_id": workspace_from_id(session),
        "api_key": ROUTER_KEY,
    }
    status, answer = await call(http, "POST", f"{router.url}/api/sessions", {**body, **extra})
    assert status == 200, answer
    assert answer == {"success": True, "session_id": session, "status": "qr_scanning"}
    owner = router.runtime.smap.cached(session)
    assert owner is not None
    await fleet.by_name(owner).wait_session(session)  # connected
    return owner


async def send(
    http: aiohttp.ClientSession, router: RouterHandle, session: str, text: str
) -> tuple[int, Any]:
    body = {
        "session_id": session,
        "recipient_phone": "15550001111",
        "message": text,
        "api_key": ROUTER_KEY,
    }
    return await call(http, "POST", f"{router.url}/api/messages/send", body)


async def test_failover_restores_with_each_instances_own_key_and_keeps_account_id(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_and_router(sim_fleet, start_router)
    s = sid(1)
    async with aiohttp.ClientSession() as http:
        owner = await create(http, router, fleet, s, account_id=11, priority="high")
        status, answer = await send(http, router, s, "before")
        assert status == 200 and answer["success"] and answer["message_id"], answer
        fleet.by_name(owner).kill()
        # The restore (POST /api/sessions with Content-Type and the target's own
        # key) and the replay (the target's key, not the dead owner's) both land.
        status, answer = await send(http, router, s, "after")
        assert status == 200, answer
        new = router.runtime.smap.cached(s)
        assert new not in (None, owner)
        status, meta = await call(
            http, "GET", f"{router.url}/api/sessions/{s}/metadata?api_key={ROUTER_KEY}"
        )
        assert status == 200, meta
        # Blazz's list forgets account_id; the router kept it from the create.
        assert meta["metadata"]["accountId"] == 11
    assert [(r["text"], r["instance"]) for r in fleet.sent(s)] == [
        ("before", owner),
        ("after", new),
    ]


async def test_move_drain_and_a_client_delete_work_on_strict_instances(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_and_router(sim_fleet, start_router, admin_key="adm")
    async with aiohttp.ClientSession() as http:
        sessions = [sid(n) for n in range(10, 14)]
        owners = {s: await create(http, router, fleet, s) for s in sessions}
        s = sessions[0]
        source = owners[s]
        target = next(p.name for p in fleet if p.name != source)
        admin = {"X-Admin-Key": "adm"}
        async with http.post(
            f"{router.url}/admin/sessions/{s}/move", json={"to": target}, headers=admin
        ) as resp:
            result = await resp.json()
            assert resp.status == 200, result
            assert result["outcome"] == "moved", result
        assert await where_running(fleet, s) == [target]
        # Drain one instance: its sessions move (stop = DELETE with the key in a JSON body).
        victim = target
        async with http.post(
            f"{router.url}/admin/instances/{victim}/drain?wait=20", headers=admin
        ) as resp:
            done = await resp.json()
            assert resp.status == 200, done
        for session in sessions:
            assert victim not in await where_running(fleet, session)
            assert await where_running(fleet, session) != []
        # A client's DELETE without a body: the router gives it one with the key.
        async with http.delete(f"{router.url}/api/sessions/{s}?api_key={ROUTER_KEY}") as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
            assert answer["message"] == "Session disconnected successfully"
        assert await where_running(fleet, s) == []


async def test_health_is_answered_for_the_fleet_without_a_key(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_and_router(sim_fleet, start_router)
    async with aiohttp.ClientSession() as http:
        await create(http, router, fleet, sid(20))
        await create(http, router, fleet, sid(21))
        await router.server.health.wait_round()  # type: ignore[union-attr]
        status, body = await call(http, "GET", f"{router.url}/health")
        assert status == 200, body
        assert body["status"] == "healthy"
        assert body["sessions"] == {"total": 2, "connected": 2, "disconnected": 0}
        down = next_event(router.runtime, "down", within=15)
        fleet[2].kill()
        await down
        status, body = await call(http, "GET", f"{router.url}/health")
        assert (status, body["status"]) == (200, "degraded")
        assert body["instances"]["down"] == [fleet[2].name]
        assert (await call(http, "GET", f"{router.url}/health/live"))[0] == 200
        assert (await call(http, "GET", f"{router.url}/health/ready"))[0] == 200


async def test_a_second_create_of_a_running_session_is_answered_not_forwarded(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await fleet_and_router(sim_fleet, start_router)
    s = sid(30)
    async with aiohttp.ClientSession() as http:
        owner = await create(http, router, fleet, s)
        body = {"session_id": s, "workspace_id": 7, "api_key": ROUTER_KEY}
        for _ in range(2):  # a client retrying its create
            status, answer = await call(http, "POST", f"{router.url}/api/sessions", body)
            assert status == 200, answer
            assert answer == {"success": True, "session_id": s, "status": "connected"}
        # The instance still knows it (a forwarded create would have made it
        # launch a second browser, fail with SingletonLock and drop its record).
        assert await where_running(fleet, s) == [owner]
        assert (await send(http, router, s, "still here"))[0] == 200


async def test_a_create_gets_blazzs_own_time_and_an_unanswered_one_is_settled(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    # Creates take 1.5 s here; the router's read timeout is 1 s.
    fleet, router = await fleet_and_router(
        sim_fleet,
        start_router,
        extra_args=("--init-delay", "1.5"),
        timeouts=Timeouts(connect=1.0, read=1.0, idle_keepalive=4.0),
    )
    async with aiohttp.ClientSession() as http:
        # /api/sessions gets Blazz's 60 s (+5): the create is answered.
        await create(http, router, fleet, sid(40))
    # With a budget shorter than the create, the answer never comes: 504, but
    # the session that does run is mapped, and the client's retry is answered.
    fleet2, router2 = await fleet_and_router(
        sim_fleet,
        start_router,
        extra_args=("--init-delay", "1.5"),
        adapter_options={"sessions_timeout": 0.5},
    )
    s = sid(41)
    async with aiohttp.ClientSession() as http:
        body = {"session_id": s, "workspace_id": 7, "api_key": ROUTER_KEY}
        status, answer = await call(http, "POST", f"{router2.url}/api/sessions", body)
        assert status == 504, answer
        assert answer["session_state"] == "running" and answer["outcome"] == "unknown"
        owner = router2.runtime.smap.cached(s)
        assert owner is not None
        await fleet2.by_name(owner).wait_session(s)
        status, answer = await call(http, "POST", f"{router2.url}/api/sessions", body)
        assert (status, answer["status"]) == (200, "connected"), answer
        assert await where_running(fleet2, s) == [owner]


async def test_a_profile_held_by_a_dead_instances_browser_is_waited_for(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    # SIGKILL of the node process leaves its "browser" holding the profile for 2 s.
    fleet, router = await fleet_and_router(
        sim_fleet, start_router, extra_args=("--browser-linger", "2")
    )
    s = sid(50)
    async with aiohttp.ClientSession() as http:
        owner = await create(http, router, fleet, s)
        before = await scrape(http, router.url)
        fleet.by_name(owner).kill()
        started = time.monotonic()
        status, answer = await send(http, router, s, "after the crash")
        assert status == 200, answer
        assert time.monotonic() - started >= 1.0  # it waited for the lock to go
        after = await scrape(http, router.url)
    held = [e for e in router.runtime.events.recent(kind="restore_held") if e["session"] == s]
    assert held and "SingletonLock" in held[0]["detail"]
    assert after.delta(before, "wa_router_restore_held_total") >= 1
    assert len(fleet.sent(s)) == 1


async def test_blazz_webhooks_and_main_app_calls_go_through_the_router(
    sim_fleet: SimFleetFactory, start_router: StartRouter, tmp_path: Path
) -> None:
    app = TargetServer(hmac_key=HMAC_SECRET, verify="blazz", path="/api/whatsapp/webhooks/webjs")
    await app.start()
    main_app = MainApp()
    await main_app.start()
    webhooks = WebhookConfig(
        targets=(WebhookTarget(url=app.url, name="app", hmac_key=HMAC_SECRET, format="blazz"),),
        ingest=WebhookIngest(blazz_hmac_key=HMAC_SECRET),
        delivery=WebhookDelivery(round_backoff=0.02, backoff_base=0.1, backoff_max=0.3),
        sqlite_path=str(tmp_path / "webhooks.db"),
        main_app_url=main_app.url,
    )
    fleet, router = await fleet_and_router(
        sim_fleet,
        start_router,
        webhooks=webhooks,
        extra_args=("--qr-interval", "0.5"),
        # The restarted instance keeps its sessions in the map: what it restores
        # at start is then up to the accounts/active answer alone.
        failover=FailoverConfig(wait=10, ready_timeout=8, evacuate_down=False),
    )
    try:
        # Each instance's LARAVEL_URL is its own prefix under the router.
        for proc in fleet:
            proc.extra_args += [
                "--laravel-url",
                f"{router.url}/webhooks/blazz/{proc.name}",
                "--hmac-secret",
                HMAC_SECRET,
                "--no-auto-auth",
            ]
            await proc.restart_async()
        s = sid(60)
        async with aiohttp.ClientSession() as http:
            body = {"session_id": s, "workspace_id": 7, "api_key": ROUTER_KEY}
            status, _ = await call(http, "POST", f"{router.url}/api/sessions", body)
            assert status == 200
            await app.wait_unique(1)
        qr = next(d for d in app.deliveries if d.doc["event"] == "qr_code_generated")
        assert qr.doc["data"]["session_id"] == s
        # The main app is told the router's URL, never http://localhost:PORT.
        assert qr.headers["X-Instance-Url"] == router.url
        # Main-app calls at start: accounts/active is answered with only the
        # sessions that instance should restore (here: the one mapped to it).
        owner = router.runtime.smap.cached(s)
        assert owner is not None
        main_app.active = [{"session_id": s, "workspace_id": 7, "id": 1}, *_others()]
        restarted = fleet.by_name(owner)
        await restarted.restart_async()
        await restarted.wait_session(s, "SCAN_QR_CODE", within=10)
        assert [p.name for p in fleet if p.name != owner and p.alive] == [
            p.name for p in fleet if p.name != owner
        ]
        for other in fleet:
            if other.name != owner:
                assert await other.session_status(s) is None
        # A session no instance ran was claimed by the one that asked, once.
        claimed = _others()[0]["session_id"]
        assert router.runtime.smap.cached(claimed) == owner
        await restarted.wait_session(claimed, "SCAN_QR_CODE", within=10)
        calls = [c for c in main_app.calls if c[1] == "/api/whatsapp/accounts/active"]
        assert calls and calls[-1][2] == KEYS[[p.name for p in fleet].index(owner)]
    finally:
        await app.stop()
        await main_app.stop()


def _others() -> list[dict[str, Any]]:
    return [{"session_id": "webjs_8_1700000000_elsewhere", "workspace_id": 8, "id": 2}]


class MainApp:
    """The main app (Laravel) as Blazz calls it at LARAVEL_URL, besides webhooks."""

    def __init__(self) -> None:
        self.active: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str, str | None]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls.append((request.method, request.path, request.headers.get("X-API-Key")))
        if request.path == "/api/whatsapp/accounts/active":
            return web.json_response(
                {"success": True, "sessions": self.active, "count": len(self.active)}
            )
        return web.json_response({"success": True})
