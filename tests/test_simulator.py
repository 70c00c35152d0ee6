"""The simulated WhatsApp instance, tested as real processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.simulator import SimFleet, SimFleetFactory

KEY = "sim-key"
AUTH = {"X-Api-Key": KEY}


@pytest.fixture(scope="module")
def waha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    """Two WAHA instances with an API key, shared by the tests that do not break them."""
    fleet = SimFleet(tmp_path_factory.mktemp("waha"), 2, api_key=KEY, start_delay=0.05)
    yield fleet.start()
    fleet.stop()


@pytest.fixture(scope="module")
def blazz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    fleet = SimFleet(
        tmp_path_factory.mktemp("blazz"), 2, dialect="blazz", api_key=KEY, start_delay=0.05
    )
    yield fleet.start()
    fleet.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


def send_text(session: str, text: str = "hi") -> dict[str, Any]:
    return {"session": session, "chatId": "15550001111@c.us", "text": text}


# -- WAHA -------------------------------------------------------------------


async def test_ready_line_health_and_auth(waha: SimFleet, http: aiohttp.ClientSession) -> None:
    url = waha[0].url
    assert waha[0].port != 0 and url == f"http://127.0.0.1:{waha[0].port}"
    status, body = await call(http, "GET", url + "/health")
    assert status == 200 and body["status"] == "ok"
    assert await call(http, "GET", url + "/ping") == (200, {"message": "pong"})
    for headers in ({}, {"X-Api-Key": "wrong"}):
        status, _ = await call(http, "GET", url + "/api/sessions", headers=headers)
        assert status == 401
    status, body = await call(http, "GET", url + f"/api/server/status?x-api-key={KEY}")
    assert status == 200 and body["worker"] == {"id": "wa-1"}
    assert (await call(http, "GET", url + "/api/sessions", headers=AUTH))[0] == 200


async def test_waha_restore_on_another_instance_and_send_once(
    waha: SimFleet, http: aiohttp.ClientSession
) -> None:
    wa1, wa2 = waha[0], waha[1]
    status, body = await call(
        http, "POST", wa1.url + "/api/sessions", json={"name": "restore-me"}, headers=AUTH
    )
    assert status == 201 and body["status"] == "STARTING" and body["assignedWorker"] == "wa-1"
    await wa1.wait_session("restore-me")
    assert waha.auth_file("restore-me").exists()
    status, body = await call(http, "GET", wa1.url + "/api/sessions/restore-me", headers=AUTH)
    phone = body["me"]["id"]

    # Not on wa-2: every way of naming the session says 404.
    for method, path, kwargs in [
        ("GET", "/api/sessions/restore-me", {}),
        ("POST", "/api/sendText", {"json": send_text("restore-me")}),
        ("GET", "/api/restore-me/chats", {}),
        ("GET", "/api/messages?session=restore-me", {}),
    ]:
        status, body = await call(http, method, wa2.url + path, headers=AUTH, **kwargs)
        assert (status, body["message"]) == (404, "Session not found"), path

    # Its auth is shared: wa-2 can restore it.
    status, body = await call(
        http, "POST", wa2.url + "/api/sessions/restore-me/start", headers=AUTH
    )
    assert status == 201 and body["status"] == "STARTING"
    await wa2.wait_session("restore-me")
    status, body = await call(http, "GET", wa2.url + "/api/sessions/restore-me", headers=AUTH)
    assert body["me"]["id"] == phone and body["assignedWorker"] == "wa-2"

    status, body = await call(
        http,
        "POST",
        wa2.url + "/api/sendText",
        json=send_text("restore-me", "exactly once"),
        headers={**AUTH, "Idempotency-Key": "idem-1"},
    )
    assert status == 201 and body["id"].startswith("true_15550001111@c.us_")
    (record,) = waha.sent("restore-me")
    assert record["instance"] == "wa-2" and record["text"] == "exactly once"
    assert record["message_id"] == body["id"] and record["idempotency_key"] == "idem-1"
    assert all(r["session"] != "restore-me" for r in wa1.sent())


async def test_waha_create_rules(waha: SimFleet, http: aiohttp.ClientSession) -> None:
    url = waha[0].url + "/api/sessions"
    status, body = await call(http, "POST", url, json={}, headers=AUTH)
    assert status == 201 and body["name"].startswith("session_")
    status, body = await call(http, "POST", url, json={"name": "dup", "start": False}, headers=AUTH)
    assert status == 201 and body["status"] == "STOPPED"
    status, body = await call(http, "POST", url, json={"name": "dup"}, headers=AUTH)
    assert status == 422
    _, running = await call(http, "GET", url, headers=AUTH)
    _, everything = await call(http, "GET", url + "?all=true", headers=AUTH)
    assert "dup" not in {s["name"] for s in running}
    assert "dup" in {s["name"] for s in everything}
    # No auth file, not in memory: nothing to start.
    status, _ = await call(http, "POST", url + "/ghost/start", headers=AUTH)
    assert status == 404


async def test_waha_echo_and_files(waha: SimFleet, http: aiohttp.ClientSession) -> None:
    wa1 = waha[0]
    await call(http, "POST", wa1.url + "/api/sessions", json={"name": "echo"}, headers=AUTH)
    status, body = await call(
        http,
        "POST",
        wa1.url + "/api/echo/chats/123/messages?limit=2",
        data=b"hello",
        headers={**AUTH, "X-Custom": "yes"},
    )
    assert status == 200
    assert body["instance"] == "wa-1" and body["session"] == "echo" and body["method"] == "POST"
    assert body["path"] == "/api/echo/chats/123/messages" and body["query"] == {"limit": "2"}
    assert body["headers"]["X-Custom"] == "yes" and body["body"] == "hello"
    status, body = await call(http, "GET", wa1.url + "/api/contacts/all?session=echo", headers=AUTH)
    assert status == 200 and body["session"] == "echo"
    async with http.get(wa1.url + "/api/files/echo/m1.jpg", headers=AUTH) as resp:
        assert resp.status == 200 and resp.content_type == "image/jpeg"
        assert len(await resp.read()) > 0


async def test_waha_websocket_events(waha: SimFleet, http: aiohttp.ClientSession) -> None:
    wa1 = waha[0]
    await call(http, "POST", wa1.url + "/api/sessions", json={"name": "ws"}, headers=AUTH)
    await wa1.wait_session("ws")
    async with http.ws_connect(wa1.url + f"/ws?session=ws&events=message&x-api-key={KEY}") as ws:
        await ws.send_str("ping")
        assert await ws.receive_json(timeout=2) == {"event": "echo", "data": "ping"}
        status, sent = await call(
            http, "POST", wa1.url + "/api/sendText", json=send_text("ws", "yo"), headers=AUTH
        )
        assert status == 201
        event = await ws.receive_json(timeout=2)
        assert event["event"] == "message" and event["session"] == "ws"
        assert event["payload"]["message_id"] == sent["id"]


async def test_waha_qr_session_is_422_until_paired(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession
) -> None:
    wa1 = sim_fleet(1, auto_auth=False, start_delay=0.01)[0]
    await call(http, "POST", wa1.url + "/api/sessions", json={"name": "qr"})
    await wa1.wait_session("qr", "SCAN_QR_CODE")
    status, body = await call(http, "POST", wa1.url + "/api/sendText", json=send_text("qr"))
    assert status == 422 and body["error"].startswith("Session status is not as expected")
    await wa1.pair("qr")
    status, _ = await call(http, "POST", wa1.url + "/api/sendText", json=send_text("qr"))
    assert status == 201 and len(wa1.sent()) == 1


# -- Blazz --------------------------------------------------------------------


async def test_blazz_auth(blazz: SimFleet, http: aiohttp.ClientSession) -> None:
    url = blazz[0].url
    status, body = await call(http, "GET", url + "/health")
    assert status == 200 and body["status"] == "healthy" and "connected" in body["sessions"]
    assert (await call(http, "GET", url + "/health/ready"))[0] == 200
    for kwargs in ({}, {"headers": {"X-Api-Key": KEY}}, {"params": {"api_key": "wrong"}}):
        assert await call(http, "GET", url + "/api/sessions", **kwargs) == (
            401,
            {"error": "Invalid API key"},
        )
    status, body = await call(http, "GET", url + "/api/sessions", params={"api_key": KEY})
    assert status == 200 and body["success"] is True
    status, _ = await call(
        http, "POST", url + "/api/sessions", json={"session_id": "x", "workspace_id": 1}
    )
    assert status == 401


async def test_blazz_restore_and_send(blazz: SimFleet, http: aiohttp.ClientSession) -> None:
    b1, b2 = blazz[0], blazz[1]
    sid = "webjs_7_1700000000_abcdefgh"
    create = {"session_id": sid, "workspace_id": 7, "account_id": 3, "api_key": KEY}
    status, body = await call(http, "POST", b1.url + "/api/sessions", json=create)
    assert status == 200 and body["success"] and body["session_id"] == sid
    await b1.wait_session(sid)
    status, body = await call(http, "GET", b1.url + f"/api/sessions/{sid}/status?api_key={KEY}")
    assert status == 200 and body["status"] == "connected" and body["workspace_id"] == 7

    send = {
        "session_id": sid,
        "workspace_id": 7,
        "recipient_phone": "15550002222",
        "message": "hello",
        "type": "text",
        "api_key": KEY,
    }
    for method, path, kwargs in [
        ("GET", f"/api/sessions/{sid}/status?api_key={KEY}", {}),
        ("GET", f"/api/messages/{sid}/validate?api_key={KEY}", {}),
        ("POST", "/api/messages/send", {"json": send}),
    ]:
        assert await call(http, method, b2.url + path, **kwargs) == (
            404,
            {"success": False, "error": "Session not found"},
        ), path

    # The restore route is broken like the real one; POST /api/sessions restores.
    status, body = await call(http, "POST", b2.url + f"/api/sessions/{sid}/restore", json=create)
    assert (status, body) == (500, {"error": "workspaceId is not defined"})
    status, body = await call(http, "POST", b2.url + "/api/sessions", json=create)
    assert body["status"] == "authenticated"  # auth found: restoring, no QR
    await b2.wait_session(sid)

    status, body = await call(
        http, "POST", b2.url + "/api/messages/send", json={"session_id": sid, "api_key": KEY}
    )
    assert status == 400 and body["error"] == "Missing required fields"
    status, body = await call(http, "POST", b2.url + "/api/messages/send", json=send)
    assert status == 200 and body["success"] is True
    (record,) = blazz.sent(sid)
    assert record["instance"] == "blazz-2" and record["message_id"] == body["message_id"]

    status, body = await call(http, "GET", b2.url + f"/api/sessions?api_key={KEY}")
    assert body["total"] == 1 and body["sessions"][0]["workspace_id"] == 7
    delete = {"api_key": KEY}
    status, body = await call(http, "DELETE", b1.url + "/api/sessions/nope", json=delete)
    assert (status, body) == (200, {"success": True, "alreadyDisconnected": True})


# -- faults, restarts, signals ---------------------------------------------------


async def test_faults(sim_fleet: SimFleetFactory, http: aiohttp.ClientSession) -> None:
    fleet = sim_fleet(1, start_delay=0.01)
    wa1 = fleet[0]
    await call(http, "POST", wa1.url + "/api/sessions", json={"name": "f"})
    await wa1.wait_session("f")

    await wa1.fault("error", status=503)
    assert await call(http, "GET", wa1.url + "/ping") == (
        503,
        {"error": "simulated fault", "statusCode": 503},
    )
    assert (await call(http, "GET", wa1.url + "/_sim/state"))[0] == 200  # /_sim is never faulted

    await wa1.fault("error", status=500, count=1, paths="/api/")
    assert (await call(http, "GET", wa1.url + "/ping"))[0] == 200  # outside paths
    assert (await call(http, "GET", wa1.url + "/api/sessions"))[0] == 500
    assert (await call(http, "GET", wa1.url + "/api/sessions"))[0] == 200  # count used up

    await wa1.fault("slow", delay=0.3)
    started = time.monotonic()
    assert (await call(http, "GET", wa1.url + "/ping"))[0] == 200
    assert time.monotonic() - started >= 0.3

    await wa1.fault("drop")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "POST", wa1.url + "/api/sendText", json=send_text("f", "dropped"))
    assert fleet.sent() == []

    await wa1.fault("drop_after")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "POST", wa1.url + "/api/sendText", json=send_text("f", "delivered"))
    assert [r["text"] for r in fleet.sent()] == ["delivered"]

    await wa1.fault("none")
    assert (await call(http, "GET", wa1.url + "/ping"))[0] == 200


async def test_crash_kill_restart(sim_fleet: SimFleetFactory, http: aiohttp.ClientSession) -> None:
    fleet = sim_fleet(1, start_delay=0.01)
    wa1 = fleet[0]
    port = wa1.port
    await call(http, "POST", wa1.url + "/api/sessions", json={"name": "k"})
    await wa1.wait_session("k")
    status, _ = await call(http, "POST", wa1.url + "/api/sendText", json=send_text("k", "pre-kill"))
    assert status == 201
    wa1.kill()  # SIGKILL right after the answer: the record line is already on disk
    assert [r["text"] for r in wa1.sent()] == ["pre-kill"]

    await wa1.restart_async()
    assert wa1.port == port
    assert await call(http, "GET", wa1.url + "/api/sessions?all=true") == (200, [])
    assert (await call(http, "GET", wa1.url + "/api/sessions/k"))[0] == 404
    assert fleet.auth_file("k").exists()
    await call(http, "POST", wa1.url + "/api/sessions/k/start")
    await wa1.wait_session("k")

    # crash armed on a path: the request is read, then the process dies unanswered.
    await wa1.fault("crash", paths="/api/sendText")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "POST", wa1.url + "/api/sendText", json=send_text("k", "lost"))
    assert await asyncio.to_thread(wa1.wait_exit) == 1
    assert [r["text"] for r in wa1.sent()] == ["pre-kill"]

    await wa1.restart_async()
    await wa1.fault("crash")
    assert await asyncio.to_thread(wa1.wait_exit) == 1


async def test_pause_resume(waha: SimFleet) -> None:
    wa2 = waha[1]
    wa2.pause()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as http:
            with pytest.raises(asyncio.TimeoutError):
                await call(http, "GET", wa2.url + "/ping")
    finally:
        wa2.resume()
    async with aiohttp.ClientSession() as http:
        assert (await call(http, "GET", wa2.url + "/ping"))[0] == 200


# -- streaming helpers ---------------------------------------------------------------


async def test_streaming_helpers(waha: SimFleet, http: aiohttp.ClientSession) -> None:
    url = waha[0].url
    async with http.get(url + "/_sim/stream?n=3&interval=0.2") as resp:
        first = json.loads(await resp.content.readline())
        received_first = time.time()
        rest = [json.loads(line) async for line in resp.content if line.strip()]
    assert [first["i"], *(r["i"] for r in rest)] == [0, 1, 2]
    assert received_first < rest[-1]["ts"]  # the first chunk arrived before the last existed

    async with http.get(url + "/_sim/sse?n=2&interval=0") as resp:
        assert resp.content_type == "text/event-stream"
        assert (await resp.text()).count("event: tick") == 2

    async with http.get(url + "/_sim/gzip", auto_decompress=False) as resp:
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert hashlib.sha256(raw).hexdigest() == resp.headers["X-Sim-Sha256"]

    for query in ("bytes=300000", "bytes=300000&chunked=1"):
        async with http.get(url + "/_sim/big?" + query) as resp:
            body = await resp.read()
            assert len(body) == 300000
            assert hashlib.sha256(body).hexdigest() == resp.headers["X-Sim-Sha256"]

    upload = bytes(range(256)) * 8192  # 2 MiB
    status, body = await call(http, "PUT", url + "/_sim/echo/up/load?x=1", data=upload)
    assert status == 200 and body["method"] == "PUT" and body["path"] == "/_sim/echo/up/load"
    assert body["length"] == len(upload) and body["body_truncated"] is True
    assert body["sha256"] == hashlib.sha256(upload).hexdigest()
