"""The WAHA dialect (devlikeapro/waha), as far as the router needs it.

Session in the path (``/api/sessions/{s}``, ``/api/{s}/...``, ``/api/files/{s}/...``),
in the JSON body (``POST /api/sendText`` ..., default ``"default"``) or in the
query (``GET /api/messages?session=``). Bodies as NestJS's Express parsers:
JSON only with ``Content-Type: application/json``, forms as forms, anything
else is an empty body. Auth: header ``X-Api-Key`` or query
``x-api-key``. A session that is not on this instance is a 404; one that is
here but not WORKING makes a send answer 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import mimetypes
import time
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from router.simulator.context import SimContext, sim
from router.simulator.sessions import SimSession, Status, valid_name
from router.simulator.util import echo, parsed_body, random_hex

# Sends that deliver a message (recorded) and session actions that do not.
RECORDED_SENDS = (
    "sendText",
    "sendImage",
    "sendFile",
    "sendVoice",
    "sendVideo",
    "sendLocation",
    "sendPoll",
    "sendContactVcard",
    "sendLinkPreview",
    "reply",
    "forwardMessage",
)
UNRECORDED_ACTIONS = ("sendSeen", "startTyping", "stopTyping")


def _error(status: int, message: str, **extra: Any) -> web.Response:
    reason = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
    body = {"statusCode": status, "message": message, "error": reason.get(status, "Error")}
    return web.json_response({**body, **extra}, status=status)


def _not_found(name: object) -> web.Response:
    return _error(404, "Session not found", session=name)


def _not_working(session: SimSession) -> web.Response:
    return web.json_response(
        {
            "statusCode": 422,
            "error": "Session status is not as expected. Try again later or restart the session",
            "session": session.name,
            "status": session.status.value,
            "expected": [Status.WORKING.value],
        },
        status=422,
    )


def session_json(ctx: SimContext, session: SimSession) -> dict[str, Any]:
    working = session.status is Status.WORKING
    return {
        "name": session.name,
        "status": session.status.value,
        "config": session.config,
        "me": {"id": f"{session.phone}@c.us", "pushName": session.name} if working else None,
        "engine": {"engine": "SIM"},
        "assignedWorker": ctx.name,
    }


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = sim(request).options.api_key
    path = request.path
    if key is None or not (path.startswith("/api/") or path == "/api" or path == "/ws"):
        return await handler(request)
    given = request.headers.get("X-Api-Key") or request.query.get("x-api-key") or ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        return _error(401, "Unauthorized")
    return await handler(request)


# -- health ---------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "info": {}, "error": {}, "details": {}})


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"message": "pong"})


async def server_status(request: web.Request) -> web.Response:
    ctx = sim(request)
    now = time.time()
    return web.json_response(
        {
            "startTimestamp": int(ctx.started_at * 1000),
            "uptime": int((now - ctx.started_at) * 1000),
            "worker": {"id": ctx.name},
        }
    )


# -- sessions -------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    ctx = sim(request)
    everything = request.query.get("all", "").lower() in ("true", "1")
    return web.json_response(
        [
            session_json(ctx, s)
            for s in ctx.sessions.sessions.values()
            if everything or s.status is not Status.STOPPED
        ]
    )


async def create_session(request: web.Request) -> web.Response:
    ctx = sim(request)
    body = await parsed_body(request)
    if body is None:
        return _error(400, "body must be a JSON object")
    name = body.get("name") or f"session_{random_hex(4).lower()}"
    config = body.get("config") or {}
    if not valid_name(name) or not isinstance(config, dict):
        return _error(400, "invalid session name or config")
    if ctx.sessions.get(name) is not None:
        return web.json_response(
            {
                "statusCode": 422,
                "message": f"Session '{name}' already exists",
                "error": "Unprocessable Entity",
            },
            status=422,
        )
    session = ctx.sessions.create(name, config=config)
    if body.get("start", True):
        ctx.sessions.start(session)
    return web.json_response(session_json(ctx, session), status=201)


def _known_or_authed(ctx: SimContext, name: str) -> SimSession | None:
    """The session if here; created (STOPPED) if only its auth file exists."""
    session = ctx.sessions.get(name)
    if session is None and ctx.sessions.auth.exists(name):
        session = ctx.sessions.create(name)
    return session


async def legacy_start(request: web.Request) -> web.Response:
    ctx = sim(request)
    body = await parsed_body(request)
    name = (body or {}).get("name", "default")
    if not valid_name(name):
        return _error(400, "invalid session name")
    session = ctx.sessions.get(name) or ctx.sessions.create(name)
    if session.status in (Status.STOPPED, Status.FAILED):
        ctx.sessions.start(session)
    return web.json_response(session_json(ctx, session), status=201)


async def get_session(request: web.Request) -> web.Response:
    ctx = sim(request)
    session = ctx.sessions.get(request.match_info["session"])
    if session is None:
        return _not_found(request.match_info["session"])
    return web.json_response(session_json(ctx, session))


async def session_me(request: web.Request) -> web.Response:
    ctx = sim(request)
    session = ctx.sessions.get(request.match_info["session"])
    if session is None:
        return _not_found(request.match_info["session"])
    return web.json_response(session_json(ctx, session)["me"])


async def update_session(request: web.Request) -> web.Response:
    ctx = sim(request)
    session = ctx.sessions.get(request.match_info["session"])
    if session is None:
        return _not_found(request.match_info["session"])
    body = await parsed_body(request)
    if body is None or not isinstance(body.get("config", {}), dict):
        return _error(400, "body must be a JSON object with an object 'config'")
    session.config = body.get("config", session.config)
    return web.json_response(session_json(ctx, session))


async def delete_session(request: web.Request) -> web.Response:
    ctx = sim(request)
    session = ctx.sessions.get(request.match_info["session"])
    if session is None:
        return _not_found(request.match_info["session"])
    ctx.sessions.remove(session)
    ctx.sessions.auth.delete(session.name)
    return web.json_response({})


async def session_action(request: web.Request) -> web.Response:
    ctx = sim(request)
    name, action = request.match_info["session"], request.match_info["action"]
    session = _known_or_authed(ctx, name) if action == "start" else ctx.sessions.get(name)
    if session is None:
        return _not_found(name)
    if action == "start":
        if session.status in (Status.STOPPED, Status.FAILED):
            ctx.sessions.start(session)
    elif action == "stop":
        ctx.sessions.stop(session)
    elif action == "restart":
        ctx.sessions.start(session)
    else:
        ctx.sessions.logout(session)
    return web.json_response(session_json(ctx, session), status=201)


# -- sends (session in the JSON body) ---------------------------------------


async def send(request: web.Request) -> web.Response:
    ctx = sim(request)
    kind = request.match_info["kind"]
    body = await parsed_body(request)
    if body is None:
        return _error(400, "body must be a JSON object")
    name = body.get("session", "default")
    session = ctx.sessions.get(name)
    if session is None:
        return _not_found(name)
    if session.status is not Status.WORKING:
        return _not_working(session)
    chat = body.get("chatId")
    if not isinstance(chat, str) or not chat:
        return _error(400, "chatId should not be empty")
    if kind in UNRECORDED_ACTIONS:
        return web.json_response({"success": True}, status=201)
    text = body.get("text") or body.get("caption") or ""
    message_id = f"true_{chat}_{random_hex()}"
    ctx.recorder.record(
        session=session.name,
        chat=chat,
        text=text if isinstance(text, str) else json.dumps(text),
        message_id=message_id,
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    return web.json_response(
        {
            "id": message_id,
            "timestamp": int(time.time()),
            "from": f"{session.phone}@c.us",
            "fromMe": True,
            "to": chat,
            "body": text,
            "ack": 1,
        },
        status=201,
    )


async def reaction(request: web.Request) -> web.Response:
    ctx = sim(request)
    body = await parsed_body(request) or {}
    name = body.get("session", "default")
    session = ctx.sessions.get(name)
    if session is None:
        return _not_found(name)
    if session.status is not Status.WORKING:
        return _not_working(session)
    return web.json_response({"success": True})


# -- per-session reads: echo what arrived -----------------------------------


async def _echo_for(request: web.Request, name: str) -> web.Response:
    ctx = sim(request)
    if ctx.sessions.get(name) is None:
        return _not_found(name)
    return web.json_response(await echo(request, ctx.name, name))


async def path_session_echo(request: web.Request) -> web.Response:
    return await _echo_for(request, request.match_info["session"])


async def query_session_echo(request: web.Request) -> web.Response:
    return await _echo_for(request, request.query.get("session", "default"))


async def get_file(request: web.Request) -> web.Response:
    ctx = sim(request)
    name, file = request.match_info["session"], request.match_info["file"]
    if ctx.sessions.get(name) is None:
        return _not_found(name)
    content_type = mimetypes.guess_type(file)[0] or "application/octet-stream"
    body = f"sim-file {name}/{file}\n".encode() * 64
    return web.Response(body=body, content_type=content_type)


# -- websocket --------------------------------------------------------------


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ctx = sim(request)
    events = {e for e in request.query.get("events", "").split(",") if e}
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    ctx.websockets.add(ws)
    sub = ctx.recorder.subscribe(request.query.get("session", "*"))

    async def pump() -> None:
        while True:
            event = await sub.queue.get()
            if not events or "*" in events or event["event"] in events:
                await ws.send_json(event)

    pumping = asyncio.create_task(pump())
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_json({"event": "echo", "data": msg.data})
    finally:
        ctx.recorder.unsubscribe(sub)
        ctx.websockets.discard(ws)
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await pumping
    return ws


def setup(app: web.Application) -> None:
    app.middlewares.append(auth_middleware)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/ping", ping)
    r.add_get("/ws", websocket)
    r.add_get("/api/server/status", server_status)
    r.add_get("/api/sessions", list_sessions)
    r.add_post("/api/sessions", create_session)
    r.add_post("/api/sessions/start", legacy_start)
    r.add_get("/api/sessions/{session}", get_session)
    r.add_put("/api/sessions/{session}", update_session)
    r.add_delete("/api/sessions/{session}", delete_session)
    r.add_get("/api/sessions/{session}/me", session_me)
    r.add_post("/api/sessions/{session}/{action:start|stop|restart|logout}", session_action)
    kinds = "|".join(RECORDED_SENDS + UNRECORDED_ACTIONS)
    r.add_post("/api/{kind:" + kinds + "}", send)
    r.add_put("/api/reaction", reaction)
    r.add_get("/api/messages", query_session_echo)
    r.add_get("/api/checkNumberStatus", query_session_echo)
    r.add_get("/api/contacts", query_session_echo)
    r.add_get("/api/contacts/{tail:.*}", query_session_echo)
    r.add_get("/api/files/{session}/{file}", get_file)
    r.add_route("*", "/api/{session}/{tail:.*}", path_session_echo)
