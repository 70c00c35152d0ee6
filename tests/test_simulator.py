"""The simulated WhatsApp instance, tested as real processes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.simulator.blazz import budget_for
from router.simulator.browser import pid_alive
from router.simulator.options import DEFAULT_TIMEOUTS, parse_timeouts
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
        tmp_path_factory.mktemp("blazz"),
        2,
        dialect="blazz",
        api_key=KEY,
        start_delay=0.05,
        extra_args=["--bulk-send-pause", "0.01"],
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
# Every expectation below is an observation of the real service
# (/work/real-blazz/REPORT.md; section letters in the comments).

ALLOWED_STATUSES = {"qr_scanning", "authenticated", "connected", "error", "disconnected"}
NOT_CONNECTED = {"error": "Session not connected. Please check session status."}
NOT_FOUND = {"error": "Session not found"}
BAD_KEY = {"error": "Invalid API key"}


def blazz_create(session: str, workspace: Any = 7, **extra: Any) -> dict[str, Any]:
    body = {"session_id": session, "api_key": KEY, **extra}
    if workspace is not None:
        body["workspace_id"] = workspace
    return body


def blazz_send(session: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"session_id": session, "recipient_phone": "15550002222", "message": text,
            "api_key": KEY, **extra}  # fmt: skip


async def blazz_status(
    http: aiohttp.ClientSession, url: str, session: str, key: str | None = KEY
) -> tuple[int, Any]:
    query = "" if key is None else f"?api_key={key}"
    return await call(http, "GET", f"{url}/api/sessions/{session}/status{query}")


async def status_sequence(
    http: aiohttp.ClientSession,
    url: str,
    session: str,
    until: str,
    within: float = 5.0,
    key: str | None = KEY,
) -> list[str]:
    """The distinct statuses the status route shows, in order, until ``until``."""
    seen: list[str] = []
    async with asyncio.timeout(within):
        while not seen or seen[-1] != until:
            status, body = await blazz_status(http, url, session, key)
            if status == 200 and (not seen or seen[-1] != body["status"]):
                seen.append(body["status"])
            await asyncio.sleep(0.01)  # polling another process: no event to await
    return seen


async def test_blazz_body_parsing_like_express(
    blazz: SimFleet, waha: SimFleet, http: aiohttp.ClientSession
) -> None:
    """(a) express.json() + express.urlencoded(); NestJS parses the same way (WAHA)."""
    url = blazz[0].url + "/api/sessions"
    raw = json.dumps(blazz_create("webjs_1_1_body")).encode()
    # JSON without the JSON content type is not read: no api_key, 401.
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/octet-stream"}):
        assert await call(http, "POST", url, data=raw, headers=headers) == (401, BAD_KEY)
    async with http.post(url, data=raw, skip_auto_headers=["Content-Type"]) as resp:
        assert (resp.status, await resp.json()) == (401, BAD_KEY)
    # curl -d: form-encoded JSON text is one odd key, still no api_key.
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert await call(http, "POST", url, data=raw, headers=headers) == (401, BAD_KEY)
    # A real form works, and its values are strings.
    form = {"workspace_id": "8", "session_id": "webjs_8_1_form", "api_key": KEY}
    assert await call(http, "POST", url, data=form) == (
        200,
        {"success": True, "session_id": "webjs_8_1_form", "status": "qr_scanning"},
    )
    status, body = await blazz_status(http, blazz[0].url, "webjs_8_1_form")
    assert status == 200 and body["workspace_id"] == "8"
    # Parameters and case of the media type do not matter.
    for i, ctype in enumerate(("application/json; charset=utf-8", "Application/JSON")):
        data = json.dumps(blazz_create(f"webjs_1_{i}_ctype")).encode()
        status, _ = await call(http, "POST", url, data=data, headers={"Content-Type": ctype})
        assert status == 200, ctype
    # Malformed JSON: Express's HTML error page, before any route.
    for path in ("/api/sessions", "/api/nothing"):
        async with http.post(
            blazz[0].url + path, data=b"{bad json", headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400 and resp.content_type == "text/html"
            assert "SyntaxError" in await resp.text()
    # JSON nested 20,000 deep is parsed, as V8's iterative JSON.parse does
    # (Python's recursion limit stops at ~1,000: this was a 500).
    deep = b'{"api_key": "' + KEY.encode() + b'", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    async with http.post(
        blazz[0].url + "/api/messages/send", data=deep, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"] == "Missing required fields"
    # A DELETE whose key is in a text/plain body: no key.
    status, body = await call(
        http, "DELETE", url + "/nope", data=json.dumps({"api_key": KEY}),
        headers={"Content-Type": "text/plain"},
    )  # fmt: skip
    assert (status, body) == (401, BAD_KEY)

    # WAHA (NestJS): JSON sent as text/plain is an empty body, a form is a form.
    wurl = waha[0].url
    status, body = await call(
        http, "POST", wurl + "/api/sendText", data=json.dumps(send_text("nestjs")),
        headers={**AUTH, "Content-Type": "text/plain"},
    )  # fmt: skip
    assert (status, body["session"]) == (404, "default")
    status, body = await call(
        http, "POST", wurl + "/api/sendText", data=b'{"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        headers={**AUTH, "Content-Type": "application/json"},
    )  # fmt: skip
    assert (status, body["session"]) == (404, "default")
    status, body = await call(
        http, "POST", wurl + "/api/sessions", data={"name": "formed", "start": "false"},
        headers=AUTH,
    )  # fmt: skip
    assert status == 201 and body["name"] == "formed"
    status, _ = await call(
        http, "POST", wurl + "/api/sessions", data=b"{bad",
        headers={**AUTH, "Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 400


async def test_blazz_auth_per_handler(blazz: SimFleet, http: aiohttp.ClientSession) -> None:
    """(a, b, j) api_key: body for POST/PUT/DELETE, query for GET, never a header."""
    url = blazz[0].url
    status, body = await call(http, "GET", url + "/health")
    assert status == 200 and body["status"] == "healthy"  # no key on health
    for kwargs in (
        {},
        {"headers": {"X-Api-Key": KEY}},
        {"headers": {"X-API-Key": KEY, "Authorization": f"Bearer {KEY}"}},
        {"params": {"api_key": "wrong"}},
        {"json": {"api_key": KEY}},  # a GET reads the query only
    ):
        assert await call(http, "GET", url + "/api/sessions", **kwargs) == (401, BAD_KEY)
    # A repeated or bracketed api_key is an array or an object: 401.
    for query in (f"api_key={KEY}&api_key={KEY}", f"api_key[]={KEY}", f"api_key[x]={KEY}"):
        assert await call(http, "GET", f"{url}/api/sessions?{query}") == (401, BAD_KEY)
    status, body = await call(http, "GET", url + "/api/sessions", params={"api_key": KEY})
    assert status == 200 and body["success"] is True
    # POST / DELETE: the body only.
    create = blazz_create("webjs_2_1_auth")
    no_key = {k: v for k, v in create.items() if k != "api_key"}
    assert await call(http, "POST", f"{url}/api/sessions?api_key={KEY}", json=no_key) == (
        401, BAD_KEY,
    )  # fmt: skip
    assert await call(
        http, "POST", url + "/api/sessions", json=no_key, headers={"X-API-Key": KEY}
    ) == (401, BAD_KEY)
    assert (await call(http, "POST", url + "/api/sessions", json=create))[0] == 200
    assert await call(http, "DELETE", f"{url}/api/sessions/webjs_2_1_auth?api_key={KEY}") == (
        401, BAD_KEY,
    )  # fmt: skip
    # The key is checked first, before the fields.
    assert await call(http, "POST", url + "/api/messages/send", json={"api_key": "x"}) == (
        401, BAD_KEY,
    )  # fmt: skip
    assert await call(http, "PUT", url + "/api/sessions/zz/metadata", json={}) == (401, BAD_KEY)
    assert await call(
        http, "DELETE", url + "/api/sessions/webjs_2_1_auth", json={"api_key": KEY}
    ) == (200, {"success": True, "message": "Session disconnected successfully"})


async def test_blazz_status_sequences_and_create_timing(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession
) -> None:
    """(a, e, h, k) qr_scanning first, even for a restore; answered after initialize()."""
    fleet = sim_fleet(
        2, dialect="blazz", api_key=KEY, start_delay=0.5, extra_args=["--init-delay", "0.3"]
    )
    b1, b2 = fleet[0], fleet[1]
    sid = "webjs_3_1_seq"
    started = time.monotonic()
    creating = asyncio.create_task(
        call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 3))
    )
    # In the map, qr_scanning, before initialize() resolves.
    async with asyncio.timeout(2):
        while (await blazz_status(http, b1.url, sid))[0] != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # polling another process: no event
    assert not creating.done()
    assert (await blazz_status(http, b1.url, sid))[1]["status"] == "qr_scanning"
    assert await creating == (200, {"success": True, "session_id": sid, "status": "qr_scanning"})
    assert time.monotonic() - started >= 0.3
    assert await status_sequence(http, b1.url, sid, "connected") == [
        "qr_scanning", "authenticated", "connected",
    ]  # fmt: skip
    assert fleet.auth_file(sid).exists()
    # A restore from the stored login elsewhere: also qr_scanning first, no QR.
    await call(http, "DELETE", f"{b1.url}/api/sessions/{sid}", json={"api_key": KEY})
    assert await call(http, "POST", b2.url + "/api/sessions", json=blazz_create(sid, 3)) == (
        200, {"success": True, "session_id": sid, "status": "qr_scanning"},
    )  # fmt: skip
    assert await status_sequence(http, b2.url, sid, "connected") == [
        "qr_scanning", "authenticated", "connected",
    ]  # fmt: skip
    (state,) = (await b2.state())["sessions"]
    assert state["status"] == "WORKING" and state["blazz_status"] == "connected"


async def test_blazz_no_auto_auth_pair_error_and_disconnected(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession
) -> None:
    """(e, f, k) qr_scanning until paired; a phone that cannot be read ends in error."""
    b1 = sim_fleet(1, dialect="blazz", auto_auth=False, start_delay=0.1)[0]  # no API key
    # API_KEY unset: undefined === undefined, only requests WITHOUT api_key pass.
    assert (await call(http, "GET", b1.url + "/api/sessions"))[0] == 200
    assert await call(http, "GET", b1.url + "/api/sessions?api_key=x") == (401, BAD_KEY)
    for sid in ("webjs_4_1_qr", "webjs_4_2_err"):
        status, _ = await call(http, "POST", b1.url + "/api/sessions",
                               json={"session_id": sid, "workspace_id": 4})  # fmt: skip
        assert status == 200
        await b1.wait_session(sid, "SCAN_QR_CODE")
    send = {"session_id": "webjs_4_1_qr", "recipient_phone": "1555", "message": "x"}
    await asyncio.sleep(0.3)  # longer than start_delay: still waiting for a scan
    assert (await blazz_status(http, b1.url, "webjs_4_1_qr", None))[1]["status"] == "qr_scanning"
    assert await call(http, "POST", b1.url + "/api/messages/send", json=send) == (
        400,
        NOT_CONNECTED,
    )

    await b1._sim("POST", "/_sim/sessions/webjs_4_1_qr/pair", {"phone": "15550001111"})
    assert await status_sequence(http, b1.url, "webjs_4_1_qr", "connected", key=None) == [
        "authenticated", "connected",
    ]  # fmt: skip
    _, body = await blazz_status(http, b1.url, "webjs_4_1_qr", None)
    assert body["phone_number"] == "15550001111"
    assert (await call(http, "POST", b1.url + "/api/messages/send", json=send))[0] == 200

    await b1._sim("POST", "/_sim/sessions/webjs_4_2_err/pair", {"phone": "none"})
    await b1.wait_session("webjs_4_2_err", "FAILED")
    _, body = await blazz_status(http, b1.url, "webjs_4_2_err", None)
    assert body["status"] == "error" and body["phone_number"] is None
    err_send = {**send, "session_id": "webjs_4_2_err"}
    assert await call(http, "POST", b1.url + "/api/messages/send", json=err_send) == (
        400, NOT_CONNECTED,
    )  # fmt: skip
    with pytest.raises(aiohttp.ClientResponseError):  # only a QR can be scanned
        await b1.pair("webjs_4_2_err")

    await b1._sim("POST", "/_sim/sessions/webjs_4_1_qr/disconnect", {"reason": "NAVIGATION"})
    _, body = await blazz_status(http, b1.url, "webjs_4_1_qr", None)
    assert body["status"] == "disconnected"
    _, health = await call(http, "GET", b1.url + "/health")
    assert health["sessions"] == {"total": 2, "connected": 0, "disconnected": 2}
    _, listed = await call(http, "GET", b1.url + "/api/sessions")
    assert {s["status"] for s in listed["sessions"]} <= ALLOWED_STATUSES


async def test_blazz_profile_lock(
    blazz: SimFleet, sim_fleet: SimFleetFactory, http: aiohttp.ClientSession
) -> None:
    """(d, h) one Chromium per profile (workspace, session) in the shared directory."""
    b1, b2 = blazz[0], blazz[1]
    sid = "webjs_5_1_lock"
    assert (await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 5)))[0] == 200
    await b1.wait_session(sid)
    # Running on b1: b2 cannot launch the profile, and keeps no record.
    status, body = await call(http, "POST", b2.url + "/api/sessions", json=blazz_create(sid, 5))
    assert status == 500 and body["error"].startswith("Failed to launch the browser process!\n")
    assert f"workspace_5/session-{sid}/SingletonLock: File exists (17)" in body["error"]
    assert await blazz_status(http, b2.url, sid) == (404, NOT_FOUND)
    assert (await blazz_status(http, b1.url, sid))[1]["status"] == "connected"
    # The same create again on b1: same 500, and b1 loses its own record...
    _, before = await call(http, "GET", b1.url + "/health")
    status, body = await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 5))
    assert status == 500 and "SingletonLock" in body["error"]
    assert await blazz_status(http, b1.url, sid) == (404, NOT_FOUND)
    _, listed = await call(http, "GET", f"{b1.url}/api/sessions?api_key={KEY}")
    assert sid not in [s.get("session_id") for s in listed["sessions"]]
    _, after = await call(http, "GET", b1.url + "/health")
    assert after["sessions"]["total"] == before["sessions"]["total"] - 1
    assert await call(http, "DELETE", f"{b1.url}/api/sessions/{sid}", json={"api_key": KEY}) == (
        200,
        {"success": True, "message": "Session already disconnected or not found in memory",
         "alreadyDisconnected": True},
    )  # fmt: skip
    # ...while its browser keeps the profile locked.
    assert (await call(http, "POST", b2.url + "/api/sessions", json=blazz_create(sid, 5)))[0] == 500
    # Another workspace is another profile: that create succeeds (the first browser leaks).
    status, body = await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 6))
    assert (status, body["status"]) == (200, "qr_scanning")

    # A stale lock (holder dead) is taken over silently.
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    profile = blazz.auth_dir / "workspace_9" / "session-webjs_9_1_stale"
    profile.mkdir(parents=True)
    (profile / "SingletonLock").symlink_to(f"{socket.gethostname()}-{dead.pid}")
    stale = blazz_create("webjs_9_1_stale", 9)
    assert (await call(http, "POST", b2.url + "/api/sessions", json=stale))[0] == 200


async def test_blazz_browser_linger_and_restore_after_kill(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession
) -> None:
    """(h) SIGKILL orphans the browser: the profile stays locked until it dies."""
    fleet = sim_fleet(
        2, dialect="blazz", api_key=KEY, start_delay=0.05, extra_args=["--browser-linger", "1.5"]
    )
    b1, b2 = fleet[0], fleet[1]
    sid = "webjs_6_1_orphan"
    assert (await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 6)))[0] == 200
    await b1.wait_session(sid)
    (state,) = (await b1.state())["sessions"]
    browser = state["browser_pid"]
    phone = state["phone"]
    assert isinstance(browser, int) and browser != b1.pid
    lock = fleet.auth_file(sid).parent / "SingletonLock"
    assert os.readlink(lock) == f"{socket.gethostname()}-{browser}"

    b1.kill()  # SIGKILL: the browser survives, the lock is live
    assert pid_alive(browser)
    status, body = await call(http, "POST", b2.url + "/api/sessions", json=blazz_create(sid, 6))
    assert status == 500 and "SingletonLock" in body["error"]
    async with asyncio.timeout(5):
        while pid_alive(browser):  # noqa: ASYNC110 - another process: no event to await
            await asyncio.sleep(0.05)
    # The orphan died and left a stale lock: b2 takes over and restores the login.
    assert (await call(http, "POST", b2.url + "/api/sessions", json=blazz_create(sid, 6)))[0] == 200
    assert await status_sequence(http, b2.url, sid, "connected") in (
        ["qr_scanning", "authenticated", "connected"], ["authenticated", "connected"],
        ["qr_scanning", "connected"], ["connected"],
    )  # fmt: skip
    (state,) = (await b2.state())["sessions"]
    assert state["phone"] == phone
    # DELETE closes the browser and removes its lock; the login stays.
    second = state["browser_pid"]
    await call(http, "DELETE", f"{b2.url}/api/sessions/{sid}", json={"api_key": KEY})
    assert not pid_alive(second) and not lock.is_symlink() and fleet.auth_file(sid).exists()
    # A graceful stop kills the browsers too.
    await call(http, "POST", b2.url + "/api/sessions", json=blazz_create(sid, 6))
    await b2.wait_session(sid)
    third = (await b2.state())["sessions"][0]["browser_pid"]
    await b2.stop_async()
    assert not pid_alive(third) and not lock.is_symlink()


async def test_blazz_without_workspace_and_invalid_ids(
    blazz: SimFleet, http: aiohttp.ClientSession
) -> None:
    """(a, g) workspace_id is optional (profile workspace_undefined); LocalAuth checks ids."""
    url = blazz[0].url
    sid = "webjs_x_1_nows"
    assert await call(http, "POST", url + "/api/sessions", json=blazz_create(sid, None)) == (
        200, {"success": True, "session_id": sid, "status": "qr_scanning"},
    )  # fmt: skip
    await blazz[0].wait_session(sid)
    _, body = await blazz_status(http, url, sid)
    assert "workspace_id" not in body and body["status"] == "connected"
    _, listed = await call(http, "GET", f"{url}/api/sessions?api_key={KEY}")
    (entry,) = [s for s in listed["sessions"] if s.get("session_id") == sid]
    assert "workspace_id" not in entry
    assert (blazz.auth_dir / "workspace_undefined" / f"session-{sid}").is_dir()
    invalid = {
        "error": "Invalid clientId. Only alphanumeric characters, underscores and hyphens "
        "are allowed."
    }
    for bad in ("a.b", "a/b", "caf\u00e9", "a b", "x\n"):
        assert await call(http, "POST", url + "/api/sessions", json=blazz_create(bad)) == (
            500, invalid,
        ), bad  # fmt: skip
    assert (await call(http, "POST", url + "/api/sessions", json=blazz_create("A-b_9")))[0] == 200


async def test_blazz_session_bodies(blazz: SimFleet, http: aiohttp.ClientSession) -> None:
    """(b, e, h) the exact bodies of status, list, metadata, delete, restore, reconnect."""
    b1 = blazz[0]
    sid = "webjs_7_1700000000_bodies"
    await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 7, account_id=11))
    await b1.wait_session(sid)
    status, body = await blazz_status(http, b1.url, sid)
    assert status == 200 and list(body) == [
        "session_id", "status", "phone_number", "workspace_id", "connected_at", "last_activity",
    ]  # fmt: skip
    assert body["connected_at"].endswith("Z") and body["workspace_id"] == 7
    assert await blazz_status(http, b1.url, "nope") == (404, NOT_FOUND)
    assert await blazz_status(http, b1.url, sid.upper()) == (404, NOT_FOUND)
    _, listed = await call(http, "GET", f"{b1.url}/api/sessions?api_key={KEY}")
    assert set(listed) == {"success", "sessions", "total"}
    (entry,) = [s for s in listed["sessions"] if s["session_id"] == sid]
    assert list(entry) == ["session_id", "workspace_id", "status", "phone_number", "connected_at"]
    status, meta = await call(http, "GET", f"{b1.url}/api/sessions/{sid}/metadata?api_key={KEY}")
    assert status == 200 and meta["metadata"]["accountId"] == 11
    assert meta["metadata"]["workspaceId"] == 7 and meta["metadata"]["status"] == "connected"
    metadata_url = f"{b1.url}/api/sessions/{sid}/metadata"
    assert await call(http, "PUT", metadata_url, json={"api_key": KEY, "tag": "x"}) == (
        400, {"error": "Invalid updates object"},
    )  # fmt: skip
    status, body = await call(
        http, "PUT", metadata_url, json={"api_key": KEY, "updates": {"tag": "x"}}
    )
    assert status == 200 and body["metadata"]["tag"] == "x"
    assert await call(
        http, "PUT", b1.url + "/api/sessions/zzz/metadata", json={"api_key": KEY, "updates": {}}
    ) == (200, {"success": True, "session_id": "zzz", "metadata": None})
    assert await call(http, "GET", f"{b1.url}/api/sessions/zzz/metadata?api_key={KEY}") == (
        404, NOT_FOUND,
    )  # fmt: skip
    for target in (sid, "zzz"):
        assert await call(
            http, "POST", f"{b1.url}/api/sessions/{target}/restore",
            json={"api_key": KEY, "workspace_id": 7},
        ) == (500, {"error": "workspaceId is not defined"})  # fmt: skip
    assert await call(
        http, "POST", f"{b1.url}/api/sessions/{sid}/reconnect",
        json={"api_key": KEY, "workspace_id": 7},
    ) == (200, {"success": True, "session_id": sid, "status": "qr_scanning"})  # fmt: skip
    assert await call(
        http, "POST", f"{b1.url}/api/sessions/{sid}/regenerate-qr",
        json={"api_key": KEY, "workspace_id": 7},
    ) == (200, {"expires_in": 300})  # fmt: skip
    assert await call(http, "DELETE", f"{b1.url}/api/sessions/{sid}", json={"api_key": KEY}) == (
        200, {"success": True, "message": "Session disconnected successfully"},
    )  # fmt: skip
    assert blazz.auth_file(sid).exists()  # the login stays on disk


async def test_blazz_sends(blazz: SimFleet, http: aiohttp.ClientSession) -> None:
    """(f) check order, bodies, what is recorded; a dead browser is not noticed."""
    b1 = blazz[0]
    url = b1.url + "/api/messages/send"
    sid = "webjs_8_1_send"
    await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 8))
    missing = {
        "error": "Missing required fields",
        "required": ["session_id", "recipient_phone", "message"],
    }
    assert await call(http, "POST", url, json={"api_key": "x"}) == (401, BAD_KEY)
    for drop in ("session_id", "recipient_phone", "message"):
        body = {k: v for k, v in blazz_send(sid).items() if k != drop}
        assert await call(http, "POST", url, json=body) == (400, missing), drop
    bad_phone = {**blazz_send("unknown"), "recipient_phone": "abc"}
    assert await call(http, "POST", url, json=bad_phone) == (
        400, {"error": "Invalid phone number format"},
    )  # phone before the session  # fmt: skip
    assert await call(http, "POST", url, json=blazz_send("unknown")) == (404, NOT_FOUND)
    await b1.wait_session(sid)
    # workspace_id is not needed for a send.
    status, body = await call(http, "POST", url, json=blazz_send(sid, "exactly once"),
                              headers={"Idempotency-Key": "i-1"})  # fmt: skip
    assert status == 200 and list(body) == ["success", "message_id", "timestamp"]
    (record,) = blazz.sent(sid)
    assert record["message_id"] == body["message_id"] and record["text"] == "exactly once"
    assert record["instance"] == "blazz-1" and record["idempotency_key"] == "i-1"
    # A type no branch sends: 200 {"success":true}, nothing sent.
    assert await call(http, "POST", url, json=blazz_send(sid, "img", type="image")) == (
        200, {"success": True},
    )  # fmt: skip
    media_url = b1.url + "/api/messages/send-media"
    media = {"session_id": sid, "recipient_phone": "15550002222", "api_key": KEY}
    assert await call(http, "POST", media_url, json=media) == (400, {
        "error": "Missing required fields",
        "required": ["session_id", "recipient_phone", "media_url"],
    })  # fmt: skip
    status, _ = await call(http, "POST", media_url, json={**media, "media_url": "http://x/y.png"})
    assert status == 200
    assert [r["text"] for r in blazz.sent(sid)] == ["exactly once", "http://x/y.png"]

    bulk = {"session_id": "unknown", "recipients": ["15550002222"], "message": "b",
            "api_key": KEY}  # fmt: skip
    assert await call(http, "POST", b1.url + "/api/messages/bulk-send", json=bulk) == (200, {
        "success": True, "total": 1, "successful": 0, "failed": 1,
        "results": [{"recipient": "15550002222", "success": False, "error": "Session not found"}],
        "errors": [{"recipient": "15550002222", "success": False, "error": "Session not found"}],
    })  # fmt: skip
    status, body = await call(http, "GET", f"{b1.url}/api/messages/unknown/validate?api_key={KEY}")
    assert (status, body) == (
        404,
        {"success": False, "error": "Session not found", "can_send": False},
    )
    status, body = await call(http, "GET", f"{b1.url}/api/messages/{sid}/validate?api_key={KEY}")
    assert status == 200 and body["can_send"] is True and body["status"] == "connected"
    status_url = f"{b1.url}/api/messages/unknown/status?message_id=m&api_key={KEY}"
    assert await call(http, "GET", status_url) == (404, NOT_FOUND)

    # A "connected" session whose page never loaded (status forced by metadata PUT).
    forced = "webjs_8_2_forced"
    await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(forced, 8))
    await call(http, "PUT", f"{b1.url}/api/sessions/{forced}/metadata",
               json={"api_key": KEY, "updates": {"status": "connected"}})  # fmt: skip
    status, body = await call(http, "POST", url, json=blazz_send(forced))
    assert status == 500 and body["error"].startswith("Evaluation failed: TypeError")
    # The browser dies: nothing notices, every send is a 500 until DELETE.
    await b1._sim("POST", f"/_sim/sessions/{sid}/kill-browser")
    assert (await blazz_status(http, b1.url, sid))[1]["status"] == "connected"
    assert await call(http, "POST", url, json=blazz_send(sid, "lost")) == (500, {
        "error": "Protocol error (Runtime.callFunctionOn): Session closed. "
        "Most likely the page has been closed."
    })  # fmt: skip
    assert len(blazz.sent(sid)) == 2
    assert await call(http, "DELETE", f"{b1.url}/api/sessions/{sid}", json={"api_key": KEY}) == (
        200, {"success": True, "message": "Session disconnected successfully"},
    )  # fmt: skip


async def test_blazz_health_endpoints(blazz: SimFleet, http: aiohttp.ClientSession) -> None:
    """(c) /health always 200; /health/ready needs a main app; /health/live is always 503."""
    url = blazz[1].url
    status, body = await call(http, "GET", url + "/health")
    assert status == 200 and list(body) == ["status", "uptime", "sessions", "memory", "timestamp"]
    assert set(body["sessions"]) == {"total", "connected", "disconnected"}
    assert set(body["memory"]) == {"used", "total", "unit"} and body["memory"]["unit"] == "MB"
    status, body = await call(http, "GET", url + "/health/ready")
    assert status == 503 and body["ready"] is False  # no --laravel-url
    assert body["checks"]["laravel_configured"] is False
    assert body["checks"]["api_key_configured"] is True
    status, body = await call(http, "GET", url + "/health/live")
    assert status == 503 and body["alive"] is False and body["event_loop_delay_ms"] == {}


async def test_blazz_routing_like_express(blazz: SimFleet, http: aiohttp.ClientSession) -> None:
    """(j) case-insensitive, optional trailing slash, decoded ids, Express's 404 and 500."""
    b1 = blazz[0]
    sid = "webjs_9_1_route"
    await call(http, "POST", b1.url + "/api/sessions", json=blazz_create(sid, 9))
    for path in (f"/API/sessions?api_key={KEY}", f"/api/sessions/?api_key={KEY}",
                 f"/Api/Sessions/{sid}/STATUS?api_key={KEY}",
                 f"/api/sessions/{sid}/status/?api_key={KEY}",
                 f"/api/sessions/webjs%5F9_1_route/status?api_key={KEY}"):  # fmt: skip
        assert (await call(http, "GET", b1.url + path))[0] == 200, path
    assert await call(http, "GET", f"{b1.url}/api/sessions/a%2Fb/status?api_key={KEY}") == (
        404, NOT_FOUND,
    )  # fmt: skip

    async def raw(method: str, path: str) -> tuple[int, Any]:
        async with http.request(method, yarl.URL(b1.url + path, encoded=True)) as resp:
            return resp.status, await resp.json()

    for method, path in (("GET", f"//api/sessions?api_key={KEY}"),
                         ("GET", f"/api/nothing?api_key={KEY}"),
                         ("PUT", "/api/sessions"),
                         ("GET", f"/api/x/../sessions?api_key={KEY}")):  # fmt: skip
        status, body = await raw(method, path)
        assert status == 404 and body["error"] == "Endpoint not found", path
        assert body["path"] == path and body["method"] == method  # the key leaks, as real
        assert "/api/sessions" in body["available_endpoints"] and body["timestamp"]
    status, body = await raw("GET", f"/api/sessions/a%zz/status?api_key={KEY}")
    assert status == 500
    assert body["error"] == "Internal server error"
    assert body["message"] == "Failed to decode param 'a%zz'"


def test_blazz_timeout_budgets() -> None:
    """(j) TimeoutHandler: first pattern found anywhere in req.path, case-sensitive."""
    budgets = dict(DEFAULT_TIMEOUTS)
    assert budget_for("/api/sessions", budgets) == 60
    assert budget_for("/api/sessions/x/status", budgets) == 60  # /api/sessions matches first
    assert budget_for("/api/messages/send-media", budgets) == 45
    assert budget_for("/api/messages/bulk-send", budgets) == 30
    assert budget_for("/health/ready", budgets) == 5
    assert budget_for("/API/sessions", budgets) == 30
    assert parse_timeouts("sessions=1.5")[0] == ("sessions", 1.5)


async def test_blazz_reaching_a_timeout_crashes_the_process(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession
) -> None:
    """(j) winston.warning is not a function: the instance dies, the caller gets no answer."""
    fleet = sim_fleet(
        1, dialect="blazz", api_key=KEY,
        extra_args=["--request-timeouts", "sessions=0.4,health=0.3", "--init-delay", "0.1"],
    )  # fmt: skip
    b1 = fleet[0]
    create = blazz_create("webjs_1_t")
    assert (await call(http, "POST", b1.url + "/api/sessions", json=create))[0] == 200

    async def get(path: str) -> tuple[int, Any]:
        # One connection per call: the process behind the port changes.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as once:
            return await call(once, "GET", b1.url + path)

    # No answer at all: disconnected or reset (then aiohttp retries a GET once
    # and finds no listener).
    no_answer = aiohttp.ClientConnectionError
    await b1.fault("slow", delay=1.0, paths="/health", count=1)
    with pytest.raises(no_answer):
        await get("/health")
    assert await asyncio.to_thread(b1.wait_exit) == 1
    assert "winston.warning is not a function" in b1.log_tail()

    await b1.restart_async()
    assert (await get("/health"))[0] == 200  # within the budget
    await b1.fault("slow", delay=1.0, paths="/api/sessions", count=1)
    with pytest.raises(no_answer):
        await get(f"/api/sessions?api_key={KEY}")
    assert await asyncio.to_thread(b1.wait_exit) == 1


async def test_blazz_timeout_starts_after_the_body_is_parsed(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession
) -> None:
    """express.json() runs before TimeoutHandler: a slow upload spends no budget."""
    fleet = sim_fleet(
        1, dialect="blazz", api_key=KEY, extra_args=["--request-timeouts", "health=0.3"]
    )
    b1 = fleet[0]
    url = yarl.URL(b1.url)

    async def slow_upload(method: str, body: bytes) -> bytes:
        """Headers and half the body, a pause past the budget, then the rest."""
        reader, writer = await asyncio.open_connection(url.host, url.port)
        head = (
            f"{method} /health HTTP/1.1\r\nHost: {url.host}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body[:1])
        await writer.drain()
        await asyncio.sleep(0.8)
        writer.write(body[1:])
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    # A body-parse error answers 400 and never starts the timer.
    assert (await slow_upload("POST", b'{"a":')).startswith(b"HTTP/1.1 400 ")
    # Upload time does not count toward the route's budget.
    assert (await slow_upload("GET", b"{}")).startswith(b"HTTP/1.1 200 ")
    assert (await call(http, "GET", b1.url + "/health"))[0] == 200
    assert "winston.warning" not in b1.log_tail()


class FakeLaravel:
    """The main app: records every request; ``answer`` sets a status per path."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.requests: list[dict[str, Any]] = []
        self.answer: dict[str, int] = {}
        self.active: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(
            {"method": request.method, "path": request.path, "headers": dict(request.headers),
             "raw": raw, "body": json.loads(raw) if raw else None, "at": time.monotonic()}
        )  # fmt: skip
        self.arrived.set()
        status = self.answer.get(request.path, 200)
        if request.path == "/api/whatsapp/accounts/active":
            return web.json_response({"sessions": self.active}, status=status)
        return web.json_response({"ok": status < 300}, status=status)

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/api/whatsapp/webhooks/webjs"
                and (event is None or r["body"]["event"] == event)]  # fmt: skip

    async def wait(self, check: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not check():
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def laravel() -> AsyncIterator[FakeLaravel]:
    fake = FakeLaravel("hmac-secret")
    await fake.server.start_server()
    yield fake
    await fake.server.close()


def laravel_args(fake: FakeLaravel, *more: str) -> list[str]:
    url = str(fake.server.make_url("")).rstrip("/")
    return ["--laravel-url", url, "--hmac-secret", fake.secret, "--retry-scale", "0.01", *more]


async def test_blazz_webhooks_signed_and_retried(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession, laravel: FakeLaravel
) -> None:
    """(i) events, headers and HMAC of the real notifier; retries only for 429 and network."""
    b1 = sim_fleet(1, dialect="blazz", api_key=KEY, auto_auth=False, start_delay=0.1,
                   extra_args=laravel_args(laravel, "--qr-interval", "0.3"))[0]  # fmt: skip
    status, body = await call(http, "GET", b1.url + "/health/ready")
    assert status == 200 and body["ready"] is True
    await laravel.wait(lambda: bool(laravel.requests))  # after listen()
    assert laravel.requests[0]["path"] == "/api/whatsapp/accounts/active"
    assert laravel.requests[0]["headers"]["X-API-Key"] == KEY

    await call(http, "POST", b1.url + "/api/sessions", json=blazz_create("webjs_2_1_hook", 2))
    await laravel.wait(lambda: len(laravel.events("qr_code_generated")) >= 2)
    first, second = laravel.events("qr_code_generated")[:2]
    headers = first["headers"]
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "WhatsApp-WebJS-Service/1.0"
    assert headers["X-Instance-Url"] == f"http://localhost:{b1.port}"
    expected = hmac.new(
        b"hmac-secret", headers["X-Timestamp"].encode() + first["raw"], hashlib.sha256
    ).hexdigest()
    assert headers["X-HMAC-Signature"] == expected
    assert abs(int(headers["X-Timestamp"]) - time.time()) < 5
    data = first["body"]["data"]
    assert first["body"]["event"] == "qr_code_generated"
    assert (data["workspace_id"], data["session_id"], data["expires_in"]) == (
        2,
        "webjs_2_1_hook",
        60,
    )
    assert data["qr_code"].startswith("data:image/png;base64,")
    assert (data["qr_count"], data["is_regeneration"]) == (1, False)
    assert (second["body"]["data"]["qr_count"], second["body"]["data"]["is_regeneration"]) == (
        2,
        True,
    )

    await b1._sim("POST", "/_sim/sessions/webjs_2_1_hook/pair", {"phone": "15550001111"})
    await laravel.wait(lambda: bool(laravel.events("session_ready")))
    assert laravel.events("session_authenticated")[0]["body"]["data"] == {
        "workspace_id": 2, "session_id": "webjs_2_1_hook", "status": "authenticated",
    }  # fmt: skip
    ready = laravel.events("session_ready")[0]["body"]["data"]
    assert (ready["phone_number"], ready["status"]) == ("15550001111", "connected")

    # 429: 4 attempts, then dropped; 500: one attempt, no retry.
    laravel.answer["/api/whatsapp/webhooks/webjs"] = 429
    await call(http, "POST", b1.url + "/api/sessions", json=blazz_create("webjs_2_2_busy", 2))
    await laravel.wait(lambda: len(laravel.events("qr_code_generated")) >= 6)
    busy = [r for r in laravel.events("qr_code_generated")
            if r["body"]["data"]["session_id"] == "webjs_2_2_busy"]  # fmt: skip
    await asyncio.sleep(0.3)
    assert len([r for r in laravel.events("qr_code_generated")
                if r["body"]["data"]["session_id"] == "webjs_2_2_busy"
                and r["body"]["data"]["qr_count"] == 1]) == 4  # fmt: skip
    assert busy
    laravel.answer["/api/whatsapp/webhooks/webjs"] = 500
    await b1._sim("POST", "/_sim/sessions/webjs_2_2_busy/pair", {"phone": "none"})
    await laravel.wait(lambda: bool(laravel.events("session_error")))
    await asyncio.sleep(0.3)
    (error,) = laravel.events("session_error")
    assert error["body"]["data"] == {
        "workspace_id": 2, "session_id": "webjs_2_2_busy", "error": "phone_extraction_failed",
        "message": "Failed to extract phone number after retries",
    }  # fmt: skip


async def test_blazz_startup_restore_races_on_the_lock(
    sim_fleet: SimFleetFactory, http: aiohttp.ClientSession, laravel: FakeLaravel
) -> None:
    """(h) every instance creates every active session; losers report mark-disconnected."""
    laravel.active = [
        {"id": 1, "session_id": "act_1", "workspace_id": 3},
        {"id": 2, "session_id": "act_2", "workspace_id": 3},
        {"id": 3, "session_id": "bad.id", "workspace_id": 3},
    ]
    fleet = sim_fleet(2, dialect="blazz", api_key=KEY, extra_args=laravel_args(laravel))
    marks = lambda: [r for r in laravel.requests if r["path"].endswith("/mark-disconnected")]  # noqa: E731
    await laravel.wait(lambda: len(marks()) == 4)  # act_1 and act_2 lost once, bad.id twice
    for sid in ("act_1", "act_2"):
        running = [p.name for p in fleet if await p.session_status(sid) is not None]
        assert len(running) == 1, sid
        (mark,) = [
            m for m in marks() if m["path"] == f"/api/whatsapp/sessions/{sid}/mark-disconnected"
        ]
        assert mark["headers"]["X-API-Key"] == KEY and mark["body"]["workspace_id"] == 3
        assert "SingletonLock" in mark["body"]["reason"]
    bad = [m for m in marks() if "bad.id" in m["path"]]
    assert len(bad) == 2 and bad[0]["body"]["reason"].startswith("Invalid clientId")
    gets = [r for r in laravel.requests if r["path"] == "/api/whatsapp/accounts/active"]
    assert len(gets) == 2


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
