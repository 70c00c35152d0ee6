"""The Blazz ``whatsapp-service`` dialect (Express 4 + whatsapp-web.js 1.33).

As strict as the real service, observed offline (``/work/real-blazz/REPORT.md``,
service source ``ltmoerdani/blazz@5d71136`` ``whatsapp-service/``):

- Bodies: ``express.json()`` + ``express.urlencoded()`` (see ``express.py``);
  JSON without ``Content-Type: application/json`` is ignored (body ``{}``);
  malformed JSON is Express's 400 HTML page.
- Auth in each handler, first: ``api_key`` from the body for POST/PUT/DELETE,
  from the query for GET (a repeated one is an array: 401), never a header.
  401 ``{"error":"Invalid API key"}``. Without ``--api-key`` only a request
  *without* ``api_key`` passes (``undefined === undefined``).
- Routing: case-insensitive, one optional trailing slash, ``:sessionId``
  percent-decoded (a malformed escape is 500 "Failed to decode param");
  no route: 404 ``{"error":"Endpoint not found","path":<originalUrl>,...}``.
- Sessions and sends: ``blazz_sessions.py``. Health: ``/health`` always 200,
  ``/health/ready`` 200 only with a main app and an API key configured,
  ``/health/live`` always 503 (the real bug).
- TimeoutHandler: a request still running when its budget (60 s
  ``/api/sessions*``, 45 s sends, 5 s ``/health*``, 30 s others) runs out
  crashes the process (``winston.warning is not a function``).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from router.simulator.blazz_sessions import BlazzSessions, CreateFailed, SendFailed
from router.simulator.context import SimContext, sim
from router.simulator.express import (
    MISSING,
    JSDate,
    Route,
    decode_uri_component,
    field,
    html_error,
    json_response,
    now_iso,
    parse_body,
    query_of,
    truthy,
)
from router.simulator.util import random_hex

AVAILABLE_ENDPOINTS: Final = [
    "/health",
    "/health/detailed",
    "/health/ready",
    "/health/live",
    "/health/metrics",
    "/api/sessions",
    "/api/messages/send",
    "/api/messages/send-media",
    "/api/messages/bulk-send",
]
# JavaScript's /^\+?[\d\s\-\(\)]+$/ after .replace(/\s/g, '') (\d is ASCII).
_JS_SPACE: Final = re.compile(
    "[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)
_PHONE: Final = re.compile(
    "\\+?[0-9\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff\\-()]+"
)


@dataclass(slots=True)
class Call:
    """One request as an Express handler sees it."""

    request: web.Request
    ctx: SimContext
    params: dict[str, str]
    query: dict[str, Any]
    body: Any

    @property
    def sessions(self) -> BlazzSessions:
        assert self.ctx.blazz is not None
        return self.ctx.blazz

    def key_ok(self, given: Any) -> bool:
        """``api_key !== (process.env.API_KEY || process.env.LARAVEL_API_TOKEN)``."""
        expected = self.ctx.options.api_key or None
        if expected is None:
            return given is MISSING
        return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())

    def body_key(self) -> bool:
        return self.key_ok(field(self.body, "api_key"))

    def query_key(self) -> bool:
        return self.key_ok(self.query.get("api_key", MISSING))


Endpoint = Callable[[Call], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return json_response(status, body)


def _bad_key() -> web.Response:
    return _json({"error": "Invalid API key"}, 401)


def _not_found() -> web.Response:
    return _json({"error": "Session not found"}, 404)


def _server_error(message: str) -> web.Response:
    return _json({"error": message}, 500)


# -- health (no key) -----------------------------------------------------------


def _memory() -> dict[str, Any]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return {"used": max(1, rss_mb * 2 // 3), "total": max(1, rss_mb), "unit": "MB"}


def _counts(call: Call) -> tuple[int, int]:
    clients = list(call.sessions.clients.values())
    return len(clients), sum(1 for c in clients if c.status == "connected")


async def health(call: Call) -> web.Response:
    total, connected = _counts(call)
    return _json(
        {
            "status": "healthy",
            "uptime": time.time() - call.ctx.started_at,
            "sessions": {"total": total, "connected": connected, "disconnected": total - connected},
            "memory": _memory(),
            "timestamp": now_iso(),
        }
    )


async def health_detailed(call: Call) -> web.Response:
    total, connected = _counts(call)
    by_status: dict[str, int] = {}
    for client in call.sessions.clients.values():
        name = str(client.status)
        by_status[name] = by_status.get(name, 0) + 1
    return _json(
        {
            "status": "healthy",
            "uptime": time.time() - call.ctx.started_at,
            "timestamp": now_iso(),
            "sessions": {
                "total": total,
                "connected": connected,
                "disconnected": total - connected,
                "connection_rate": round(connected / total * 100) if total else 0,
                "details": {"by_status": by_status},
            },
            "memory": _memory(),
        }
    )


async def health_ready(call: Call) -> web.Response:
    laravel = call.ctx.options.laravel_url is not None
    key = bool(call.ctx.options.api_key)
    total, _ = _counts(call)
    return _json(
        {
            "ready": laravel and key,
            "timestamp": now_iso(),
            "checks": {
                "laravel_configured": laravel,
                "api_key_configured": key,
                "active_sessions": total > 0,
                "session_count": total,
            },
        },
        200 if laravel and key else 503,
    )


async def health_live(call: Call) -> web.Response:
    # measureEventLoopDelay() returns an un-awaited Promise: `{} < 1000` is false.
    return _json(
        {
            "alive": False,
            "uptime": time.time() - call.ctx.started_at,
            "event_loop_delay_ms": {},
            "timestamp": now_iso(),
        },
        503,
    )


async def health_metrics(call: Call) -> web.Response:
    return _json(
        {
            "timestamp": now_iso(),
            "uptime_seconds": time.time() - call.ctx.started_at,
            "performance": {"event_loop_delay_ms": {}},
        }
    )


async def info(call: Call) -> web.Response:
    return _server_error(
        "Cannot find module '../../../package.json'\nRequire stack:\n"
        "- src/controllers/HealthController.js\n- src/routes/index.js\n- server.js"
    )


async def root(call: Call) -> web.Response:
    return _json(
        {
            "service": "WhatsApp Web.js Service",
            "version": "1.0.0",
            "status": "running",
            "documentation": "See API documentation for request/response formats",
            "timestamp": now_iso(),
        }
    )


async def last_activity(call: Call) -> web.Response:
    return _json(
        {
            "success": True,
            "data": {
                "session_id": call.params["sessionId"],
                "last_activity": None,
                "device_type": None,
                "seconds_since_activity": None,
                "message_count": 0,
            },
        }
    )


# -- sessions ------------------------------------------------------------------------


async def _create(call: Call, session_id: Any, workspace_id: Any, account_id: Any) -> web.Response:
    try:
        return _json(await call.sessions.create(session_id, workspace_id, account_id))
    except CreateFailed as exc:
        return _server_error(str(exc))


async def create_session(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    b = call.body
    return await _create(
        call, field(b, "session_id"), field(b, "workspace_id"), field(b, "account_id")
    )


async def list_sessions(call: Call) -> web.Response:
    if not call.query_key():
        return _bad_key()
    sessions = [
        {
            "session_id": c.session_id,
            "workspace_id": c.metadata.get("workspaceId", MISSING),
            "status": c.metadata.get("status", MISSING),
            "phone_number": c.metadata.get("phoneNumber", MISSING),
            "connected_at": c.metadata.get("connectedAt", MISSING),
        }
        for c in call.sessions.clients.values()
    ]
    return _json({"success": True, "sessions": sessions, "total": len(sessions)})


async def session_status(call: Call) -> web.Response:
    if not call.query_key():
        return _bad_key()
    session_id = call.params["sessionId"]
    meta = call.sessions.metadata(session_id)
    if meta is None:
        return _not_found()
    return _json(
        {
            "session_id": session_id,
            "status": meta.get("status", MISSING),
            "phone_number": meta.get("phoneNumber", MISSING),
            "workspace_id": meta.get("workspaceId", MISSING),
            "connected_at": meta.get("connectedAt", MISSING),
            "last_activity": meta.get("lastActivity", MISSING),
        }
    )


async def get_metadata(call: Call) -> web.Response:
    if not call.query_key():
        return _bad_key()
    meta = call.sessions.metadata(call.params["sessionId"])
    if meta is None:
        return _not_found()
    return _json({"success": True, "session_id": call.params["sessionId"], "metadata": meta})


async def put_metadata(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    updates = field(call.body, "updates")
    if not isinstance(updates, dict | list):
        return _json({"error": "Invalid updates object"}, 400)
    meta = call.sessions.metadata(call.params["sessionId"])
    if meta is not None:
        meta.update(
            updates if isinstance(updates, dict) else {str(i): v for i, v in enumerate(updates)}
        )
    return _json({"success": True, "session_id": call.params["sessionId"], "metadata": meta})


async def restore(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    return _server_error("workspaceId is not defined")  # ReferenceError in the controller


async def delete_session(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    return _json(await call.sessions.disconnect(call.params["sessionId"]))


async def reconnect(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    session_id = call.params["sessionId"]
    await call.sessions.disconnect(session_id)
    b = call.body
    return await _create(call, session_id, field(b, "workspace_id"), field(b, "account_id"))


async def regenerate_qr(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    session_id = call.params["sessionId"]
    await call.sessions.disconnect(session_id)
    b = call.body
    try:
        await call.sessions.create(session_id, field(b, "workspace_id"), field(b, "account_id"))
    except CreateFailed as exc:
        return _server_error(str(exc))
    return _json({"qr_code": MISSING, "expires_in": 300})  # the create never returns a QR


# -- messages -------------------------------------------------------------------------


def _phone_ok(phone: str) -> bool:
    return _PHONE.fullmatch(_JS_SPACE.sub("", phone)) is not None


def _deliver(call: Call, session_id: Any, phone: Any, message: Any, kind: Any) -> dict[str, Any]:
    """``sessionManager.sendMessage``: raises SendFailed; records what is sent."""
    client = call.sessions.sendable(session_id)
    kind = kind if truthy(kind) else "text"
    media = isinstance(message, dict) and truthy(message.get("mediaUrl"))
    if kind != "text" and not (kind == "media" and media):
        return {"success": True}  # no branch sends anything: message_id undefined
    chat = f"{phone}"
    if isinstance(message, dict):
        text = message.get("caption") or message.get("mediaUrl") or ""
        text = text if media else str(message)
    else:
        text = message
    message_id = f"true_{chat}@c.us_3EB0{random_hex(9)}"
    call.ctx.recorder.record(
        session=client.name,
        chat=chat,
        text=str(text),
        message_id=message_id,
        idempotency_key=call.request.headers.get("Idempotency-Key"),
    )
    now = time.time()
    client.metadata["lastActivity"] = JSDate(now)  # message_create (fromMe) updates it
    return {"success": True, "message_id": message_id, "timestamp": int(now)}


def _send_error(exc: SendFailed) -> web.Response:
    if str(exc) == "Session not found":
        return _not_found()
    if str(exc) == "Session not connected":
        return _json({"error": "Session not connected. Please check session status."}, 400)
    return _server_error(str(exc))


async def send(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    b = call.body
    session_id, phone, message = (
        field(b, "session_id"),
        field(b, "recipient_phone"),
        field(b, "message"),
    )
    if not (truthy(session_id) and truthy(phone) and truthy(message)):
        return _json(
            {
                "error": "Missing required fields",
                "required": ["session_id", "recipient_phone", "message"],
            },
            400,
        )
    if not isinstance(phone, str):
        return _server_error("recipient_phone.replace is not a function")
    if not _phone_ok(phone):
        return _json({"error": "Invalid phone number format"}, 400)
    if not isinstance(message, str | dict | list):
        return _json({"error": "Message must be string or object"}, 400)
    try:
        return _json(_deliver(call, session_id, phone, message, field(b, "type")))
    except SendFailed as exc:
        return _send_error(exc)


async def send_media(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    b = call.body
    session_id, phone, url = (
        field(b, "session_id"),
        field(b, "recipient_phone"),
        field(b, "media_url"),
    )
    if not (truthy(session_id) and truthy(phone) and truthy(url)):
        return _json(
            {
                "error": "Missing required fields",
                "required": ["session_id", "recipient_phone", "media_url"],
            },
            400,
        )
    caption = field(b, "caption")
    message = {"mediaUrl": url, "caption": caption if truthy(caption) else "", "filename": "media"}
    try:
        return _json(_deliver(call, session_id, phone, message, "media"))
    except SendFailed as exc:
        return _send_error(exc)


async def bulk_send(call: Call) -> web.Response:
    if not call.body_key():
        return _bad_key()
    b = call.body
    session_id, recipients, message = (
        field(b, "session_id"),
        field(b, "recipients"),
        field(b, "message"),
    )
    if not truthy(session_id) or not isinstance(recipients, list) or not recipients:
        return _json(
            {"error": "Missing required fields", "required": ["session_id", "recipients (array)"]},
            400,
        )
    if not truthy(message):
        return _json({"error": "Message content is required"}, 400)
    if not all(isinstance(r, str) for r in recipients):
        return _server_error("phone.replace is not a function")
    invalid = [r for r in recipients if not _phone_ok(r)]
    if invalid:
        return _json(
            {
                "error": "Invalid phone number format for some recipients",
                "invalid_recipients": invalid,
            },
            400,
        )
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for recipient in recipients:
        try:
            sent = _deliver(call, session_id, recipient, message, field(b, "type"))
        except SendFailed as exc:
            failure = {"recipient": recipient, "success": False, "error": str(exc)}
            errors.append(failure)
            results.append(failure)
            continue
        results.append(
            {
                "recipient": recipient,
                "success": True,
                "message_id": sent.get("message_id", MISSING),
                "timestamp": sent.get("timestamp", MISSING),
            }
        )
        await asyncio.sleep(call.ctx.options.bulk_send_pause)
    ok = sum(1 for r in results if r["success"])
    return _json(
        {
            "success": True,
            "total": len(results),
            "successful": ok,
            "failed": len(results) - ok,
            "results": results,
            "errors": errors,
        }
    )


async def message_status(call: Call) -> web.Response:
    if not call.query_key():
        return _bad_key()
    message_id = call.query.get("message_id", MISSING)
    if not truthy(message_id):
        return _json({"error": "Missing required field: message_id"}, 400)
    session_id = call.params["sessionId"]
    meta = call.sessions.metadata(session_id)
    if meta is None:
        return _not_found()
    if meta.get("status") != "connected":
        return _json({"error": "Session not connected"}, 400)
    return _json(
        {
            "success": True,
            "session_id": session_id,
            "message_id": message_id,
            "session_status": meta.get("status"),
            "connected_at": meta.get("connectedAt", MISSING),
            "last_activity": meta.get("lastActivity", MISSING),
            "note": "Exact message status tracking depends on message_ack events",
        }
    )


async def validate(call: Call) -> web.Response:
    if not call.query_key():
        return _bad_key()
    session_id = call.params["sessionId"]
    meta = call.sessions.metadata(session_id)
    if meta is None:
        return _json({"success": False, "error": "Session not found", "can_send": False}, 404)
    status = meta.get("status", MISSING)
    can_send = status == "connected"
    last = meta.get("lastActivity", MISSING)
    healthy: Any = last if not truthy(last) else time.time() - float(last) < 300
    advice = []
    if not can_send:
        if status == "qr_scanning":
            advice.append("Session is waiting for QR code scan")
        elif status == "disconnected":
            advice.append("Session is disconnected, please reconnect")
        else:
            advice.append(f"Session is {status}, cannot send messages")
    if not healthy and can_send:
        advice.append("Session has been inactive for a while, consider reconnecting")
    if can_send and healthy:
        advice.append("Session is ready to send messages")
    return _json(
        {
            "success": True,
            "session_id": session_id,
            "status": status,
            "can_send": can_send,
            "is_healthy": healthy,
            "last_activity": last,
            "phone_number": meta.get("phoneNumber", MISSING),
            "recommendations": advice,
        }
    )


# -- routing ---------------------------------------------------------------------------

ROUTES: Final[list[tuple[Route, Endpoint]]] = [
    (Route("GET", "/health", "health"), health),
    (Route("GET", "/health/detailed", "health_detailed"), health_detailed),
    (Route("GET", "/health/ready", "health_ready"), health_ready),
    (Route("GET", "/health/live", "health_live"), health_live),
    (Route("GET", "/health/metrics", "health_metrics"), health_metrics),
    (Route("GET", "/info", "info"), info),
    (Route("POST", "/api/sessions", "create"), create_session),
    (Route("GET", "/api/sessions", "list"), list_sessions),
    (Route("GET", "/api/sessions/:sessionId/status", "status"), session_status),
    (Route("GET", "/api/sessions/:sessionId/metadata", "metadata"), get_metadata),
    (Route("PUT", "/api/sessions/:sessionId/metadata", "put_metadata"), put_metadata),
    (Route("POST", "/api/sessions/:sessionId/restore", "restore"), restore),
    (Route("DELETE", "/api/sessions/:sessionId", "delete"), delete_session),
    (Route("POST", "/api/sessions/:sessionId/reconnect", "reconnect"), reconnect),
    (Route("POST", "/api/sessions/:sessionId/regenerate-qr", "regenerate_qr"), regenerate_qr),
    (Route("POST", "/api/messages/send", "send"), send),
    (Route("POST", "/api/messages/send-media", "send_media"), send_media),
    (Route("POST", "/api/messages/bulk-send", "bulk_send"), bulk_send),
    (Route("GET", "/api/messages/:sessionId/status", "message_status"), message_status),
    (Route("GET", "/api/messages/:sessionId/validate", "validate"), validate),
    (
        Route("GET", "/api/internal/sessions/:sessionId/last-activity", "last_activity"),
        last_activity,
    ),
    (Route("GET", "/", "root"), root),
]


def _decode_error(param: str) -> web.Response:
    return _json(
        {
            "error": "Internal server error",
            "message": f"Failed to decode param '{param}'",
            "timestamp": now_iso(),
        },
        500,
    )


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Express: body parsers, then the router's layers in order, then 404."""
    ctx = sim(request)
    if not ctx.port and request.url.port:
        ctx.port = request.url.port
    parsed = request.get(_PARSED)
    body, failed = parsed if parsed is not None else await parse_body(request)
    if failed is not None:
        return failed
    path = request.raw_path.split("?", 1)[0]
    method = request.method
    for route, endpoint in ROUTES:
        try:
            params = route.match(path)
        except ValueError as exc:
            return _decode_error(str(exc))  # layerError: only the error handler runs
        if params is None or not route.handles(method):
            continue
        return await endpoint(Call(request, ctx, params, query_of(request), body))
    try:  # router.use('*'): its param "0" is the whole path, decoded
        decode_uri_component(path)
    except ValueError:
        return _decode_error(path)
    return _json(
        {
            "error": "Endpoint not found",
            "path": request.raw_path,
            "method": method,
            "available_endpoints": AVAILABLE_ENDPOINTS,
            "timestamp": now_iso(),
        },
        404,
    )


# -- TimeoutHandler -----------------------------------------------------------------------

_BUDGET_PATTERNS: Final = (
    ("sessions", re.compile("/api/sessions")),
    ("send", re.compile("/api/messages/send")),
    ("health", re.compile("/health")),
    ("status", re.compile("/api/sessions/.*/status")),
    ("reconnect", re.compile("/api/sessions/.*/reconnect")),
    ("regenerate_qr", re.compile("/api/sessions/.*/regenerate-qr")),
)


def budget_for(path: str, budgets: dict[str, float]) -> float:
    """``getTimeoutForRoute(req.path)``: the first pattern found anywhere wins."""
    for key, pattern in _BUDGET_PATTERNS:
        if pattern.search(path):
            return budgets[key]
    return budgets["default"]


# ``parse_body``'s answer, taken before the TimeoutHandler starts (dispatch uses it).
_PARSED: web.RequestKey[tuple[Any, web.Response | None]] = web.RequestKey("sim.blazz_body")


def timeout_middleware(ctx: SimContext) -> Middleware:
    """Outermost: the budget covers injected delays too, like a slow handler.

    As in server.js, ``express.json()`` / ``express.urlencoded()`` come first:
    the body is read and parsed before the timer starts (upload time spends
    no budget), and a body-parse error never starts it.
    """
    budgets = dict(ctx.options.request_timeouts)

    def crash(path: str) -> None:
        print(
            f"Request timeout on {path}: TypeError: winston.warning is not a function",
            file=sys.stderr,
            flush=True,
        )
        if ctx.blazz is not None:
            ctx.blazz.kill_browsers()  # puppeteer's exit hook
        os._exit(1)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sim"):
            return await handler(request)
        request[_PARSED] = parsed = await parse_body(request)
        if parsed[1] is not None:
            return await handler(request)  # next(err): only the error handler runs
        path = request.raw_path.split("?", 1)[0]
        timer = asyncio.get_running_loop().call_later(budget_for(path, budgets), crash, path)
        try:
            return await handler(request)
        finally:
            timer.cancel()

    return middleware


def outer_middlewares(ctx: SimContext) -> list[Middleware]:
    return [timeout_middleware(ctx)]


def setup(app: web.Application) -> None:
    app.router.add_route("*", "/{tail:.*}", dispatch)


__all__ = ["ROUTES", "budget_for", "dispatch", "html_error", "outer_middlewares", "setup"]
