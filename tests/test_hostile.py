"""Hostile clients: they cannot split a session, exhaust the router, or get a 5xx.

Each test reproduces one finding of the hostile-input campaign (issue 11)
against a real router on a real socket in front of simulator processes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from router.config import Limits
from tests.support.router import (
    INSTANCE_KEY,
    ROUTER_KEY,
    RouterHandle,
    StartRouter,
    create_ready,
    router_config,
)
from tests.support.simulator import SimFleet, SimFleetFactory


async def waha_router(
    sim_fleet: SimFleetFactory, start_router: StartRouter, **kwargs: Any
) -> tuple[SimFleet, RouterHandle]:
    fleet = sim_fleet(3, api_key=INSTANCE_KEY)
    cfg = router_config(fleet.urls, names=[p.name for p in fleet], **kwargs)
    return fleet, await start_router(config=cfg)


async def raw(port: int, data: bytes, *, read: bool = True, within: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; what comes back before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if not read:
        writer.close()
        return b""
    try:
        async with asyncio.timeout(within):
            out = await reader.read()
    finally:
        writer.close()
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def running_on(fleet: SimFleet, session: str) -> list[str]:
    return [p.name for p in fleet if await p.session_status(session) in ("STARTING", "WORKING")]


# -- one request must not split a live session ---------------------------------------


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/api/victim%2fx/me", "bad_session_id"),
        ("/api/victim%2Fx/me", "bad_session_id"),
        ("/api/victim%5Cx/me", "bad_session_id"),
        ("/api/victim%00/me", "bad_session_id"),
        ("/api/victim%zz/me", "bad_session_id"),
        ("/api/victim/../admin/me", "bad_path"),
        ("/api/%2e%2e/victim/me", "bad_session_id"),
        ("//api/victim/me", "bad_path"),
    ],
)
async def test_a_path_the_upstream_reads_differently_is_refused_not_failed_over(
    sim_fleet: SimFleetFactory, start_router: StartRouter, path: str, error: str
) -> None:
    fleet, router = await waha_router(sim_fleet, start_router)
    async with router.client() as http:
        owner = await create_ready(http, router, fleet, "victim")
        answer = await raw(
            router.server.port or 0,
            f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {ROUTER_KEY}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status_of(answer) == 400, answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == error
        assert router.runtime.events.recent(kind="failover") == []
        assert await running_on(fleet, "victim") == [owner]


async def test_express_route_case_is_parsed_like_the_upstream(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet = sim_fleet(3, dialect="blazz", api_key=INSTANCE_KEY)
    router = await start_router(fleet.urls, names=[p.name for p in fleet], adapter="blazz")
    session = "webjs_7_1700000000_casecase"
    async with aiohttp.ClientSession() as http:
        create = {"session_id": session, "workspace_id": 7, "api_key": ROUTER_KEY}
        async with http.post(f"{router.url}/api/sessions", json=create) as resp:
            assert resp.status == 200, await resp.text()
        owner = router.runtime.smap.cached(session)
        assert owner is not None
        await fleet.by_name(owner).wait_session(session)
        body = {
            "session_id": session,
            "recipient_phone": "15550001111",
            "message": "hi",
            "api_key": ROUTER_KEY,
        }
        # Express matches /API/Messages/Send to the send route: so does the router.
        async with http.post(f"{router.url}/API/Messages/Send", json=body) as resp:
            assert resp.status == 200, await resp.text()
    assert [r["instance"] for r in fleet.sent(session)] == [owner]


# -- malformed bodies are 4xx ---------------------------------------------------------


async def test_deep_json_is_a_400_not_a_500(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await waha_router(sim_fleet, start_router, admin_key="adm")
    deep = b"[" * 3000 + b"]" * 3000
    obj = b'{"session":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}"
    async with aiohttp.ClientSession() as http:
        for headers in ({"X-Api-Key": ROUTER_KEY}, {}):
            for payload in (deep, obj):
                async with http.post(
                    f"{router.url}/api/sendText",
                    data=payload,
                    headers={**headers, "Content-Type": "application/json"},
                ) as resp:
                    assert 400 <= resp.status < 500, (resp.status, await resp.text())
        async with http.post(
            f"{router.url}/admin/reload",
            data=deep,
            headers={"X-Admin-Key": "adm", "Content-Type": "application/json"},
        ) as resp:
            assert resp.status < 500, await resp.text()


async def test_a_gzip_body_that_is_not_gzip_is_a_400(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    fleet, router = await waha_router(sim_fleet, start_router)
    async with router.client() as http:
        await create_ready(http, router, fleet, "gz")
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with http.post(
            f"{router.url}/api/sendText", data=b'{"session":"gz"}', headers=headers
        ) as resp:
            assert resp.status == 400, await resp.text()
            assert (await resp.json())["error"] == "bad_body"
        # A real gzip body is read (the session is in it) and sent on decoded.
        good = gzip.compress(
            json.dumps({"session": "gz", "chatId": "1@c.us", "text": "z"}).encode()
        )
        async with http.post(f"{router.url}/api/sendText", data=good, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
    assert [r["text"] for r in fleet.sent("gz")] == ["z"]


# -- unauthenticated bulk costs nothing ---------------------------------------------


async def test_a_request_without_a_key_is_refused_before_its_body_is_read(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await waha_router(sim_fleet, start_router)
    port = router.server.port or 0
    head = (
        "POST /api/sendText HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {10 * 1024 * 1024}\r\n\r\n"
    ).encode()
    # Only the head is sent: an answer proves the body was never waited for.
    answer = await raw(port, head, within=5)
    assert status_of(answer) == 401, answer


async def test_bodies_held_at_once_are_capped_with_a_503(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await waha_router(
        sim_fleet, start_router, limits=Limits(max_buffered_bytes=3 * 1024 * 1024)
    )
    port = router.server.port or 0
    size = 2 * 1024 * 1024
    head = (
        "POST /api/sendText HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Api-Key: {ROUTER_KEY}\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    # One client holds 2 MiB of the 3 MiB budget (its body never finishes)...
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"x" * 1024)
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            # The router offers no event for "a body is being read": poll it.
            while router.server.guard is None or not any(  # noqa: ASYNC110
                h.busy for h in router.server.guard.handlers
            ):
                await asyncio.sleep(0.01)
        # ...so a second one that needs 2 MiB more is told to come back.
        closing = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        answer = await raw(port, closing + b"y" * size)
        assert status_of(answer) == 503, answer
        assert b"Retry-After: 1" in answer
    finally:
        writer.close()


# -- slow clients are cut off ------------------------------------------------------------


async def test_slow_heads_silent_and_stalled_connections_are_closed(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await waha_router(
        sim_fleet,
        start_router,
        limits=Limits(header_timeout=1.0, body_timeout=1.0, idle_timeout=2.0),
    )
    port = router.server.port or 0
    started = time.monotonic()
    half_head = raw(port, b"GET /api/x/me HTTP/1.1\r\nHost: x\r\nX-Api", within=10)
    silent = raw(port, b"", within=10)
    half_body = raw(
        port,
        (
            "POST /api/sendText HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Api-Key: {ROUTER_KEY}\r\nContent-Length: 1000\r\n\r\n" + "{" * 10
        ).encode(),
        within=10,
    )
    a, b, c = await asyncio.gather(half_head, silent, half_body)
    took = time.monotonic() - started
    assert took < 6, took  # all three closed by the router, none hung to the timeout
    assert a == b"" or status_of(a) >= 400
    assert b == b""
    assert status_of(c) == 408, c


async def test_client_connections_are_capped(
    sim_fleet: SimFleetFactory, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    _fleet, router = await waha_router(
        sim_fleet, start_router, limits=Limits(max_client_connections=5)
    )
    port = router.server.port or 0
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    try:
        with caplog.at_level(logging.WARNING, logger="router.connections"):
            extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
            extra_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                assert await extra_reader.read() == b""  # closed, not served
            extra_writer.close()
        assert any("max_client_connections" in r.message for r in caplog.records)
    finally:
        for _, w in held:
            w.close()


# -- secrets stay out of the logs -----------------------------------------------------


async def test_malformed_requests_log_one_line_without_their_bytes(
    sim_fleet: SimFleetFactory, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    _fleet, router = await waha_router(sim_fleet, start_router)
    port = router.server.port or 0
    with caplog.at_level(logging.DEBUG):
        for i in range(20):
            bad = f"GET /api/x/me HTTP/1.1\r\nX-Api-Key: {ROUTER_KEY}\r\nBad Header {i}\r\n\r\n"
            answer = await raw(port, bad.encode())
            assert answer == b"" or status_of(answer) == 400
    text = caplog.text
    assert ROUTER_KEY not in text
    assert "Traceback" not in text
    lines = [r for r in caplog.records if r.name in ("router.connections", "aiohttp.server")]
    assert len(lines) <= 2, [r.getMessage() for r in lines]


async def test_a_request_line_without_a_version_is_a_400_in_http_1(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """aiohttp reads it as HTTP/0.9 and would answer "HTTP/0.9 200" with
    headers; the router refuses it in HTTP/1.0 and closes, before routing."""
    _fleet, router = await waha_router(sim_fleet, start_router)
    port = router.server.port or 0
    for line in (b"GET /healthz", b"GET /api/x/me", b"GET /healthz HTTP/0.9"):
        answer = await raw(port, line + f"\r\nX-Api-Key: {ROUTER_KEY}\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 "), answer[:200]
        assert json.loads(body)["error"] == "bad_request"


async def test_undecodable_key_bytes_are_a_401_everywhere(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    """Header bytes that are not UTF-8 reach the handlers as lone surrogates:
    every key check (router keys, the admin API, the dashboard) refuses them
    like any wrong key, never with a 500 from encoding them."""
    _fleet, router = await waha_router(sim_fleet, start_router, admin_key="admin-key")
    port = router.server.port or 0
    for path, header in (
        ("/api/x/me", b"X-Api-Key"),
        ("/admin/instances", b"X-Admin-Key"),
        ("/admin/instances", b"Authorization: Bearer"),
        ("/dashboard/api/snapshot", b"X-Admin-Key"),
    ):
        head = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        answer = await raw(port, head + header + b": \xff\xfe\xc3(\r\n\r\n")
        assert status_of(answer) == 401, (path, answer[:300])
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"] == "unauthorized" and body["request_id"], body


# -- request ids, route lists -------------------------------------------------------


async def test_a_client_request_id_is_kept_only_when_short_and_plain(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    _fleet, router = await waha_router(sim_fleet, start_router)
    async with router.client() as http:
        async with http.get(
            f"{router.url}/api/nobody/me", headers={"X-Request-Id": "abc-123"}
        ) as r:
            assert r.headers["X-Request-Id"] == "abc-123"
            assert (await r.json())["request_id"] == "abc-123"
        for bad in ("x" * 8000, "has space", "new\u00e9line"):
            async with http.get(f"{router.url}/api/nobody/me", headers={"X-Request-Id": bad}) as r:
                echoed = r.headers["X-Request-Id"]
                assert echoed != bad and len(echoed) == 32, echoed


async def test_routes_allow_and_deny_lists_keep_clients_off_paths(
    sim_fleet: SimFleetFactory, start_router: StartRouter
) -> None:
    import dataclasses

    from router.config import RoutesConfig

    fleet = sim_fleet(2, api_key=INSTANCE_KEY)
    cfg = dataclasses.replace(
        router_config(fleet.urls, names=[p.name for p in fleet]),
        routes=RoutesConfig(deny=("/api/server/*",)),
    )
    router = await start_router(config=cfg)
    async with router.client() as http:
        for path in ("/api/server/status", "/API/Server/Stop"):
            async with http.get(router.url + path) as resp:
                assert resp.status == 403, path
                assert (await resp.json())["error"] == "route_denied"
        async with http.get(f"{router.url}/api/sessions") as resp:
            assert resp.status == 200
    allow_only = dataclasses.replace(
        cfg, routes=RoutesConfig(allow=("/api/send*", "/api/sessions*"))
    )
    router2 = await start_router(config=allow_only)
    async with router2.client() as http:
        async with http.get(f"{router2.url}/api/sessions") as resp:
            assert resp.status == 200
        async with http.get(f"{router2.url}/api/contacts?session=x") as resp:
            assert resp.status == 403
