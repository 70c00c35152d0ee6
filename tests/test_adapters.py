"""Pure tests of the upstream adapters: extraction, credentials, answers, options.

Paths and bodies are the shapes documented in ``shared/upstreams.md``. Every
request goes through ``needs_body`` first, as in the proxy: the adapter only
sees the JSON body when it asked for it.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, MultiDict
from yarl import URL

from router.adapters import ADAPTERS, build_adapter
from router.adapters.base import (
    Adapter,
    BadSessionId,
    Extraction,
    SessionInfo,
    SessionStatus,
    UpstreamRequest,
    valid_session_id,
)
from router.adapters.blazz import BlazzAdapter, workspace_from_id
from router.adapters.evolution import EvolutionAdapter
from router.adapters.generic import GenericAdapter
from router.adapters.waha import WahaAdapter
from router.adapters.wwebjs import WwebjsAdapter
from router.config import AdapterConfig, InstanceConfig

INST = InstanceConfig(name="i1", url="http://127.0.0.1:3001/", api_key="instance-key")
INST_NOKEY = InstanceConfig(name="i2", url="http://127.0.0.1:3002")
BLAZZ_ID = "webjs_12_1700000000_ab12cd34"


def make(
    adapter: Adapter,
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> UpstreamRequest:
    """The request as the proxy hands it to the adapter."""
    u = URL(url)
    json_body = body if adapter.needs_body(method, u.path) else None
    return UpstreamRequest(
        method=method,
        path=u.path,
        query=MultiDict(u.query),
        headers=CIMultiDict(headers or {}),
        json=json_body,
    )


def extract(
    adapter: Adapter, method: str, url: str, body: dict[str, Any] | None = None
) -> Extraction:
    return adapter.extract(make(adapter, method, url, body))


S = Extraction
NONE = Extraction(None)
FANOUT = Extraction(None, fanout=True)
CREATE = Extraction(None, create=True)


def created(name: str) -> Extraction:
    return Extraction(name, create=True)


BAD_IDS = [
    "../etc",
    "..",
    "a b",
    "x" * 200,
    "x" * 129,
    "",
    "séssion",
    "сессия",
    "%2e%2e",
    "a/b",
    "-leading-dash",
    ".hidden",
    "a\nb",
    "a;b",
]

# =============================================================================
# WAHA
# =============================================================================

waha = WahaAdapter()

WAHA_CASES: list[tuple[str, str, dict[str, Any] | None, Extraction]] = [
    # path /api/{session}/...
    ("GET", "/api/default/auth/qr?format=image", None, S("default")),
    ("POST", "/api/default/auth/request-code", {"phoneNumber": "123"}, S("default")),
    ("GET", "/api/sales-01/chats?limit=20&offset=0", None, S("sales-01")),
    ("GET", "/api/sales-01/chats/123456789@c.us/messages?limit=10", None, S("sales-01")),
    ("POST", "/api/sales-01/chats/123@c.us/messages/read", {}, S("sales-01")),
    ("GET", "/api/sales-01/contacts/all", None, S("sales-01")),
    ("GET", "/api/s.1/groups", None, S("s.1")),
    ("POST", "/api/s.1/groups", {"name": "g", "participants": []}, S("s.1")),
    ("GET", "/api/user@example.com/profile", None, S("user@example.com")),
    ("POST", "/api/tenant_7/presence", {"presence": "online"}, S("tenant_7")),
    ("GET", "/api/tenant_7/channels", None, S("tenant_7")),
    ("POST", "/api/tenant_7/status/text", {"text": "hi"}, S("tenant_7")),
    ("GET", "/api/tenant_7/labels", None, S("tenant_7")),
    ("GET", "/api/tenant_7/me", None, S("tenant_7")),
    ("DELETE", "/api/tenant_7/chats/123@c.us", None, S("tenant_7")),
    # a session whose name merely starts like a reserved root
    ("GET", "/api/sessionsX/chats", None, S("sessionsX")),
    ("GET", "/api/sendTexts/chats", None, S("sendTexts")),
    # /api/sessions family
    ("GET", "/api/sessions", None, NONE),
    ("GET", "/api/sessions?all=true", None, NONE),
    ("GET", "/api/sessions/", None, NONE),
    ("POST", "/api/sessions", {"name": "s2", "start": True}, created("s2")),
    ("POST", "/api/sessions/", {"name": "s2"}, created("s2")),
    ("POST", "/api/sessions", {}, CREATE),
    ("POST", "/api/sessions", {"name": "", "config": {}}, CREATE),
    ("POST", "/api/sessions", {"config": {"webhooks": []}}, CREATE),
    ("POST", "/api/sessions", None, CREATE),  # not JSON: WAHA invents the name
    ("GET", "/api/sessions/s3", None, S("s3")),
    ("GET", "/api/sessions/s3/", None, S("s3")),
    ("PUT", "/api/sessions/s3", {"config": {}}, S("s3")),
    ("DELETE", "/api/sessions/s3", None, S("s3")),
    ("GET", "/api/sessions/s3/me", None, S("s3")),
    # starting a (stopped) session creates it again: router.removals
    ("POST", "/api/sessions/s3/start", None, created("s3")),
    ("POST", "/api/sessions/s3/stop", None, S("s3")),
    ("POST", "/api/sessions/s3/restart", None, S("s3")),
    ("POST", "/api/sessions/s3/logout", None, S("s3")),
    # legacy body-name calls
    ("POST", "/api/sessions/start", {"name": "s4"}, created("s4")),
    ("POST", "/api/sessions/start/", {"name": "s4", "config": {}}, created("s4")),
    ("POST", "/api/sessions/start", {}, created("default")),
    ("POST", "/api/sessions/stop", {"name": "s4", "logout": True}, S("s4")),
    ("POST", "/api/sessions/logout", {"name": "s4"}, S("s4")),
    ("POST", "/api/sessions/stop", {}, S("default")),
    # ... but a GET of a session named "start" is just that
    ("GET", "/api/sessions/start", None, S("start")),
    ("POST", "/api/sessions/start/start", None, created("start")),
    # JSON body "session" (default "default")
    ("POST", "/api/sendText", {"session": "s5", "chatId": "1@c.us", "text": "hi"}, S("s5")),
    ("POST", "/api/sendText", {"chatId": "1@c.us", "text": "hi"}, S("default")),
    ("POST", "/api/sendText", None, S("default")),
    ("POST", "/api/sendText?session=q", {"chatId": "1@c.us"}, S("default")),
    ("POST", "/api/sendImage", {"session": "s5", "file": {"url": "http://x/y.jpg"}}, S("s5")),
    ("POST", "/api/sendFile", {"session": "s5"}, S("s5")),
    ("POST", "/api/sendVoice", {"session": "s5"}, S("s5")),
    ("POST", "/api/sendVideo", {"session": "s5"}, S("s5")),
    ("POST", "/api/sendSeen", {"session": "s5", "chatId": "1@c.us"}, S("s5")),
    ("POST", "/api/startTyping", {"session": "s5"}, S("s5")),
    ("POST", "/api/stopTyping", {"session": "s5"}, S("s5")),
    ("POST", "/api/reply", {"session": "s5", "reply_to": "x"}, S("s5")),
    ("POST", "/api/sendPoll", {"session": "s5", "poll": {}}, S("s5")),
    ("POST", "/api/sendLocation", {"session": "s5"}, S("s5")),
    ("POST", "/api/sendContactVcard", {"session": "s5"}, S("s5")),
    ("POST", "/api/sendButtons", {"session": "s5"}, S("s5")),
    ("POST", "/api/forwardMessage", {"session": "s5", "messageId": "m"}, S("s5")),
    ("PUT", "/api/reaction", {"session": "s5", "messageId": "m", "reaction": "+"}, S("s5")),
    ("PUT", "/api/star", {"session": "s5", "messageId": "m", "star": True}, S("s5")),
    ("POST", "/api/send/link-custom-preview", {"session": "s5"}, S("s5")),
    ("POST", "/api/contacts/block", {"session": "s5", "contactId": "1@c.us"}, S("s5")),
    ("POST", "/api/contacts/unblock", {"contactId": "1@c.us"}, S("default")),
    # the same roots on GET read the query
    ("GET", "/api/sendText?phone=123&text=hi&session=s5", None, S("s5")),
    ("GET", "/api/sendText?phone=123&text=hi", None, S("default")),
    ("GET", "/api/messages?chatId=1@c.us&limit=5&session=s6", None, S("s6")),
    ("GET", "/api/messages?chatId=1@c.us", None, S("default")),
    ("GET", "/api/contacts?contactId=1@c.us&session=s6", None, S("s6")),
    ("GET", "/api/contacts/all?session=s6", None, S("s6")),
    ("GET", "/api/contacts/check-exists?phone=123&session=s6", None, S("s6")),
    ("GET", "/api/contacts/about?contactId=1@c.us", None, S("default")),
    ("GET", "/api/contacts/profile-picture?contactId=1&session=s6", None, S("s6")),
    ("GET", "/api/checkNumberStatus?phone=123&session=s6", None, S("s6")),
    ("GET", "/api/checkNumberStatus?phone=123", None, S("default")),
    ("GET", "/api/screenshot?session=s6", None, S("s6")),
    # Express routes ignore case: so does the reserved-root lookup
    ("GET", "/api/CheckNumberStatus?phone=1&session=s6", None, S("s6")),
    ("POST", "/api/SENDTEXT", {"session": "s5"}, S("s5")),
    ("GET", "/api/Sessions", None, NONE),
    # media
    ("GET", "/api/files/s7/true_123@c.us_3EB0ABC.jpeg", None, S("s7")),
    ("GET", "/api/files/s7/sub/dir/file.ogg", None, S("s7")),
    ("GET", "/api/files/true_123@c.us_3EB0ABC.jpeg", None, S("default")),
    ("GET", "/api/files/", None, NONE),
    # websocket
    ("GET", "/ws?session=s8&events=message&events=session.status", None, S("s8")),
    ("GET", "/ws?session=*&events=message", None, FANOUT),
    ("GET", "/ws?events=message&x-api-key=k", None, FANOUT),
    ("GET", "/ws?session=", None, FANOUT),
    # about no session
    ("GET", "/api/server/status", None, NONE),
    ("GET", "/api/server/version", None, NONE),
    ("POST", "/api/server/stop", {}, NONE),
    ("GET", "/api/version", None, NONE),
    ("GET", "/api/keys", None, NONE),
    ("POST", "/api/keys", {"isAdmin": True}, NONE),
    ("GET", "/health", None, NONE),
    ("GET", "/ping", None, NONE),
    ("GET", "/", None, NONE),
    ("GET", "/dashboard/", None, NONE),
    ("GET", "/api/", None, NONE),
    ("GET", "/api/unknownRoot", None, NONE),
]


@pytest.mark.parametrize(("method", "url", "body", "expected"), WAHA_CASES)
def test_waha_extract(
    method: str, url: str, body: dict[str, Any] | None, expected: Extraction
) -> None:
    assert extract(waha, method, url, body) == expected


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/api/sendText", True),
        ("PUT", "/api/reaction", True),
        ("POST", "/api/contacts/block", True),
        ("POST", "/api/sessions", True),
        ("POST", "/api/sessions/", True),
        ("POST", "/api/sessions/start", True),
        ("POST", "/api/sessions/stop/", True),
        ("POST", "/api/sessions/logout", True),
        ("GET", "/api/sendText", False),
        ("GET", "/api/sessions", False),
        ("POST", "/api/sessions/s1/start", False),
        ("PUT", "/api/sessions/s1", False),
        ("POST", "/api/s1/chats/x/messages/read", False),
        ("POST", "/api/s1/auth/request-code", False),
        ("GET", "/api/default/auth/qr", False),
        ("POST", "/api/server/stop", False),
        ("POST", "/health", False),
        ("GET", "/ws", False),
    ],
)
def test_waha_needs_body(method: str, path: str, expected: bool) -> None:
    assert waha.needs_body(method, path) is expected


@pytest.mark.parametrize("value", [None, 7, ["a", "b"], {"x": 1}, True])
def test_waha_a_session_field_that_is_no_string_is_refused(value: object) -> None:
    # Only a missing field means "default": null (or an array from a repeated
    # form field) is not what WAHA reads as "default".
    with pytest.raises(BadSessionId):
        waha.extract(make(waha, "POST", "/api/sendText", {"session": value}))
    assert waha.extract(make(waha, "POST", "/api/sendText", {"chatId": "x"})) == S("default")


def test_waha_and_evolution_read_form_bodies_as_their_upstreams_do() -> None:
    # NestJS (WAHA) and Evolution's Express both install urlencoded parsers.
    assert waha.reads_forms and evolution.reads_forms


@pytest.mark.parametrize("bad", BAD_IDS)
def test_waha_bad_ids_in_body_and_query(bad: str) -> None:
    with pytest.raises(BadSessionId):
        waha.extract(make(waha, "POST", "/api/sendText", {"session": bad}))
    with pytest.raises(BadSessionId):
        waha.extract(UpstreamRequest("GET", "/api/messages", MultiDict(session=bad), CIMultiDict()))
    with pytest.raises(BadSessionId):
        waha.extract(make(waha, "POST", "/api/sessions/start", {"name": bad}))
    if bad:
        # an empty create name makes WAHA invent one; "/ws?session=" means every session
        with pytest.raises(BadSessionId):
            waha.extract(make(waha, "POST", "/api/sessions", {"name": bad}))
        with pytest.raises(BadSessionId):
            waha.extract(UpstreamRequest("GET", "/ws", MultiDict(session=bad), CIMultiDict()))


@pytest.mark.parametrize("bad", [b for b in BAD_IDS if "/" not in b])
def test_waha_bad_ids_in_path(bad: str) -> None:
    for path in (
        f"/api/{bad}/chats",
        f"/api/sessions/{bad}" if bad else "/api/sessions//",
        f"/api/sessions/{bad}/start",
        f"/api/files/{bad}/file.jpg",
    ):
        req = UpstreamRequest("GET", path, MultiDict(), CIMultiDict())
        with pytest.raises(BadSessionId):
            waha.extract(req)


@pytest.mark.parametrize("value", [5, 1.5, True, ["s"], {"a": 1}])
def test_waha_non_string_session_is_bad(value: object) -> None:
    with pytest.raises(BadSessionId):
        waha.extract(make(waha, "POST", "/api/sendText", {"session": value}))


def test_waha_percent_encoded_dots_are_bad_raw_or_decoded() -> None:
    for path in ("/api/%2e%2e/chats", "/api/%2E%2E/chats", "/api/../chats"):
        with pytest.raises(BadSessionId):
            waha.extract(UpstreamRequest("GET", path, MultiDict(), CIMultiDict()))


def test_waha_max_length_id_is_fine() -> None:
    name = "a" * 128
    assert extract(waha, "GET", f"/api/{name}/chats") == S(name)


def test_waha_options_override_reserved_roots() -> None:
    a = WahaAdapter({"extra_body_roots": ["events2"], "extra_global_roots": ["metrics2"]})
    assert extract(a, "POST", "/api/events2", {"session": "x"}) == S("x")
    assert extract(a, "GET", "/api/metrics2/foo") == NONE
    # a deployment with a session literally named "contacts"
    b = WahaAdapter({"body_roots": ["sendText"]})
    assert extract(b, "GET", "/api/contacts/chats") == S("contacts")
    assert extract(b, "POST", "/api/sendText", {"session": "x"}) == S("x")
    # structural roots cannot be configured away
    c = WahaAdapter({"body_roots": [], "global_roots": []})
    assert extract(c, "GET", "/api/sessions") == NONE
    assert extract(c, "GET", "/api/files/s/x.jpg") == S("s")
    d = WahaAdapter({"default_session": "main"})
    assert extract(d, "POST", "/api/sendText", {"chatId": "x"}) == S("main")


@pytest.mark.parametrize(
    "options",
    [
        {"reserved": ["x"]},
        {"body_roots": [1, 2]},
        {"global_roots": [""]},
        {"extra_body_roots": ["a/b"]},
        {"default_session": "../etc"},
        {"default_session": 7},
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": "fast"},
        {"timeout": True},
    ],
)
def test_waha_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"adapter\.options"):
        WahaAdapter(options)


def test_waha_credentials_header() -> None:
    req = make(waha, "GET", "/api/s1/chats", headers={"X-Api-Key": "client-key"})
    assert waha.client_key(req) == "client-key"
    waha.apply_credential(req, INST)
    assert req.headers.getall("X-Api-Key") == ["instance-key"]
    assert "x-api-key" not in req.query


def test_waha_credentials_query_and_header_both_removed() -> None:
    req = make(
        waha,
        "GET",
        "/ws?session=*&x-api-key=client-q&events=message",
        headers={"x-api-key": "client-h"},
    )
    assert waha.client_key(req) == "client-h"
    waha.apply_credential(req, INST)
    assert req.headers.getall("X-Api-Key") == ["instance-key"]
    assert "x-api-key" not in req.query
    assert req.query.getall("events") == ["message"]


def test_waha_credentials_query_only() -> None:
    req = make(waha, "GET", "/api/messages?session=s&x-api-key=client-q&x-api-key=dup")
    assert waha.client_key(req) == "client-q"
    waha.apply_credential(req, INST_NOKEY)
    assert "x-api-key" not in req.query
    assert "X-Api-Key" not in req.headers
    assert req.query["session"] == "s"
    assert not req.json_dirty


def test_waha_credentials_absent() -> None:
    req = make(waha, "GET", "/api/s1/chats")
    assert waha.client_key(req) is None
    waha.apply_credential(req, INST)
    assert req.headers["X-Api-Key"] == "instance-key"
    assert waha.auth_headers(INST) == {"X-Api-Key": "instance-key"}
    assert waha.auth_headers(INST_NOKEY) == {}


def _b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, _b({"statusCode": 404, "message": "Session not found", "error": "Not Found"}), True),
        (
            404,
            _b(
                {
                    "statusCode": 404,
                    "message": "We didn't find a session with name 'default'.\n"
                    "Please start it first by using POST /api/sessions/default/start request",
                    "error": "Not Found",
                }
            ),
            True,
        ),
        (404, b"We didn't find a running session with name 'x'.", True),
        (404, _b({"statusCode": 404, "message": "Message not found"}), False),
        (404, _b({"message": "Cannot GET /api/nothing", "statusCode": 404}), False),
        (404, b"", False),
        (
            422,
            _b(
                {
                    "error": "Session status is not as expected. Try again later or restart the "
                    "session",
                    "session": "default",
                    "status": "STOPPED",
                    "expected": ["WORKING"],
                }
            ),
            True,
        ),
        (422, _b({"error": "Session status is not as expected", "status": "FAILED"}), True),
        (422, _b({"error": "Session status is not as expected"}), True),
        (422, _b({"error": "Session status is not as expected", "status": "STARTING"}), False),
        (
            422,
            _b({"error": "Session status is not as expected", "status": "SCAN_QR_CODE"}),
            False,
        ),
        (422, _b({"message": "Session 'x' already exists. Use PUT to update it."}), False),
        (200, _b({"message": "Session not found"}), False),
        (500, b"Session not found", False),
        (401, _b({"message": "Unauthorized"}), False),
    ],
)
def test_waha_session_missing(status: int, body: bytes, expected: bool) -> None:
    assert waha.session_missing(status, body) is expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (201, _b({"name": "session_7f3a", "status": "STARTING", "config": {}}), "session_7f3a"),
        (200, _b({"name": "abc", "status": "STOPPED"}), "abc"),
        (422, _b({"name": "abc"}), None),
        (201, _b({"name": "../x"}), None),
        (201, _b(["abc"]), None),
        (201, b"not json", None),
        (201, b"", None),
    ],
)
def test_waha_created_session(status: int, body: bytes, expected: str | None) -> None:
    assert waha.created_session(status, body) == expected


# =============================================================================
# Blazz
# =============================================================================

blazz = BlazzAdapter()

BLAZZ_CASES: list[tuple[str, str, dict[str, Any] | None, Extraction]] = [
    (
        "POST",
        "/api/messages/send",
        {
            "session_id": BLAZZ_ID,
            "workspace_id": 12,
            "recipient_phone": "6281234567890",
            "message": "hi",
            "type": "text",
            "api_key": "k",
        },
        S(BLAZZ_ID),
    ),
    ("POST", "/api/messages/send-media", {"session_id": BLAZZ_ID, "media_url": "x"}, S(BLAZZ_ID)),
    ("POST", "/api/messages/bulk-send", {"session_id": BLAZZ_ID, "messages": []}, S(BLAZZ_ID)),
    ("POST", "/api/messages/send", {"recipient_phone": "1"}, NONE),
    ("POST", "/api/messages/send", None, NONE),
    (
        "POST",
        "/api/sessions",
        {"workspace_id": 12, "account_id": 3, "session_id": BLAZZ_ID, "priority": "high"},
        created(BLAZZ_ID),
    ),
    ("POST", "/api/sessions/", {"session_id": BLAZZ_ID, "workspace_id": 12}, created(BLAZZ_ID)),
    ("GET", "/api/sessions?api_key=k", None, NONE),
    ("GET", f"/api/sessions/{BLAZZ_ID}/status?api_key=k", None, S(BLAZZ_ID)),
    ("GET", f"/api/sessions/{BLAZZ_ID}/metadata?api_key=k", None, S(BLAZZ_ID)),
    ("PUT", f"/api/sessions/{BLAZZ_ID}/metadata", {"metadata": {}, "api_key": "k"}, S(BLAZZ_ID)),
    ("POST", f"/api/sessions/{BLAZZ_ID}/restore", {"api_key": "k"}, S(BLAZZ_ID)),
    ("POST", f"/api/sessions/{BLAZZ_ID}/reconnect", {"api_key": "k"}, S(BLAZZ_ID)),
    ("POST", f"/api/sessions/{BLAZZ_ID}/regenerate-qr", {"api_key": "k"}, S(BLAZZ_ID)),
    ("DELETE", f"/api/sessions/{BLAZZ_ID}", {"api_key": "k"}, S(BLAZZ_ID)),
    ("DELETE", f"/api/sessions/{BLAZZ_ID}?api_key=k", None, S(BLAZZ_ID)),
    ("GET", f"/api/messages/{BLAZZ_ID}/status?message_id=true_1@c.us_X", None, S(BLAZZ_ID)),
    ("GET", f"/api/messages/{BLAZZ_ID}/validate?api_key=k", None, S(BLAZZ_ID)),
    # other /api routes: body or query session_id
    ("POST", "/api/contacts/sync", {"session_id": BLAZZ_ID}, S(BLAZZ_ID)),
    ("GET", f"/api/chats?session_id={BLAZZ_ID}", None, S(BLAZZ_ID)),
    ("GET", "/api/chats", None, NONE),
    ("GET", "/health", None, NONE),
    ("GET", "/health/ready", None, NONE),
    ("GET", "/health/live", None, NONE),
    ("GET", "/", None, NONE),
]


@pytest.mark.parametrize(("method", "url", "body", "expected"), BLAZZ_CASES)
def test_blazz_extract(
    method: str, url: str, body: dict[str, Any] | None, expected: Extraction
) -> None:
    assert extract(blazz, method, url, body) == expected


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/api/messages/send", True),
        ("POST", "/api/sessions", True),
        ("PUT", f"/api/sessions/{BLAZZ_ID}/metadata", True),
        ("DELETE", f"/api/sessions/{BLAZZ_ID}", True),
        ("GET", "/api/sessions", False),
        ("GET", f"/api/messages/{BLAZZ_ID}/validate", False),
        ("POST", "/health", False),
        ("GET", "/health", False),
    ],
)
def test_blazz_needs_body(method: str, path: str, expected: bool) -> None:
    assert blazz.needs_body(method, path) is expected


def test_blazz_refuses_a_create_it_could_not_name() -> None:
    # Blazz would start a session called "undefined" (a second one elsewhere
    # fights over its browser profile): the router cannot route it, so 400.
    with pytest.raises(BadSessionId, match="session_id"):
        blazz.extract(make(blazz, "POST", "/api/sessions", {"workspace_id": 12}))


@pytest.mark.parametrize("bad", BAD_IDS)
def test_blazz_bad_ids(bad: str) -> None:
    with pytest.raises(BadSessionId):
        blazz.extract(make(blazz, "POST", "/api/messages/send", {"session_id": bad}))
    with pytest.raises(BadSessionId):
        blazz.extract(make(blazz, "POST", "/api/sessions", {"session_id": bad}))
    if "/" not in bad:
        for path in (f"/api/sessions/{bad}/status", f"/api/messages/{bad}/validate"):
            with pytest.raises(BadSessionId):
                blazz.extract(UpstreamRequest("GET", path, MultiDict(), CIMultiDict()))


def test_blazz_numeric_session_id_is_bad() -> None:
    with pytest.raises(BadSessionId):
        blazz.extract(make(blazz, "POST", "/api/messages/send", {"session_id": 42}))


def test_blazz_credential_in_json_body() -> None:
    body = {"session_id": BLAZZ_ID, "message": "hi", "api_key": "client-key"}
    req = make(blazz, "POST", "/api/messages/send?api_key=also-client", body)
    assert blazz.client_key(req) == "client-key"
    blazz.apply_credential(req, INST)
    assert req.json is not None
    assert req.json["api_key"] == "instance-key"
    assert req.json["session_id"] == BLAZZ_ID
    assert req.json_dirty
    assert "api_key" not in req.query
    assert "X-Api-Key" not in req.headers


def test_blazz_credential_in_query_for_get() -> None:
    req = make(blazz, "GET", f"/api/sessions/{BLAZZ_ID}/status?api_key=client-key")
    assert blazz.client_key(req) == "client-key"
    blazz.apply_credential(req, INST)
    assert req.query.getall("api_key") == ["instance-key"]
    assert req.json is None and not req.json_dirty


def test_blazz_credential_from_header_convenience() -> None:
    req = make(blazz, "GET", "/api/sessions", headers={"X-Api-Key": "client-key"})
    assert blazz.client_key(req) == "client-key"
    blazz.apply_credential(req, INST)
    assert "X-Api-Key" not in req.headers  # Blazz ignores it; the router key must not leak
    assert req.query["api_key"] == "instance-key"


def test_blazz_credential_header_with_json_body() -> None:
    req = make(
        blazz,
        "POST",
        "/api/messages/send",
        {"session_id": BLAZZ_ID},
        headers={"x-api-key": "client-key"},
    )
    assert blazz.client_key(req) == "client-key"
    blazz.apply_credential(req, INST)
    assert req.json == {"session_id": BLAZZ_ID, "api_key": "instance-key"}
    assert req.json_dirty
    assert "api_key" not in req.query and "X-Api-Key" not in req.headers


def test_blazz_credential_delete_without_body_gets_a_json_body() -> None:
    # Blazz's DELETE handler reads api_key from the JSON body only (a query
    # key is a 401), so a bodiless DELETE gets a body made for it.
    req = make(blazz, "DELETE", f"/api/sessions/{BLAZZ_ID}?api_key=client-key", None)
    assert blazz.client_key(req) == "client-key"
    blazz.apply_credential(req, INST)
    assert req.json == {"api_key": "instance-key"} and req.json_dirty
    assert "api_key" not in req.query


def test_blazz_credential_get_goes_to_the_query() -> None:
    req = make(blazz, "GET", f"/api/sessions/{BLAZZ_ID}/status?api_key=client-key")
    blazz.apply_credential(req, INST)
    assert req.query.getall("api_key") == ["instance-key"] and req.json is None


def test_blazz_credential_keeps_a_body_that_is_not_json() -> None:
    # A body the router could not read as JSON goes as sent, never replaced.
    req = make(blazz, "DELETE", f"/api/sessions/{BLAZZ_ID}?api_key=c", None)
    req.has_body = True
    blazz.apply_credential(req, INST)
    assert req.json is None and req.query.getall("api_key") == ["instance-key"]


def test_blazz_credential_instance_without_key_strips_client_key() -> None:
    req = make(blazz, "POST", "/api/messages/send", {"session_id": BLAZZ_ID, "api_key": "c"})
    blazz.apply_credential(req, INST_NOKEY)
    assert req.json == {"session_id": BLAZZ_ID}
    assert req.json_dirty
    get = make(blazz, "GET", "/api/sessions?api_key=c")
    blazz.apply_credential(get, INST_NOKEY)
    assert "api_key" not in get.query
    assert blazz.auth_headers(INST) == {}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, _b({"error": "Session not found"}), True),
        (404, _b({"success": False, "error": "Session not found"}), True),
        (404, _b({"error": "Not found"}), False),
        (400, _b({"success": False, "error": "Session not ready"}), False),
        (400, _b({"error": "Missing required fields"}), False),
        (401, _b({"error": "Invalid API key"}), False),
        (200, _b({"success": True, "alreadyDisconnected": True}), False),
        (500, _b({"error": "workspaceId is not defined"}), False),
    ],
)
def test_blazz_session_missing(status: int, body: bytes, expected: bool) -> None:
    assert blazz.session_missing(status, body) is expected


def test_blazz_created_session() -> None:
    body = _b({"success": True, "message": "Session created", "session_id": BLAZZ_ID})
    assert blazz.created_session(200, body) == BLAZZ_ID
    assert blazz.created_session(201, _b({"session": {"session_id": "abc"}})) == "abc"
    assert blazz.created_session(400, body) is None
    assert blazz.created_session(200, b"oops") is None


@pytest.mark.parametrize(
    ("session", "workspace"),
    [
        (BLAZZ_ID, 12),
        ("webjs_acme_1700000000_zzzzzzzz", "acme"),
        ("webjs_7_1_x", 7),
        ("webjs__1700000000_ab12cd34", None),
        ("webjs_12", None),
        ("other_12_1700000000_ab12cd34", None),
        ("default", None),
    ],
)
def test_blazz_workspace_from_id(session: str, workspace: int | str | None) -> None:
    assert workspace_from_id(session) == workspace


def test_blazz_rejects_options() -> None:
    with pytest.raises(ValueError, match=r"adapter\.options\.workspace"):
        BlazzAdapter({"workspace": 1})
    assert BlazzAdapter({"timeout": 2.5}).timeout == 2.5


# =============================================================================
# wwebjs-api
# =============================================================================

wwebjs = WwebjsAdapter()

WWEBJS_CASES: list[tuple[str, str, dict[str, Any] | None, Extraction]] = [
    ("GET", "/session/start/abc", None, created("abc")),
    ("POST", "/session/start/abc", {"webhookUrl": "http://x/y"}, created("abc")),
    ("GET", "/session/status/abc", None, S("abc")),
    ("GET", "/session/qr/abc", None, S("abc")),
    ("GET", "/session/qr/abc/image", None, S("abc")),
    ("GET", "/session/restart/abc", None, S("abc")),
    ("GET", "/session/terminate/abc", None, S("abc")),
    ("GET", "/session/stop/abc", None, S("abc")),
    ("POST", "/session/requestPairingCode/abc", {"phoneNumber": "1"}, S("abc")),
    ("PUT", "/session/setWebhook/abc", {"webhookUrl": None}, S("abc")),
    ("GET", "/session/getSessions", None, NONE),
    ("GET", "/session/getSessions/", None, NONE),
    ("GET", "/session/terminateAll", None, NONE),
    ("GET", "/session/terminateInactive", None, NONE),
    ("POST", "/client/sendMessage/abc", {"chatId": "1@c.us", "content": "hi"}, S("abc")),
    ("GET", "/client/getChats/abc", None, S("abc")),
    ("GET", "/client/getState/my_session-2", None, S("my_session-2")),
    ("POST", "/chat/fetchMessages/abc", {"chatId": "1@c.us"}, S("abc")),
    ("POST", "/groupChat/getClassInfo/abc", {"chatId": "g@g.us"}, S("abc")),
    ("POST", "/message/react/abc", {}, S("abc")),
    ("POST", "/contact/getAbout/abc", {}, S("abc")),
    ("POST", "/Client/sendMessage/abc", {}, S("abc")),  # Express ignores case
    ("GET", "/ping", None, NONE),
    ("POST", "/localCallbackExample", {}, NONE),
    ("GET", "/api-docs/swagger.json", None, NONE),
    ("GET", "/", None, NONE),
]


@pytest.mark.parametrize(("method", "url", "body", "expected"), WWEBJS_CASES)
def test_wwebjs_extract(
    method: str, url: str, body: dict[str, Any] | None, expected: Extraction
) -> None:
    assert extract(wwebjs, method, url, body) == expected
    assert not wwebjs.needs_body(method, URL(url).path)


@pytest.mark.parametrize("bad", [b for b in BAD_IDS if "/" not in b and b])
def test_wwebjs_bad_ids(bad: str) -> None:
    for path in (f"/client/sendMessage/{bad}", f"/session/start/{bad}", f"/session/qr/{bad}/x"):
        with pytest.raises(BadSessionId):
            wwebjs.extract(UpstreamRequest("GET", path, MultiDict(), CIMultiDict()))


def test_wwebjs_credentials() -> None:
    req = make(wwebjs, "GET", "/session/status/abc", headers={"X-API-KEY": "client"})
    assert wwebjs.client_key(req) == "client"
    wwebjs.apply_credential(req, INST)
    assert req.headers.getall("x-api-key") == ["instance-key"]
    wwebjs.apply_credential(req, INST_NOKEY)
    assert "x-api-key" not in req.headers
    assert wwebjs.auth_headers(INST) == {"x-api-key": "instance-key"}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, _b({"success": False, "message": "session_not_found"}), True),
        (404, _b({"success": False, "message": "chat_not_found"}), False),
        (200, _b({"success": False, "message": "session_not_found"}), False),
        (403, _b({"success": False, "message": "Invalid API key"}), False),
    ],
)
def test_wwebjs_session_missing(status: int, body: bytes, expected: bool) -> None:
    assert wwebjs.session_missing(status, body) is expected


def test_wwebjs_options() -> None:
    a = WwebjsAdapter({"extra_roots": ["channel"]})
    assert extract(a, "POST", "/channel/sendMessage/abc") == S("abc")
    with pytest.raises(ValueError, match=r"adapter\.options\.root"):
        WwebjsAdapter({"root": ["x"]})


# =============================================================================
# Evolution
# =============================================================================

evolution = EvolutionAdapter()

EVOLUTION_CASES: list[tuple[str, str, dict[str, Any] | None, Extraction]] = [
    ("POST", "/message/sendText/inst1", {"number": "5511999999999", "text": "hi"}, S("inst1")),
    ("POST", "/message/sendMedia/inst1", {"mediatype": "image"}, S("inst1")),
    ("POST", "/message/sendWhatsAppAudio/inst1", {}, S("inst1")),
    ("POST", "/chat/whatsappNumbers/inst1", {"numbers": ["1"]}, S("inst1")),
    ("POST", "/chat/findMessages/inst1", {}, S("inst1")),
    ("GET", "/group/fetchAllGroups/inst1?getParticipants=false", None, S("inst1")),
    ("POST", "/group/create/inst1", {"subject": "g"}, S("inst1")),
    ("GET", "/instance/connect/inst1", None, S("inst1")),
    ("GET", "/instance/connect/inst1?number=5511", None, S("inst1")),
    ("GET", "/instance/connectionState/inst1", None, S("inst1")),
    ("POST", "/instance/restart/inst1", None, S("inst1")),
    ("PUT", "/instance/restart/inst1", None, S("inst1")),
    ("DELETE", "/instance/logout/inst1", None, S("inst1")),
    ("DELETE", "/instance/delete/inst1", None, S("inst1")),
    ("POST", "/instance/setPresence/inst1", {"presence": "available"}, S("inst1")),
    ("POST", "/webhook/set/inst1", {"webhook": {}}, S("inst1")),
    ("GET", "/webhook/find/inst1/", None, S("inst1")),
    ("GET", "/settings/find/My-Instance_2", None, S("My-Instance_2")),
    ("GET", "/typebot/fetch/bot123/inst1", None, S("inst1")),
    ("POST", "/chatwoot/set/inst1", {}, S("inst1")),
    (
        "POST",
        "/instance/create",
        {"instanceName": "inst2", "qrcode": True, "integration": "WHATSAPP-BAILEYS"},
        created("inst2"),
    ),
    ("POST", "/instance/create/", {"instanceName": "inst2"}, created("inst2")),
    ("POST", "/instance/create", {"qrcode": True}, CREATE),
    ("GET", "/instance/fetchInstances", None, NONE),
    ("GET", "/instance/fetchInstances?instanceName=inst1", None, NONE),
    ("GET", "/", None, NONE),
    ("GET", "/manager/assets/index-abc.js", None, NONE),
    ("GET", "/manager", None, NONE),
    ("GET", "/docs/swagger/index.html", None, NONE),
]


@pytest.mark.parametrize(("method", "url", "body", "expected"), EVOLUTION_CASES)
def test_evolution_extract(
    method: str, url: str, body: dict[str, Any] | None, expected: Extraction
) -> None:
    assert extract(evolution, method, url, body) == expected


def test_evolution_needs_body() -> None:
    assert evolution.needs_body("POST", "/instance/create")
    assert not evolution.needs_body("POST", "/message/sendText/inst1")
    assert not evolution.needs_body("GET", "/instance/create")


@pytest.mark.parametrize("bad", [b for b in BAD_IDS if "/" not in b and b])
def test_evolution_bad_ids(bad: str) -> None:
    req = UpstreamRequest("POST", f"/message/sendText/{bad}", MultiDict(), CIMultiDict())
    with pytest.raises(BadSessionId):
        evolution.extract(req)
    with pytest.raises(BadSessionId):
        evolution.extract(make(evolution, "POST", "/instance/create", {"instanceName": bad}))


def test_evolution_credentials_and_answers() -> None:
    req = make(evolution, "POST", "/message/sendText/inst1", headers={"apikey": "client"})
    assert evolution.client_key(req) == "client"
    evolution.apply_credential(req, INST)
    assert req.headers.getall("apikey") == ["instance-key"]
    assert evolution.auth_headers(INST) == {"apikey": "instance-key"}
    missing = _b(
        {
            "status": 404,
            "error": "Not Found",
            "response": {"message": ['The "inst9" instance does not exist']},
        }
    )
    assert evolution.session_missing(404, missing)
    assert not evolution.session_missing(400, b"{}")
    assert not evolution.session_missing(200, missing)
    assert not evolution.session_missing(404, b'{"message":"Cannot GET /message/x/y"}')
    created_body = _b({"instance": {"instanceName": "inst2", "status": "created"}, "hash": "h"})
    assert evolution.created_session(201, created_body) == "inst2"
    assert evolution.created_session(403, created_body) is None


# =============================================================================
# Generic
# =============================================================================

GENERIC_BASE: dict[str, Any] = {
    "probe": {"method": "GET", "path": "/api/sessions/{session}"},
    "health": {"method": "GET", "path": "/health"},
}


def generic(**options: Any) -> GenericAdapter:
    return GenericAdapter({**GENERIC_BASE, **options})


BRIEF_EXAMPLE: dict[str, Any] = {
    "session_rules": [
        {"path": "^/api/(?P<session>[^/]+)/"},
        {"query": "session"},
        {"header": "X-Session-Id"},
        {"json": "session", "default": "default", "methods": ["POST", "PUT"]},
    ],
    "create": {"method": "POST", "path": "^/api/sessions$", "json": "name"},
    "credential": {"header": "X-Api-Key"},
    "list": {
        "method": "GET",
        "path": "/api/sessions",
        "sessions_field": "",
        "id_field": "name",
        "status_field": "status",
    },
    "probe": {"method": "GET", "path": "/api/sessions/{session}"},
    "start": {"method": "POST", "path": "/api/sessions/{session}/start", "json": {}},
    "health": {"method": "GET", "path": "/health"},
    "missing": {"status": [404], "body_contains": "not found"},
    "ready_statuses": ["WORKING", "connected", "open"],
}


def test_generic_brief_example() -> None:
    a = build_adapter(AdapterConfig("generic", BRIEF_EXAMPLE))
    assert extract(a, "GET", "/api/s1/chats") == S("s1")
    assert extract(a, "GET", "/api/sendText?session=s2") == S("s2")
    req = make(a, "GET", "/other", headers={"X-Session-Id": "s3"})
    assert a.extract(req) == S("s3")
    assert extract(a, "POST", "/other", {"session": "s4"}) == S("s4")
    assert extract(a, "POST", "/other", {"chatId": "x"}) == S("default")
    assert extract(a, "GET", "/other") == NONE  # json rule limited to POST / PUT
    assert extract(a, "POST", "/api/sessions", {"name": "n1"}) == created("n1")
    assert extract(a, "POST", "/api/sessions", {}) == CREATE
    assert a.needs_body("POST", "/other")
    assert a.needs_body("POST", "/api/sessions")
    assert not a.needs_body("GET", "/other")
    assert not a.needs_body("DELETE", "/other")
    assert a.session_missing(404, b'{"message": "Session Not Found"}')
    assert not a.session_missing(404, b'{"message": "gone"}')
    assert not a.session_missing(500, b"not found")
    assert a.created_session(201, b'{"name": "n9"}') == "n9"
    assert a.created_session(201, b'{"other": 1}') is None


def test_generic_rule_details() -> None:
    a = generic(
        session_rules=[
            {"path": "^/api/sessions/?$", "none": True},
            {"path": r"^/api/(?P<session>[^/]+)/"},
            {"query": "session", "fanout": "*"},
            {"json": "data.session_id", "when": "^/send"},
            {"header": "X-Session", "methods": ["get"], "default": "fallback"},
        ]
    )
    assert extract(a, "GET", "/api/sessions") == NONE
    assert extract(a, "GET", "/api/sessions/") == NONE
    assert extract(a, "GET", "/api/sessions/x") == S("sessions")  # rule 2 on the segment
    assert extract(a, "GET", "/ws?session=*") == FANOUT
    assert extract(a, "GET", "/ws?session=q") == S("q")
    assert extract(a, "POST", "/send/text", {"data": {"session_id": "deep"}}) == S("deep")
    assert extract(a, "POST", "/send/text", {"data": {"session_id": 42}}) == S("42")
    assert extract(a, "POST", "/other", {"data": {"session_id": "deep"}}) == NONE
    assert a.needs_body("POST", "/send/text")
    assert not a.needs_body("POST", "/other")
    assert extract(a, "GET", "/plain") == S("fallback")
    assert extract(a, "DELETE", "/plain") == NONE
    with pytest.raises(BadSessionId):
        extract(a, "POST", "/send/text", {"data": {"session_id": True}})


def test_generic_credentials_header() -> None:
    a = generic(session_rules=[], credential={"header": "Authorization"})
    req = make(a, "GET", "/x", headers={"Authorization": "client"})
    assert a.client_key(req) == "client"
    a.apply_credential(req, INST)
    assert req.headers.getall("Authorization") == ["instance-key"]
    assert a.auth_headers(INST) == {"Authorization": "instance-key"}


def test_generic_credentials_json_falls_back_to_query() -> None:
    a = generic(session_rules=[], credential={"json": "api_key"})
    post = make(a, "POST", "/x?api_key=q", {"api_key": "client", "a": 1})
    assert post.json is not None
    assert a.client_key(post) == "client"
    a.apply_credential(post, INST)
    assert post.json == {"a": 1, "api_key": "instance-key"}
    assert post.json_dirty and "api_key" not in post.query
    get = make(a, "GET", "/x?api_key=client")
    assert a.client_key(get) == "client"
    a.apply_credential(get, INST)
    assert get.query.getall("api_key") == ["instance-key"]
    assert a.auth_headers(INST) == {}


def test_generic_credentials_query_and_header() -> None:
    a = generic(session_rules=[], credential={"query": "key", "header": "X-Key"})
    req = make(a, "GET", "/x?key=c1", headers={"X-Key": "c2"})
    assert a.client_key(req) == "c1"
    a.apply_credential(req, INST)
    assert req.query.getall("key") == ["instance-key"]
    assert "X-Key" not in req.headers
    b = generic(session_rules=[], credential={"json": "k", "header": "X-Key"})
    req = make(b, "GET", "/x?k=c1", headers={"X-Key": "c2"})
    b.apply_credential(req, INST)
    assert req.headers["X-Key"] == "instance-key" and "k" not in req.query


def test_generic_no_credential_config() -> None:
    a = generic(session_rules=[])
    req = make(a, "GET", "/x", headers={"X-Api-Key": "c"})
    assert a.client_key(req) is None
    a.apply_credential(req, INST)
    assert req.headers["X-Api-Key"] == "c"  # nothing configured, nothing touched


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"session_rules": [{"path": "^/api/("}]}, r"session_rules\[0\]\.path: invalid regex"),
        (
            {"session_rules": [{"query": "s"}, {"path": "^/api/([^/]+)"}]},
            r"session_rules\[1\]\.path: regex needs a named group",
        ),
        ({"session_rules": [{"query": "s", "pth": 1}]}, r"session_rules\[0\]\.pth: unknown"),
        ({"session_rules": [{"query": "s", "header": "h"}]}, r"session_rules\[0\]: needs exactly"),
        ({"session_rules": [{"methods": ["GET"]}]}, r"session_rules\[0\]: needs exactly"),
        ({"session_rules": [{"query": "s", "methods": ["FETCH"]}]}, r"methods: unknown HTTP"),
        ({"session_rules": [{"query": "s", "default": "../x"}]}, r"\[0\]\.default: invalid"),
        ({"session_rules": [{"query": "s", "when": "("}]}, r"\[0\]\.when: invalid regex"),
        ({"session_rules": [{"query": "s", "none": True}]}, r"\[0\]\.none"),
        ({"session_rules": [{"path": "^/(?P<session>x)", "none": True}]}, r"\[0\]: a 'none'"),
        ({"session_rules": [{"path": "^/(?P<session>x)", "default": "d"}]}, r"\[0\]\.default"),
        ({"session_rules": [{"query": ""}]}, r"\[0\]\.query: must be a non-empty string"),
        ({"session_rules": "path"}, r"session_rules: must be a list"),
        ({"session_rules": ["path"]}, r"session_rules\[0\]: must be a mapping"),
        ({"session_rules": [], "bogus": 1}, r"adapter\.options\.bogus: unknown option"),
        ({"session_rules": [], "create": {"path": "("}}, r"create\.path: invalid regex"),
        ({"session_rules": [], "create": {"json": "name"}}, r"create\.path: required"),
        ({"session_rules": [], "create": {"path": "x", "methd": "POST"}}, r"create\.methd"),
        ({"session_rules": [], "credential": {}}, r"credential: name at least one"),
        ({"session_rules": [], "credential": {"cookie": "x"}}, r"credential\.cookie: unknown"),
        ({"session_rules": [], "credential": {"json": "a.b"}}, r"credential\.json: must be a top"),
        ({"session_rules": [], "probe": {"path": "/api/sessions"}}, r"probe: must mention"),
        ({"session_rules": [], "probe": {"path": "x/{session}"}}, r"probe\.path: must start"),
        ({"session_rules": [], "probe": {"path": "/{session}", "x": 1}}, r"probe\.x: unknown"),
        ({"session_rules": [], "probe": {"path": "/{session}", "method": "YO"}}, r"probe\.method"),
        (
            {"session_rules": [], "probe": {"path": "/{session}", "json": {"a": 1}}},
            r"probe\.json: a GET call carries no body",
        ),
        ({"session_rules": [], "start": {"path": "/start"}}, r"start: must mention"),
        ({"session_rules": [], "list": {"path": "/l", "healthy_values": [1]}}, r"list\.healthy"),
        ({"session_rules": [], "health": {"path": "/h", "healthy_values": []}}, r"health\.healthy"),
        ({"session_rules": [], "missing": {"status": ["404"]}}, r"missing\.status"),
        ({"session_rules": [], "missing": {"status": [404], "body": "x"}}, r"missing\.body"),
        (
            {"session_rules": [], "ready_statuses": ["ok"], "failed_statuses": ["OK"]},
            r"failed_statuses: 'OK' is already a ready status",
        ),
        ({"session_rules": [], "timeout": -3}, r"adapter\.options\.timeout"),
    ],
)
def test_generic_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generic(**options)


@pytest.mark.parametrize("missing", ["session_rules", "probe", "health"])
def test_generic_required_options(missing: str) -> None:
    options = {**GENERIC_BASE, "session_rules": []}
    del options[missing]
    with pytest.raises(ValueError, match=rf"adapter\.options\.{missing}: required"):
        GenericAdapter(options)


# -- hypothesis: any valid id is found wherever a rule looks; invalid ones raise

ID_ALPHABET = string.ascii_letters + string.digits + "_.@-"
valid_ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(ID_ALPHABET, max_size=127),
)


def _invalid(value: str) -> bool:
    try:
        valid_session_id(value)
    except BadSessionId:
        return True
    return False


invalid_ids = st.one_of(
    st.text(max_size=40),
    st.text(ID_ALPHABET, min_size=129, max_size=200),
    st.builds(lambda s: "." + s, st.text(ID_ALPHABET, max_size=10)),
    st.builds(lambda a, b: a + " " + b, valid_ids, st.text(ID_ALPHABET, max_size=5)),
).filter(_invalid)

PROPERTY_ADAPTER = generic(
    session_rules=[
        {"path": "^/p/(?P<session>[^/]+)/"},
        {"query": "sess"},
        {"header": "X-Sess"},
        {"json": "meta.session"},
    ],
)


def _valid(value: str) -> bool:
    try:
        valid_session_id(value)
    except BadSessionId:
        return False
    return True


def _prop_request(where: str, value: str) -> UpstreamRequest:
    a = PROPERTY_ADAPTER
    if where == "path":
        return UpstreamRequest("GET", f"/p/{value}/chats", MultiDict(), CIMultiDict())
    if where == "query":
        return UpstreamRequest("GET", "/q", MultiDict(sess=value), CIMultiDict())
    if where == "header":
        return UpstreamRequest("GET", "/q", MultiDict(), CIMultiDict({"X-Sess": value}))
    assert a.needs_body("POST", "/q")
    return UpstreamRequest("POST", "/q", MultiDict(), CIMultiDict(), {"meta": {"session": value}})


@settings(max_examples=200)
@given(value=valid_ids, where=st.sampled_from(["path", "query", "header", "json"]))
def test_generic_property_valid_ids_are_found(value: str, where: str) -> None:
    assert PROPERTY_ADAPTER.extract(_prop_request(where, value)) == S(value)


@settings(max_examples=200)
@given(value=invalid_ids, where=st.sampled_from(["path", "query", "header", "json"]))
def test_generic_property_invalid_ids_raise(value: str, where: str) -> None:
    if where == "path" and ("/" in value or value == ""):
        # "[^/]+" captures one segment only: the rule does not match (nothing is
        # extracted) or it captures the part before the first "/" -- which must
        # then itself be a valid id, else it raises like any other.
        head = value.split("/", 1)[0]
        req = _prop_request(where, value)
        try:
            result = PROPERTY_ADAPTER.extract(req)
        except BadSessionId:
            assert head and not _valid(head)
            return
        assert result == NONE or result == S(head)
        return
    with pytest.raises(BadSessionId):
        PROPERTY_ADAPTER.extract(_prop_request(where, value))


@settings(max_examples=100)
@given(value=valid_ids)
def test_builtin_property_valid_ids(value: str) -> None:
    assert extract(waha, "GET", f"/api/sessions/{value}/me") == S(value)
    assert extract(waha, "POST", "/api/sendText", {"session": value}) == S(value)
    assert extract(blazz, "POST", "/api/messages/send", {"session_id": value}) == S(value)
    assert extract(wwebjs, "POST", f"/client/sendMessage/{value}") == S(value)
    assert extract(evolution, "POST", f"/message/sendText/{value}") == S(value)


@settings(max_examples=100)
@given(value=invalid_ids.filter(lambda v: "/" not in v and v != ""))
def test_builtin_property_invalid_ids(value: str) -> None:
    for adapter, path in (
        (waha, f"/api/sessions/{value}/me"),
        (blazz, f"/api/sessions/{value}/status"),
        (wwebjs, f"/client/sendMessage/{value}"),
        (evolution, f"/message/sendText/{value}"),
    ):
        with pytest.raises(BadSessionId):
            adapter.extract(UpstreamRequest("GET", path, MultiDict(), CIMultiDict()))


# =============================================================================
# registry
# =============================================================================


def test_registry_builds_every_builtin_kind() -> None:
    assert set(ADAPTERS) == {"waha", "blazz", "wwebjs", "evolution", "generic"}
    for kind in ("waha", "blazz", "wwebjs", "evolution"):
        adapter = build_adapter(AdapterConfig(kind))
        assert adapter.name == kind
        assert isinstance(adapter, ADAPTERS[kind])
    assert build_adapter(AdapterConfig("generic", BRIEF_EXAMPLE)).name == "generic"


def test_registry_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"adapter\.kind: unknown adapter 'wappi'.*waha"):
        build_adapter(AdapterConfig("wappi"))


@pytest.mark.parametrize("kind", ["waha", "blazz", "wwebjs", "evolution", "generic"])
def test_registry_bad_options_name_the_key(kind: str) -> None:
    with pytest.raises(ValueError, match=r"adapter\.options\.no_such_option: unknown option"):
        build_adapter(AdapterConfig(kind, {"no_such_option": 1}))


def test_status_enum_values_are_stable() -> None:
    # the proxy / metrics may print these
    assert {s.value for s in SessionStatus} == {
        "starting",
        "ready",
        "needs_auth",
        "stopped",
        "failed",
    }


def test_registry_options_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match=r"adapter\.options: must be a mapping"):
        build_adapter(AdapterConfig("waha", ["timeout"]))  # type: ignore[arg-type]


def test_option_errors_do_not_echo_values() -> None:
    secret = "s3cr3t-token-value"
    for options in ({"timeout": secret}, {"extra_body_roots": [secret, 1]}):
        with pytest.raises(ValueError) as info:
            WahaAdapter(options)
        assert secret not in str(info.value)


def test_generic_accepts_tuples_and_read_only_mappings() -> None:
    from types import MappingProxyType

    a = GenericAdapter(
        MappingProxyType(
            {
                "session_rules": ({"query": "s"},),
                "probe": MappingProxyType({"path": "/p/{session}"}),
                "health": {"path": "/h", "healthy_values": ("ok",)},
                "start": {"path": "/s", "json": MappingProxyType({"id": "{session}"})},
                "missing": {"status": (404, 410)},
            }
        )
    )
    assert extract(a, "GET", "/x?s=abc") == S("abc")
    assert a.session_missing(410, b"")


# -- removals, health answers, per-route timeouts, unwell ----------------------------


@pytest.mark.parametrize(
    ("adapter_name", "method", "url", "expected"),
    [
        ("waha", "DELETE", "/api/sessions/s1", True),
        ("waha", "POST", "/api/sessions/s1/stop", True),
        ("waha", "POST", "/api/sessions/s1/logout", True),
        ("waha", "POST", "/api/sessions/stop", True),
        ("waha", "POST", "/api/sessions/s1/restart", False),
        ("waha", "GET", "/api/sessions/s1", False),
        ("waha", "DELETE", "/api/s1/chats/1", False),
        ("blazz", "DELETE", f"/api/sessions/{BLAZZ_ID}", True),
        ("blazz", "DELETE", f"/api/sessions/{BLAZZ_ID}/", True),
        ("blazz", "POST", f"/api/sessions/{BLAZZ_ID}/reconnect", False),
        ("wwebjs", "GET", "/session/terminate/s1", True),
        ("wwebjs", "GET", "/session/stop/s1", True),
        ("wwebjs", "GET", "/session/status/s1", False),
        ("evolution", "DELETE", "/instance/logout/i1", True),
        ("evolution", "DELETE", "/instance/delete/i1", True),
        ("evolution", "POST", "/instance/restart/i1", False),
    ],
)
def test_removes(adapter_name: str, method: str, url: str, expected: bool) -> None:
    adapter = {"waha": waha, "blazz": blazz, "wwebjs": wwebjs, "evolution": evolution}[adapter_name]
    assert adapter.removes(make(adapter, method, url)) is expected


def test_unwell_counts_gateway_answers_not_application_errors() -> None:
    for adapter in (waha, blazz, wwebjs, evolution):
        assert [s for s in (400, 404, 500, 501, 502, 503, 504) if adapter.unwell(s)] == [
            502,
            503,
            504,
        ]


def test_blazz_statuses_as_the_real_service_sets_them() -> None:
    from router.adapters._http import map_status
    from router.adapters.blazz import _STATUSES

    def status(s: str) -> SessionStatus:
        return map_status(_STATUSES, s)

    assert status("connected") is SessionStatus.READY
    # qr_scanning is also what a restore from stored auth reports: starting.
    assert status("qr_scanning") is SessionStatus.STARTING
    assert status("authenticated") is SessionStatus.STARTING
    assert status("error") is SessionStatus.FAILED
    assert status("disconnected") is SessionStatus.STOPPED


def test_blazz_answers_a_create_for_a_running_session_itself() -> None:
    info = SessionInfo(BLAZZ_ID, SessionStatus.READY, {"status": "connected"})
    answer = blazz.create_answer(BLAZZ_ID, info)
    assert answer is not None and answer.status == 200
    assert answer.body == {"success": True, "session_id": BLAZZ_ID, "status": "connected"}
    assert waha.create_answer("s1", None) is None  # WAHA's own 422 is harmless
    notes = blazz.create_notes(
        make(
            blazz,
            "POST",
            "/api/sessions",
            {"session_id": BLAZZ_ID, "workspace_id": 7, "account_id": 11, "api_key": "k"},
        )
    )
    assert notes == {"workspace_id": 7, "account_id": 11}


def test_blazz_gives_session_calls_its_own_sixty_seconds_and_more() -> None:
    assert blazz.request_timeout("POST", "/api/sessions") == 65.0
    assert blazz.request_timeout("DELETE", f"/api/sessions/{BLAZZ_ID}") == 65.0
    assert blazz.request_timeout("POST", "/api/messages/send") is None
    assert waha.request_timeout("POST", "/api/sessions") is None


def test_blazz_health_answer_sums_the_fleet_in_blazz_shape() -> None:
    from router.adapters.base import HealthReport, InstanceHealth

    fleet = [
        InstanceHealth("a", True, HealthReport(True, sessions=3, connected=2)),
        InstanceHealth("b", True, HealthReport(True, sessions=1, connected=1)),
        InstanceHealth("c", False, None),
    ]
    assert blazz.health_paths == {"/health", "/health/ready", "/health/live"}
    answer = blazz.health_answer("/health", fleet)
    assert answer.status == 200
    body = answer.body
    assert isinstance(body, dict)
    assert body["status"] == "degraded"
    assert body["sessions"] == {"total": 4, "connected": 3, "disconnected": 1}
    assert body["instances"] == {"total": 3, "healthy": 2, "down": ["c"]}
    assert set(body) >= {"uptime", "memory", "timestamp"}
    down = [InstanceHealth("a", False, None)]
    assert blazz.health_answer("/health", down).status == 503
    assert blazz.health_answer("/health/ready", down).status == 503
    assert blazz.health_answer("/health/live", down).status == 200
    assert waha.health_paths == frozenset()
