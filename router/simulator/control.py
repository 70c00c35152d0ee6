"""``/_sim/*``: test control (no auth, never faulted) and streaming helpers.

Control: ``GET /_sim/sent``, ``GET /_sim/state``, ``GET|POST /_sim/fault``,
``POST /_sim/sessions/{s}/pair``, ``POST /_sim/bulk_sessions``.
Blazz only: ``POST /_sim/sessions/{s}/kill-browser`` (Chromium dies unnoticed:
status stays ``connected``, sends answer 500 "Protocol error ... Session
closed"), ``POST /_sim/sessions/{s}/disconnect`` ``{"reason"}`` (the client's
``disconnected`` event: status ``disconnected``; a reason containing LOGOUT
also deletes the stored login). ``pair`` takes ``{"phone": P}``; ``"none"``
makes the phone number unreadable, so the session ends in ``error``.
Proxy helpers: ``/_sim/stream``, ``/_sim/sse``, ``/_sim/gzip``, ``/_sim/big``,
``/_sim/echo/{tail}``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import time

from aiohttp import web

from router.simulator.blazz_sessions import BLAZZ_STATUSES, BlazzSessions, Client
from router.simulator.context import sim
from router.simulator.faults import Fault, crash
from router.simulator.sessions import SimSession, Status, phone_for, valid_name
from router.simulator.util import echo, json_object

_WAHA_TO_BLAZZ = {
    "WORKING": "connected",
    "STARTING": "authenticated",
    "SCAN_QR_CODE": "qr_scanning",
    "FAILED": "error",
    "STOPPED": "disconnected",
}
GZIP_TEXT = ("The router must pass this gzip body through untouched.\n" * 64).encode()
GZIP_BODY = gzip.compress(GZIP_TEXT, mtime=0)
BIG_BLOCK = bytes(range(256)) * 256  # 64 KiB pattern for /_sim/big


def _session_state(s: SimSession) -> dict[str, object]:
    return {
        "name": s.name,
        "status": s.status.value,
        "workspace_id": s.workspace_id,
        "phone": s.phone,
        "connected_at": s.connected_at,
    }


async def sent(request: web.Request) -> web.Response:
    ctx = sim(request)
    return web.json_response({"instance": ctx.name, "sent": ctx.recorder.records})


async def state(request: web.Request) -> web.Response:
    ctx = sim(request)
    if ctx.blazz is not None:
        sessions = ctx.blazz.state()
    else:
        sessions = [_session_state(s) for s in ctx.sessions.sessions.values()]
    return web.json_response(
        {
            "instance": ctx.name,
            "dialect": ctx.options.dialect,
            "pid": os.getpid(),
            "started_at": ctx.started_at,
            "fault": ctx.faults.current.as_dict(),
            "sessions": sessions,
            "websockets": len(ctx.websockets),
        }
    )


async def get_fault(request: web.Request) -> web.Response:
    return web.json_response(sim(request).faults.current.as_dict())


async def set_fault(request: web.Request) -> web.StreamResponse:
    ctx = sim(request)
    try:
        fault = Fault.parse(await json_object(request))
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if fault.mode == "crash" and fault.paths is None:
        resp = web.json_response({"instance": ctx.name, "crashing": True})
        await resp.prepare(request)
        await resp.write_eof()
        crash()
    ctx.faults.set(fault)
    return web.json_response({"instance": ctx.name, "fault": fault.as_dict()})


def _blazz_client(request: web.Request) -> tuple[BlazzSessions, Client]:
    """The Blazz sessions and the path's client, or a 404 JSON answer."""
    blazz = sim(request).blazz
    if blazz is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": "Blazz dialect only"}), content_type="application/json"
        )
    client = blazz.get(request.match_info["session"])
    if client is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": "Session not found"}), content_type="application/json"
        )
    return blazz, client


async def _blazz_pair(request: web.Request) -> web.Response:
    blazz, client = _blazz_client(request)
    body = await json_object(request) if request.can_read_body else {}
    phone = (body or {}).get("phone")
    if phone is not None and not isinstance(phone, str):
        return web.json_response({"error": "phone must be a string"}, status=400)
    try:
        blazz.pair(client, phone)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=409)
    return web.json_response(blazz.state_of(client))


async def kill_browser(request: web.Request) -> web.Response:
    blazz, client = _blazz_client(request)
    blazz.kill_browser(client)
    return web.json_response(blazz.state_of(client))


async def disconnect(request: web.Request) -> web.Response:
    blazz, client = _blazz_client(request)
    body = await json_object(request) if request.can_read_body else {}
    reason = (body or {}).get("reason", "NAVIGATION")
    blazz.disconnected(client, str(reason))
    return web.json_response(blazz.state_of(client))


async def pair(request: web.Request) -> web.Response:
    ctx = sim(request)
    if ctx.blazz is not None:
        return await _blazz_pair(request)
    session = ctx.sessions.get(request.match_info["session"])
    if session is None:
        return web.json_response({"error": "Session not found"}, status=404)
    ctx.sessions.pair(session)
    return web.json_response(_session_state(session))


async def bulk_sessions(request: web.Request) -> web.Response:
    """Put many sessions in memory at once, already in ``status`` (default WORKING).

    Body: ``{"names": [...]}`` or ``{"prefix": "s", "count": N, "first": 0}``;
    optional ``status`` (WAHA name), ``workspace_id``, ``auth`` (also write
    each session's auth file, default false). Sessions already here are
    left alone. For load and discovery tests: no start-up timers run.
    Blazz: ``status`` may also be a Blazz status; each session takes its
    profile lock (a profile locked elsewhere is skipped, listed in ``locked``)
    and ``auth`` stores its login in the profile.
    """
    ctx = sim(request)
    body = await json_object(request)
    if body is None:
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    names = body.get("names")
    if names is None:
        prefix, count, first = body.get("prefix", "s"), body.get("count"), body.get("first", 0)
        if not isinstance(prefix, str) or not isinstance(count, int) or not isinstance(first, int):
            return web.json_response({"error": "need names, or prefix and count"}, status=400)
        names = [f"{prefix}{i}" for i in range(first, first + count)]
    if not isinstance(names, list) or not all(valid_name(n) for n in names):
        return web.json_response({"error": "names must be valid session names"}, status=400)
    workspace, write_auth = body.get("workspace_id"), bool(body.get("auth", False))
    if ctx.blazz is not None:
        wanted = body.get("status", Status.WORKING.value)
        blazz_status = _WAHA_TO_BLAZZ.get(wanted, wanted)
        if blazz_status not in BLAZZ_STATUSES:
            return web.json_response({"error": "unknown status"}, status=400)
        locked = []
        created = 0
        for name in names:
            if ctx.blazz.get(name) is not None:
                continue
            if ctx.blazz.bulk(name, blazz_status, workspace, write_auth):
                created += 1
            else:
                locked.append(name)
        return web.json_response({"instance": ctx.name, "created": created, "locked": locked})
    try:
        status = Status(body.get("status", Status.WORKING.value))
    except ValueError:
        return web.json_response({"error": "unknown status"}, status=400)
    now = time.time()
    created = 0
    for name in names:
        if ctx.sessions.get(name) is not None:
            continue
        session = ctx.sessions.create(name, workspace_id=workspace)
        session.status = status
        session.phone = phone_for(name)
        if status is Status.WORKING:
            session.connected_at = now
        if write_auth:
            ctx.sessions.auth.save(
                name,
                {"session": name, "phone_number": session.phone, "workspace_id": workspace},
            )
        created += 1
    return web.json_response({"instance": ctx.name, "created": created})


def _number(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number") from None


async def stream(request: web.Request) -> web.StreamResponse:
    """``n`` JSON lines, one per chunk, ``interval`` seconds apart."""
    n, interval = int(_number(request, "n", 5)), _number(request, "interval", 0.05)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(n):
        if i:
            await asyncio.sleep(interval)
        await resp.write(json.dumps({"i": i, "ts": time.time()}).encode() + b"\n")
    await resp.write_eof()
    return resp


async def sse(request: web.Request) -> web.StreamResponse:
    n, interval = int(_number(request, "n", 5)), _number(request, "interval", 0.05)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for i in range(n):
        if i:
            await asyncio.sleep(interval)
        data = json.dumps({"i": i, "ts": time.time()})
        await resp.write(f"id: {i}\nevent: tick\ndata: {data}\n\n".encode())
    await resp.write_eof()
    return resp


async def gzipped(request: web.Request) -> web.Response:
    """A pre-gzipped body; headers carry the hashes of both forms."""
    return web.Response(
        body=GZIP_BODY,
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Encoding": "gzip",
            "X-Sim-Sha256": hashlib.sha256(GZIP_BODY).hexdigest(),
            "X-Sim-Plain-Sha256": hashlib.sha256(GZIP_TEXT).hexdigest(),
        },
    )


def _big_chunks(size: int) -> list[memoryview]:
    block = memoryview(BIG_BLOCK)
    return [block[: min(len(block), size - off)] for off in range(0, size, len(block))]


async def big(request: web.Request) -> web.StreamResponse:
    """``bytes`` bytes of a fixed pattern; ``?chunked=1`` omits Content-Length."""
    size = int(_number(request, "bytes", 1024 * 1024))
    chunks = _big_chunks(size)
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    resp = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "X-Sim-Sha256": digest.hexdigest()}
    )
    if request.query.get("chunked") in ("1", "true"):
        resp.enable_chunked_encoding()
    else:
        resp.content_length = size
    await resp.prepare(request)
    for chunk in chunks:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def echo_any(request: web.Request) -> web.Response:
    return web.json_response(await echo(request, sim(request).name, None))


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/_sim/sent", sent)
    r.add_get("/_sim/state", state)
    r.add_get("/_sim/fault", get_fault)
    r.add_post("/_sim/fault", set_fault)
    r.add_post("/_sim/sessions/{session}/pair", pair)
    r.add_post("/_sim/sessions/{session}/kill-browser", kill_browser)
    r.add_post("/_sim/sessions/{session}/disconnect", disconnect)
    r.add_post("/_sim/bulk_sessions", bulk_sessions)
    r.add_get("/_sim/stream", stream)
    r.add_get("/_sim/sse", sse)
    r.add_get("/_sim/gzip", gzipped)
    r.add_get("/_sim/big", big)
    r.add_route("*", "/_sim/echo/{tail:.*}", echo_any)
