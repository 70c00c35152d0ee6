"""The Blazz ``whatsapp-service`` dialect (Express + whatsapp-web.js).

The session id is in the path for session routes and only in the JSON body
for sends. Auth: ``api_key`` in the JSON body or the query string, never a
header. Unknown session -> 404 ``{"error": "Session not found"}``.
``POST /api/sessions/{id}/restore`` is broken as in the real service; a
restore is ``POST /api/sessions`` with the same ``session_id``.
"""

from __future__ import annotations

import hmac
import resource
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from router.simulator.context import SimContext, sim
from router.simulator.sessions import SimSession, Status, valid_name
from router.simulator.util import json_object, random_hex


def blazz_status(session: SimSession) -> str:
    if session.status is Status.WORKING:
        return "connected"
    if session.status is Status.STARTING:
        return "authenticated" if session.restoring else "qr_scanning"
    if session.status is Status.SCAN_QR_CODE:
        return "qr_scanning"
    if session.status is Status.FAILED:
        return "failed"
    return "disconnected"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def session_json(session: SimSession) -> dict[str, Any]:
    working = session.status is Status.WORKING
    return {
        "session_id": session.name,
        "workspace_id": session.workspace_id,
        "account_id": session.account_id,
        "status": blazz_status(session),
        "phone_number": session.phone if working else None,
        "connected_at": _iso(session.connected_at),
    }


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": False, "error": message, **extra}, status=status)


def _not_found() -> web.Response:
    return _error(404, "Session not found")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = sim(request).options.api_key
    if key is None or not request.path.startswith("/api/"):
        return await handler(request)
    given: object = request.query.get("api_key")
    if request.method not in ("GET", "HEAD") and request.can_read_body:
        body = await json_object(request)
        given = (body or {}).get("api_key", given)
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), key.encode()):
        return web.json_response({"error": "Invalid API key"}, status=401)
    return await handler(request)


# -- health ---------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    ctx = sim(request)
    sessions = list(ctx.sessions.sessions.values())
    connected = sum(1 for s in sessions if s.status is Status.WORKING)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return web.json_response(
        {
            "status": "healthy",
            "instance": ctx.name,
            "uptime": time.time() - ctx.started_at,
            "sessions": {
                "total": len(sessions),
                "connected": connected,
                "disconnected": len(sessions) - connected,
            },
            "memory": {"rss": rss, "heapUsed": rss // 2, "heapTotal": rss},
            "timestamp": datetime.now(UTC).isoformat(),
        }
    )


async def ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


# -- sessions -------------------------------------------------------------


async def create_session(request: web.Request) -> web.Response:
    """Start a session, restoring it when its auth file exists (the real restore path)."""
    ctx = sim(request)
    body = await json_object(request)
    if body is None:
        return _error(400, "Invalid JSON body")
    name, workspace = body.get("session_id"), body.get("workspace_id")
    if name is None or workspace is None:
        return _error(400, "Missing required fields", required=["session_id", "workspace_id"])
    if not valid_name(name):
        return _error(400, "Invalid session_id")
    session = ctx.sessions.get(name)
    if session is not None:
        return web.json_response(
            {"success": True, "message": "Session already exists", **session_json(session)}
        )
    session = ctx.sessions.create(name, workspace_id=workspace, account_id=body.get("account_id"))
    if body.get("priority") is not None:
        session.metadata["priority"] = body["priority"]
    ctx.sessions.start(session)
    return web.json_response(
        {"success": True, "message": "Session created", "qr_code": None, **session_json(session)}
    )


async def list_sessions(request: web.Request) -> web.Response:
    ctx = sim(request)
    sessions = [session_json(s) for s in ctx.sessions.sessions.values()]
    return web.json_response({"success": True, "sessions": sessions, "total": len(sessions)})


def _session(ctx: SimContext, request: web.Request) -> SimSession | None:
    return ctx.sessions.get(request.match_info["session"])


async def session_status(request: web.Request) -> web.Response:
    session = _session(sim(request), request)
    if session is None:
        return _not_found()
    return web.json_response({"success": True, **session_json(session)})


async def get_metadata(request: web.Request) -> web.Response:
    session = _session(sim(request), request)
    if session is None:
        return _not_found()
    return web.json_response(
        {"success": True, "session_id": session.name, "metadata": session.metadata}
    )


async def put_metadata(request: web.Request) -> web.Response:
    session = _session(sim(request), request)
    if session is None:
        return _not_found()
    body = await json_object(request)
    if body is None:
        return _error(400, "Invalid JSON body")
    body.pop("api_key", None)
    session.metadata.update(body.get("metadata", body))
    return web.json_response(
        {"success": True, "session_id": session.name, "metadata": session.metadata}
    )


async def restore(request: web.Request) -> web.Response:
    # Faithfully broken, like the real service.
    return web.json_response({"error": "workspaceId is not defined"}, status=500)


async def reconnect(request: web.Request) -> web.Response:
    ctx = sim(request)
    session = _session(ctx, request)
    if session is None:
        return _not_found()
    ctx.sessions.start(session)
    return web.json_response({"success": True, **session_json(session)})


async def regenerate_qr(request: web.Request) -> web.Response:
    session = _session(sim(request), request)
    if session is None:
        return _not_found()
    return web.json_response(
        {"success": True, "session_id": session.name, "qr_code": f"sim-qr-{random_hex(4)}"}
    )


async def delete_session(request: web.Request) -> web.Response:
    ctx = sim(request)
    session = _session(ctx, request)
    if session is None:
        return web.json_response({"success": True, "alreadyDisconnected": True})
    ctx.sessions.remove(session)  # the auth file stays: the session can be restored
    return web.json_response({"success": True, "message": "Session disconnected"})


# -- messages (session id only in the JSON body) -----------------------------


async def send(request: web.Request) -> web.Response:
    ctx = sim(request)
    media = request.path.endswith("send-media")
    body = await json_object(request)
    if body is None:
        return _error(400, "Invalid JSON body")
    required = ["session_id", "workspace_id", "recipient_phone"]
    if not media:
        required.append("message")
    elif "media" not in body:
        required.append("media_url")
    if any(body.get(f) in (None, "") for f in required):
        return _error(400, "Missing required fields", required=required)
    session = ctx.sessions.get(body["session_id"])
    if session is None:
        return _not_found()
    if session.status is not Status.WORKING:
        return _error(400, "Session not ready", session_status=blazz_status(session))
    chat = str(body["recipient_phone"])
    text = body.get("message") or body.get("caption") or body.get("media_url") or ""
    message_id = f"true_{chat}@c.us_{random_hex()}"
    ctx.recorder.record(
        session=session.name,
        chat=chat,
        text=str(text),
        message_id=message_id,
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    return web.json_response(
        {"success": True, "message_id": message_id, "timestamp": int(time.time())}
    )


async def message_status(request: web.Request) -> web.Response:
    ctx = sim(request)
    session = _session(ctx, request)
    if session is None:
        return _not_found()
    message_id = request.query.get("message_id", "")
    found = ctx.recorder.find(message_id)
    return web.json_response(
        {
            "success": True,
            "message_id": message_id,
            "status": "sent" if found and found["session"] == session.name else "unknown",
        }
    )


async def validate(request: web.Request) -> web.Response:
    session = _session(sim(request), request)
    if session is None:
        return _not_found()
    return web.json_response(
        {
            "success": True,
            "session_id": session.name,
            "valid": session.status is Status.WORKING,
            "status": blazz_status(session),
        }
    )


def setup(app: web.Application) -> None:
    app.middlewares.append(auth_middleware)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/health/ready", ready)
    r.add_get("/health/live", live)
    r.add_post("/api/sessions", create_session)
    r.add_get("/api/sessions", list_sessions)
    r.add_get("/api/sessions/{session}/status", session_status)
    r.add_get("/api/sessions/{session}/metadata", get_metadata)
    r.add_put("/api/sessions/{session}/metadata", put_metadata)
    r.add_post("/api/sessions/{session}/restore", restore)
    r.add_post("/api/sessions/{session}/reconnect", reconnect)
    r.add_post("/api/sessions/{session}/regenerate-qr", regenerate_qr)
    r.add_delete("/api/sessions/{session}", delete_session)
    r.add_post("/api/messages/send", send)
    r.add_post("/api/messages/send-media", send)
    r.add_get("/api/messages/{session}/status", message_status)
    r.add_get("/api/messages/{session}/validate", validate)
