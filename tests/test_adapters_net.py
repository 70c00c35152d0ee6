"""The adapters' network methods (list / probe / start / health) against live peers.

WAHA and Blazz talk to the project's simulator (``router.simulator``), run
in-process. wwebjs-api and Evolution talk to tiny aiohttp upstreams defined
here after the documented response shapes. The generic adapter is pointed at
both simulator dialects with YAML-style options.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, MultiDict

from router.adapters.base import (
    Adapter,
    HeldElsewhere,
    ListFailed,
    SessionInfo,
    SessionStatus,
    UpstreamRequest,
)
from router.adapters.blazz import BlazzAdapter
from router.adapters.evolution import EvolutionAdapter
from router.adapters.generic import GenericAdapter
from router.adapters.waha import WahaAdapter
from router.adapters.wwebjs import WwebjsAdapter
from router.config import InstanceConfig
from router.simulator.app import build_app
from router.simulator.options import SimulatorOptions

KEY = "instance-secret"
BLAZZ_ID = "webjs_12_1700000000_ab12cd34"

Factory = Callable[..., Awaitable[tuple[TestServer, InstanceConfig]]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application, str], Awaitable[InstanceConfig]]]:
    servers: list[TestServer] = []

    async def start(app: web.Application, name: str) -> InstanceConfig:
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        # a trailing slash on purpose: adapters must normalise the base URL
        return InstanceConfig(name=name, url=str(server.make_url("/")), api_key=KEY)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def sim(
    serve: Callable[[web.Application, str], Awaitable[InstanceConfig]], tmp_path: Path
) -> Callable[..., Awaitable[InstanceConfig]]:
    """Start a simulator instance; the fleet shares one auth directory."""

    async def start(name: str, dialect: str, **kw: Any) -> InstanceConfig:
        opts = SimulatorOptions(
            name=name,
            dialect=dialect,
            api_key=kw.pop("api_key", KEY),
            auth_dir=tmp_path / "auth",
            start_delay=kw.pop("start_delay", 0.05),
            **kw,
        )
        return await serve(build_app(opts), name)

    return start


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Poll ``check`` (the upstream offers no event to wait on) until true."""
    async with asyncio.timeout(within):
        for _ in range(int(within / 0.02) + 1):
            if await check():
                return
            await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def raw(
    http: aiohttp.ClientSession,
    inst: InstanceConfig,
    method: str,
    path: str,
    body: Any = None,
    **kw: Any,
) -> tuple[int, Any]:
    async with http.request(method, inst.url.rstrip("/") + path, json=body, **kw) as resp:
        text = await resp.read()
        return resp.status, json.loads(text) if text else None


async def set_fault(http: aiohttp.ClientSession, inst: InstanceConfig, **fault: Any) -> None:
    status, _ = await raw(http, inst, "POST", "/_sim/fault", fault)
    assert status == 200


async def status_of(
    adapter: Adapter, http: aiohttp.ClientSession, inst: InstanceConfig, session: str
) -> SessionStatus | None:
    info = await adapter.probe(http, inst, session)
    return None if info is None else info.status


def wrong_key(inst: InstanceConfig) -> InstanceConfig:
    return InstanceConfig(name=inst.name, url=inst.url, api_key="not-the-key")


async def forward(
    http: aiohttp.ClientSession,
    adapter: Adapter,
    inst: InstanceConfig,
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> tuple[int, bytes]:
    """What the proxy does with one request: ask for the body, swap credentials, send."""
    req = UpstreamRequest(
        method,
        path,
        MultiDict(query or {}),
        CIMultiDict(headers or {}),
        body if adapter.needs_body(method, path) else None,
    )
    adapter.extract(req)
    adapter.apply_credential(req, inst)
    payload = req.json if req.json is not None else body
    async with http.request(
        method,
        inst.url.rstrip("/") + path,
        params=list(req.query.items()),
        headers=req.headers,
        json=payload,
    ) as resp:
        return resp.status, await resp.read()


# =============================================================================
# WAHA against the simulator
# =============================================================================


async def test_waha_health_list_probe(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = WahaAdapter({"timeout": 2})
    inst = await sim("w1", "waha")
    report = await a.health(http, inst)
    assert report.healthy and report.detail == "ok"
    assert await a.list_sessions(http, inst) == []
    assert await a.probe(http, inst, "nope") is None

    status, body = await raw(
        http,
        inst,
        "POST",
        "/api/sessions",
        {"name": "s1", "config": {"webhooks": [{"url": "http://app/hook"}]}},
        headers={"X-Api-Key": KEY},
    )
    assert status == 201 and a.created_session(status, json.dumps(body).encode()) == "s1"
    listed = await a.list_sessions(http, inst)
    assert [i.session for i in listed] == ["s1"]
    assert listed[0].status in (SessionStatus.STARTING, SessionStatus.READY)
    assert listed[0].extra["config"] == {"webhooks": [{"url": "http://app/hook"}]}

    await eventually(lambda: _is(a, http, inst, "s1", SessionStatus.READY))
    info = await a.probe(http, inst, "s1")
    assert info is not None and info.session == "s1"

    # a stopped session is still listed (all=true) and probed, as STOPPED
    status, _ = await raw(http, inst, "POST", "/api/sessions/s1/stop", headers={"X-Api-Key": KEY})
    assert status == 201
    assert [(i.session, i.status) for i in await a.list_sessions(http, inst)] == [
        ("s1", SessionStatus.STOPPED)
    ]


async def _is(
    a: Adapter, http: aiohttp.ClientSession, inst: InstanceConfig, s: str, want: SessionStatus
) -> bool:
    return await status_of(a, http, inst, s) is want


async def test_waha_start_restores_from_shared_auth(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = WahaAdapter()
    one = await sim("w1", "waha")
    two = await sim("w2", "waha")
    # s1 is created and paired on w1 (auth file in the shared directory)
    assert await a.start(http, one, "s1")  # unknown on w1: /start 404s, create + start
    await eventually(lambda: _is(a, http, one, "s1", SessionStatus.READY))
    assert await a.probe(http, two, "s1") is None

    # w1 "dies"; w2 restores s1 from the shared auth
    info = await a.probe(http, one, "s1")
    assert await a.start(http, two, "s1", info)
    await eventually(lambda: _is(a, http, two, "s1", SessionStatus.READY))
    # start is idempotent on a running session
    assert await a.start(http, two, "s1", info)


async def test_waha_start_creates_with_reported_config(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = WahaAdapter()
    inst = await sim("w1", "waha")
    config = {"webhooks": [{"url": "http://app/hook", "events": ["message"]}]}
    info = SessionInfo("fresh", SessionStatus.READY, {"config": config})
    assert await a.start(http, inst, "fresh", info)
    probed = await a.probe(http, inst, "fresh")
    assert probed is not None and probed.extra["config"] == config


async def test_waha_wrong_instance_key_is_a_negative_answer(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = WahaAdapter()
    inst = await sim("w1", "waha")
    assert await a.start(http, inst, "s1")
    bad = wrong_key(inst)
    assert await a.list_sessions(http, bad) == []
    assert await a.probe(http, bad, "s1") is None
    assert not await a.start(http, bad, "s2")


async def test_waha_health_faults(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = WahaAdapter({"timeout": 0.3})
    inst = await sim("w1", "waha")
    await set_fault(http, inst, mode="error", status=503, paths="/health", count=1)
    report = await a.health(http, inst)
    assert not report.healthy and report.detail == "HTTP 503"
    assert (await a.health(http, inst)).healthy

    await set_fault(http, inst, mode="error", status=500, paths="/api/sessions", count=1)
    assert await a.list_sessions(http, inst) == []  # an error answer, not an exception

    # no count: aiohttp retries an idempotent request once on a reused connection
    await set_fault(http, inst, mode="drop", paths="/health")
    with pytest.raises(aiohttp.ClientError):
        await a.health(http, inst)
    await set_fault(http, inst, mode="none")

    await set_fault(http, inst, mode="slow", delay=2.0, paths="/api/sessions", count=1)
    with pytest.raises(TimeoutError):
        await a.probe(http, inst, "s1")


async def test_waha_unreachable_instance_raises(http: aiohttp.ClientSession) -> None:
    a = WahaAdapter({"timeout": 1})
    with pytest.raises(aiohttp.ClientError):
        await a.health(http, InstanceConfig(name="gone", url="http://127.0.0.1:9/"))


async def test_waha_forwarded_requests_and_answers(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    """The client's key is swapped for the instance's; the sim's "not here" answers match."""
    a = WahaAdapter()
    inst = await sim("w1", "waha", start_delay=0.5)
    client_headers = {"X-Api-Key": "router-key-of-the-client"}
    send = {"session": "s1", "chatId": "1@c.us", "text": "hi"}
    status, body = await forward(
        http, a, inst, "POST", "/api/sendText", headers=client_headers, body=send
    )
    assert status == 404 and a.session_missing(status, body)

    assert await a.start(http, inst, "s1")  # STARTING for 0.5 s
    status, body = await forward(
        http, a, inst, "POST", "/api/sendText", headers=client_headers, body=send
    )
    assert status == 422 and not a.session_missing(status, body)  # here, just not ready

    await eventually(lambda: _is(a, http, inst, "s1", SessionStatus.READY))
    status, body = await forward(
        http, a, inst, "GET", "/api/s1/chats", query={"x-api-key": "client-in-query"}
    )
    assert status == 200, body
    status, body = await forward(
        http, a, inst, "POST", "/api/sendText", headers=client_headers, body=send
    )
    assert status == 201, body

    await raw(http, inst, "POST", "/api/sessions/s1/stop", headers={"X-Api-Key": KEY})
    status, body = await forward(
        http, a, inst, "POST", "/api/sendText", headers=client_headers, body=send
    )
    assert status == 422 and a.session_missing(status, body)  # STOPPED here


# =============================================================================
# Blazz against the simulator
# =============================================================================


async def test_blazz_health_list_probe_start(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = BlazzAdapter({"timeout": 2})
    inst = await sim("b1", "blazz")
    report = await a.health(http, inst)
    assert report.healthy and report.detail == "healthy" and report.sessions == 0
    assert await a.list_sessions(http, inst) == []
    assert await a.probe(http, inst, BLAZZ_ID) is None

    # the workspace comes from the id itself
    assert await a.start(http, inst, BLAZZ_ID)
    await eventually(lambda: _is(a, http, inst, BLAZZ_ID, SessionStatus.READY))
    listed = await a.list_sessions(http, inst)
    assert [(i.session, i.status) for i in listed] == [(BLAZZ_ID, SessionStatus.READY)]
    assert listed[0].extra["workspace_id"] == 12
    assert listed[0].extra["phone_number"]
    assert (await a.health(http, inst)).sessions == 1
    # Starting what already runs is Blazz's SingletonLock 500 (and it drops
    # its own record): the router never does it (create_answer), and an
    # adapter that is asked to says "held elsewhere", not "started".
    with pytest.raises(HeldElsewhere):
        await a.start(http, inst, BLAZZ_ID, listed[0])


async def test_blazz_restore_on_another_instance(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = BlazzAdapter()
    one = await sim("b1", "blazz")
    two = await sim("b2", "blazz", start_delay=0.3)
    session = "custom-session-7"  # no workspace in the id: it must come from info.extra
    assert not await a.start(http, one, session)  # no workspace known: no call at all
    status, _ = await raw(
        http,
        one,
        "POST",
        "/api/sessions",
        {"session_id": session, "workspace_id": 99, "account_id": 5, "api_key": KEY},
    )
    assert status == 200
    await eventually(lambda: _is(a, http, one, session, SessionStatus.READY))
    info = (await a.list_sessions(http, one))[0]
    # Blazz's list forgets account_id: the router keeps it from the create.
    assert info.extra["workspace_id"] == 99 and "account_id" not in info.extra

    # While b1 runs it, its profile is locked: a start elsewhere is refused.
    with pytest.raises(HeldElsewhere):
        await a.start(http, two, session, info)
    assert await a.stop(http, one, session)
    noted = SessionInfo(session, info.status, {**info.extra, "account_id": 5})
    assert await a.start(http, two, session, noted)
    # restoring from the shared auth: qr_scanning, authenticated (STARTING), connected
    assert await status_of(a, http, two, session) is SessionStatus.STARTING
    await eventually(lambda: _is(a, http, two, session, SessionStatus.READY))
    status, meta = await raw(http, two, "GET", f"/api/sessions/{session}/metadata?api_key={KEY}")
    assert status == 200, meta
    assert meta["metadata"]["workspaceId"] == 99 and meta["metadata"]["accountId"] == 5


async def test_blazz_wrong_key_and_faults(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = BlazzAdapter({"timeout": 0.3})
    inst = await sim("b1", "blazz")
    assert await a.start(http, inst, BLAZZ_ID)
    bad = wrong_key(inst)
    assert await a.list_sessions(http, bad) == []
    assert await a.probe(http, bad, BLAZZ_ID) is None
    assert not await a.start(http, bad, "webjs_3_1700000000_zzzzzzzz")
    assert (await a.health(http, bad)).healthy  # /health takes no key

    await set_fault(http, inst, mode="error", status=500, paths="/health", count=1)
    assert not (await a.health(http, inst)).healthy
    await set_fault(http, inst, mode="drop", paths="/api/sessions")
    with pytest.raises(aiohttp.ClientError):
        await a.list_sessions(http, inst)
    await set_fault(http, inst, mode="none")
    await set_fault(http, inst, mode="slow", delay=2.0, paths="/api/sessions", count=1)
    with pytest.raises(TimeoutError):
        await a.probe(http, inst, BLAZZ_ID)


async def test_blazz_forwarded_requests_and_answers(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = BlazzAdapter()
    inst = await sim("b1", "blazz")
    send = {
        "session_id": BLAZZ_ID,
        "workspace_id": 12,
        "recipient_phone": "6281234567890",
        "message": "hi",
        "type": "text",
        "api_key": "router-key-of-the-client",
    }
    status, body = await forward(http, a, inst, "POST", "/api/messages/send", body=send)
    assert status == 404 and a.session_missing(status, body)

    assert await a.start(http, inst, BLAZZ_ID)
    await eventually(lambda: _is(a, http, inst, BLAZZ_ID, SessionStatus.READY))
    status, body = await forward(http, a, inst, "POST", "/api/messages/send", body=send)
    assert status == 200, body  # the instance key went into the JSON body
    status, body = await forward(
        http,
        a,
        inst,
        "GET",
        f"/api/messages/{BLAZZ_ID}/validate",
        headers={"X-Api-Key": "router-key-of-the-client"},
    )
    assert status == 200, body  # ... and into the query for a GET
    status, body = await forward(http, a, inst, "DELETE", "/api/sessions/none-such", body={})
    assert status == 200 and not a.session_missing(status, body)


# =============================================================================
# generic, configured for each simulator dialect
# =============================================================================

GENERIC_WAHA: dict[str, Any] = {
    "session_rules": [
        {"path": "^/api/sessions/?$", "none": True},
        {"path": "^/api/sessions/(?P<session>[^/]+)"},
        {"path": "^/api/(?P<session>[^/]+)/"},
        {"json": "session", "default": "default"},
    ],
    "create": {"method": "POST", "path": "^/api/sessions/?$", "json": "name"},
    "credential": {"header": "X-Api-Key", "query": "x-api-key"},
    "list": {"path": "/api/sessions", "query": {"all": "true"}, "id_field": "name"},
    "probe": {"path": "/api/sessions/{session}"},
    "start": {"path": "/api/sessions", "json": {"name": "{session}", "start": True}},
    "health": {"path": "/health", "status_field": "status", "healthy_values": ["ok"]},
    "missing": {"status": [404], "body_contains": "session not found"},
    "ready_statuses": ["WORKING"],
    "starting_statuses": ["STARTING"],
    "needs_auth_statuses": ["SCAN_QR_CODE"],
    "stopped_statuses": ["STOPPED"],
    "failed_statuses": ["FAILED"],
}

GENERIC_BLAZZ: dict[str, Any] = {
    "session_rules": [
        {"path": "^/api/(sessions|messages)/(?P<session>[^/]+)/"},
        {"json": "session_id"},
    ],
    "credential": {"json": "api_key"},
    "list": {"path": "/api/sessions", "sessions_field": "sessions", "id_field": "session_id"},
    "probe": {"path": "/api/sessions/{session}/status"},
    "start": {
        "method": "POST",
        "path": "/api/sessions",
        "json": {"session_id": "{session}", "workspace_id": 12},
    },
    "health": {
        "path": "/health",
        "status_field": "status",
        "healthy_values": ["healthy"],
        "sessions_field": "sessions.total",
    },
    "missing": {"status": [404], "body_contains": ["Session not found"]},
    "ready_statuses": ["connected"],
    "starting_statuses": ["authenticated"],
    "needs_auth_statuses": ["qr_scanning"],
    "stopped_statuses": ["disconnected"],
    "failed_statuses": ["failed"],
}


async def test_generic_as_waha(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = GenericAdapter(GENERIC_WAHA)
    inst = await sim("g1", "waha")
    assert (await a.health(http, inst)).healthy
    assert await a.list_sessions(http, inst) == []
    assert await a.probe(http, inst, "s1") is None
    assert await a.start(http, inst, "s1")
    await eventually(lambda: _is(a, http, inst, "s1", SessionStatus.READY))
    assert [i.session for i in await a.list_sessions(http, inst)] == ["s1"]
    assert await a.list_sessions(http, wrong_key(inst)) == []
    status, body = await forward(
        http, a, inst, "POST", "/api/sendText", body={"session": "zz", "chatId": "1@c.us"}
    )
    assert status == 404 and a.session_missing(status, body)


async def test_generic_as_blazz(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = GenericAdapter(GENERIC_BLAZZ)
    inst = await sim("g1", "blazz")
    report = await a.health(http, inst)
    assert report.healthy and report.sessions == 0 and report.detail == "healthy"
    assert await a.list_sessions(http, inst) == []  # api_key went in the query
    assert await a.probe(http, inst, BLAZZ_ID) is None
    assert await a.start(http, inst, BLAZZ_ID)  # api_key went in the JSON body
    await eventually(lambda: _is(a, http, inst, BLAZZ_ID, SessionStatus.READY))
    assert [i.session for i in await a.list_sessions(http, inst)] == [BLAZZ_ID]
    assert (await a.health(http, inst)).sessions == 1
    status, body = await forward(
        http,
        a,
        inst,
        "POST",
        "/api/messages/send",
        body={
            "session_id": BLAZZ_ID,
            "workspace_id": 12,
            "recipient_phone": "1",
            "message": "hi",
            "api_key": "client",
        },
    )
    assert status == 200, body


# =============================================================================
# wwebjs-api: a tiny upstream after the documented shapes
# =============================================================================


def wwebjs_app(states: dict[str, str | None]) -> web.Application:
    """``states``: session id -> WAState (None while the page is loading)."""

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/ping" and request.headers.get("x-api-key") != KEY:
            return web.json_response({"success": False, "error": "Invalid API key"}, status=403)
        response: web.StreamResponse = await handler(request)
        return response

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "message": "pong"})

    async def get_sessions(request: web.Request) -> web.Response:
        return web.json_response({"success": True, "result": list(states)})

    async def status(request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        if sid not in states:
            return web.json_response(
                {"success": False, "state": None, "message": "session_not_found"}
            )
        state = states[sid]
        if state != "CONNECTED":
            return web.json_response(
                {"success": False, "state": state, "message": "session_not_connected"}
            )
        return web.json_response(
            {"success": True, "state": "CONNECTED", "message": "session_connected"}
        )

    async def start(request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        if sid in states:
            return web.json_response(
                {"success": False, "error": f"Session already exists for: {sid}"}, status=422
            )
        if sid == "explode":
            return web.json_response({"success": False, "error": "boom"}, status=500)
        states[sid] = None
        return web.json_response({"success": True, "message": "Session initiated successfully"})

    async def send(request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        if sid not in states:
            return web.json_response({"success": False, "message": "session_not_found"}, status=404)
        return web.json_response({"success": True, "message": {"id": "x"}})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/ping", ping)
    app.router.add_get("/session/getSessions", get_sessions)
    app.router.add_get("/session/status/{id}", status)
    app.router.add_get("/session/start/{id}", start)
    app.router.add_post("/client/sendMessage/{id}", send)
    return app


async def test_wwebjs_network(
    http: aiohttp.ClientSession,
    serve: Callable[[web.Application, str], Awaitable[InstanceConfig]],
) -> None:
    states: dict[str, str | None] = {"a1": "CONNECTED", "a2": "UNPAIRED", "a3": "TOS_BLOCK"}
    inst = await serve(wwebjs_app(states), "ww1")
    a = WwebjsAdapter()
    assert (await a.health(http, inst)).healthy
    listed = await a.list_sessions(http, inst)
    assert [(i.session, i.status) for i in listed] == [
        ("a1", SessionStatus.STARTING),
        ("a2", SessionStatus.STARTING),
        ("a3", SessionStatus.STARTING),
    ]
    assert await status_of(a, http, inst, "a1") is SessionStatus.READY
    assert await status_of(a, http, inst, "a2") is SessionStatus.NEEDS_AUTH
    assert await status_of(a, http, inst, "a3") is SessionStatus.FAILED
    assert await a.probe(http, inst, "zz") is None  # 200 "session_not_found"

    assert await a.start(http, inst, "b1")
    assert await status_of(a, http, inst, "b1") is SessionStatus.STARTING  # state null
    assert await a.start(http, inst, "a1")  # already exists here: fine
    assert not await a.start(http, inst, "explode")

    bad = wrong_key(inst)
    assert await a.list_sessions(http, bad) == []
    assert await a.probe(http, bad, "a1") is None
    assert not await a.start(http, bad, "c1")

    status, body = await forward(
        http, a, inst, "POST", "/client/sendMessage/zz", headers={"x-api-key": "client"}
    )
    assert status == 404 and a.session_missing(status, body)
    status, body = await forward(
        http, a, inst, "POST", "/client/sendMessage/a1", headers={"x-api-key": "client"}
    )
    assert status == 200


# =============================================================================
# Evolution: a tiny upstream after the documented shapes
# =============================================================================


def evolution_app(instances: dict[str, str], v1: bool = False) -> web.Application:
    """``instances``: name -> state ("open" / "connecting" / "close")."""

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/" and request.headers.get("apikey") != KEY:
            return web.json_response(
                {"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}},
                status=401,
            )
        response: web.StreamResponse = await handler(request)
        return response

    def not_found(name: str) -> web.Response:
        return web.json_response(
            {
                "status": 404,
                "error": "Not Found",
                "response": {"message": [f'The "{name}" instance does not exist']},
            },
            status=404,
        )

    async def root(request: web.Request) -> web.Response:
        return web.json_response(
            {"status": 200, "message": "Welcome to the Evolution API, it is working!"}
        )

    async def fetch(request: web.Request) -> web.Response:
        if v1:
            return web.json_response(
                [
                    {"instance": {"instanceName": n, "status": s, "owner": None}}
                    for n, s in instances.items()
                ]
            )
        return web.json_response(
            [
                {
                    "id": f"id-{n}",
                    "name": n,
                    "connectionStatus": s,
                    "integration": "WHATSAPP-BAILEYS",
                }
                for n, s in instances.items()
            ]
        )

    async def state(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in instances:
            return not_found(name)
        return web.json_response({"instance": {"instanceName": name, "state": instances[name]}})

    async def connect(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in instances:
            return not_found(name)
        instances[name] = "connecting"
        return web.json_response({"pairingCode": None, "code": "2@abc", "count": 1})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/", root)
    app.router.add_get("/instance/fetchInstances", fetch)
    app.router.add_get("/instance/connectionState/{name}", state)
    app.router.add_get("/instance/connect/{name}", connect)
    return app


@pytest.mark.parametrize("v1", [False, True])
async def test_evolution_network(
    http: aiohttp.ClientSession,
    serve: Callable[[web.Application, str], Awaitable[InstanceConfig]],
    v1: bool,
) -> None:
    instances = {"shop": "open", "support": "close", "sales": "connecting"}
    inst = await serve(evolution_app(instances, v1=v1), "evo1")
    a = EvolutionAdapter()
    assert (await a.health(http, inst)).healthy
    listed = {i.session: i.status for i in await a.list_sessions(http, inst)}
    assert listed == {
        "shop": SessionStatus.READY,
        "support": SessionStatus.STOPPED,
        "sales": SessionStatus.STARTING,
    }
    assert await status_of(a, http, inst, "shop") is SessionStatus.READY
    assert await a.probe(http, inst, "nope") is None
    assert await a.start(http, inst, "support")
    assert await status_of(a, http, inst, "support") is SessionStatus.STARTING
    assert not await a.start(http, inst, "nope")

    bad = wrong_key(inst)
    assert await a.list_sessions(http, bad) == []
    assert await a.probe(http, bad, "shop") is None
    assert not await a.start(http, bad, "shop")
    assert (await a.health(http, bad)).healthy


# =============================================================================
# stop (keeps the login) and strict listing, for every adapter
# =============================================================================


async def test_waha_stop_keeps_the_login_and_strict_list_raises(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = WahaAdapter({"timeout": 2})
    one = await sim("w1", "waha")
    two = await sim("w2", "waha", auto_auth=False)  # no auth file: it would wait for a QR
    assert await a.start(http, one, "s1")
    await eventually(lambda: _is(a, http, one, "s1", SessionStatus.READY))
    assert await a.stop(http, one, "s1")
    assert await status_of(a, http, one, "s1") is SessionStatus.STOPPED
    assert await a.stop(http, one, "never-here")  # not running there: fine
    # The login survived the stop: another instance starts it straight to READY.
    assert await a.start(http, two, "s1")
    await eventually(lambda: _is(a, http, two, "s1", SessionStatus.READY))

    bad = wrong_key(one)
    assert not await a.stop(http, bad, "s1")
    assert await a.list_sessions(http, bad) == []
    with pytest.raises(ListFailed):
        await a.list_sessions(http, bad, strict=True)
    await set_fault(http, one, mode="error", status=500, paths="/api/sessions", count=1)
    with pytest.raises(ListFailed):
        await a.list_sessions(http, one, strict=True)
    assert [i.session for i in await a.list_sessions(http, one, strict=True)] == ["s1"]


async def test_blazz_stop_keeps_the_login_and_strict_list_raises(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    a = BlazzAdapter({"timeout": 2})
    one = await sim("b1", "blazz")
    two = await sim("b2", "blazz", auto_auth=False)
    assert await a.start(http, one, BLAZZ_ID)
    await eventually(lambda: _is(a, http, one, BLAZZ_ID, SessionStatus.READY))
    info = await a.probe(http, one, BLAZZ_ID)
    assert await a.stop(http, one, BLAZZ_ID)
    assert await a.probe(http, one, BLAZZ_ID) is None
    assert await a.stop(http, one, BLAZZ_ID)  # "alreadyDisconnected"
    assert await a.start(http, two, BLAZZ_ID, info)
    await eventually(lambda: _is(a, http, two, BLAZZ_ID, SessionStatus.READY))

    bad = wrong_key(two)
    assert not await a.stop(http, bad, BLAZZ_ID)
    assert await a.probe(http, two, BLAZZ_ID) is not None
    with pytest.raises(ListFailed):
        await a.list_sessions(http, bad, strict=True)


def wwebjs_stop_app(states: dict[str, str], calls: list[str], *, has_stop: bool) -> web.Application:
    async def stop(request: web.Request) -> web.Response:
        calls.append("stop")
        states.pop(request.match_info["id"], None)  # destroy(): the folder stays
        return web.json_response({"success": True, "message": "Session stopped successfully"})

    async def terminate(request: web.Request) -> web.Response:
        calls.append("terminate")  # logout + folder deletion: must never be used
        return web.json_response({"success": True, "message": "Logged out successfully"})

    async def get_sessions(request: web.Request) -> web.Response:
        if request.headers.get("x-api-key") != KEY:
            return web.json_response({"success": False, "error": "Invalid API key"}, status=403)
        return web.json_response({"success": True, "result": list(states)})

    app = web.Application()
    if has_stop:
        app.router.add_get("/session/stop/{id}", stop)
    app.router.add_get("/session/terminate/{id}", terminate)
    app.router.add_get("/session/getSessions", get_sessions)
    return app


async def test_wwebjs_stop_uses_stop_never_terminate(
    http: aiohttp.ClientSession,
    serve: Callable[[web.Application, str], Awaitable[InstanceConfig]],
) -> None:
    states, calls = {"a1": "CONNECTED"}, []
    inst = await serve(wwebjs_stop_app(states, calls, has_stop=True), "ww1")
    a = WwebjsAdapter()
    assert await a.stop(http, inst, "a1")
    assert states == {} and calls == ["stop"]
    with pytest.raises(ListFailed):
        await a.list_sessions(http, wrong_key(inst), strict=True)
    assert await a.list_sessions(http, inst, strict=True) == []

    old_calls: list[str] = []
    old = await serve(wwebjs_stop_app({"a1": "CONNECTED"}, old_calls, has_stop=False), "ww2")
    assert not await a.stop(http, old, "a1")  # no /session/stop: refused, nothing else tried
    assert old_calls == []


async def test_evolution_stop_refuses_without_calling_anything(
    http: aiohttp.ClientSession,
    serve: Callable[[web.Application, str], Awaitable[InstanceConfig]],
) -> None:
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    app = evolution_app({"shop": "open"})
    app.middlewares.insert(0, record)
    inst = await serve(app, "evo1")
    a = EvolutionAdapter()
    assert not await a.stop(http, inst, "shop")  # logout would unpair the phone
    assert seen == []
    with pytest.raises(ListFailed):
        await a.list_sessions(http, wrong_key(inst), strict=True)


async def test_generic_stop_is_optional_and_checked(
    http: aiohttp.ClientSession, sim: Callable[..., Awaitable[InstanceConfig]]
) -> None:
    inst = await sim("g1", "waha")
    with_stop = GenericAdapter({**GENERIC_WAHA, "stop": {"path": "/api/sessions/{session}/stop"}})
    assert await with_stop.start(http, inst, "s1")
    await eventually(lambda: _is(with_stop, http, inst, "s1", SessionStatus.READY))
    assert await with_stop.stop(http, inst, "s1")
    assert await status_of(with_stop, http, inst, "s1") is SessionStatus.STOPPED
    assert await with_stop.stop(http, inst, "zz")  # "session not found": not running there
    assert not await with_stop.stop(http, wrong_key(inst), "s1")

    without = GenericAdapter(GENERIC_WAHA)
    assert not await without.stop(http, inst, "s1")
    no_list = GenericAdapter({k: v for k, v in GENERIC_WAHA.items() if k != "list"})
    assert await no_list.list_sessions(http, inst) == []
    with pytest.raises(ListFailed):
        await no_list.list_sessions(http, inst, strict=True)
    with pytest.raises(ValueError, match="must mention"):
        GenericAdapter({**GENERIC_WAHA, "stop": {"path": "/api/sessions/stop"}})
