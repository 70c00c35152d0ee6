"""WebSocket proxying (WAHA ``/ws?session=…``), one session or fanned out.

``session=*`` means "events of every session": the router opens one upstream
socket per healthy instance and merges what they send; frames from the
client go to all of them. For a key limited to sessions (router.scoping)
only frames naming one of its sessions pass (WAHA events carry
``session``); a frame that is not JSON or names no session is dropped, since
it cannot be told to be the client's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from router.adapters.base import UpstreamRequest
from router.errors import REQUEST_ID_HEADER, RouterError
from router.instances import Instance
from router.upstream import upstream_path_qs

if TYPE_CHECKING:
    from router.runtime import Runtime

log = logging.getLogger(__name__)

# Headers the WebSocket handshake owns; aiohttp's client sets its own.
_WS_DROP = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)


def _ws_headers(ureq: UpstreamRequest) -> dict[str, str]:
    return {k: v for k, v in ureq.headers.items() if k.lower() not in _WS_DROP}


async def _connect(
    inst: Instance, ureq: UpstreamRequest, raw_path: str, protocols: tuple[str, ...]
) -> aiohttp.ClientWebSocketResponse:
    try:
        # The same path and query rule as HTTP requests (router.proxy).
        return await inst.http.ws_connect(
            inst.url(upstream_path_qs(raw_path, ureq)),
            headers=_ws_headers(ureq),
            protocols=protocols,
            autoping=True,
            heartbeat=30,
        )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status < 400:
            # It answered the handshake as a plain request: this path takes
            # no WebSocket. The client's mistake, not a failing instance.
            raise RouterError(
                400,
                "not_a_websocket",
                f"{raw_path} does not take a WebSocket (the instance answered {exc.status})",
                instance=inst.name,
            ) from exc
        raise RouterError(
            exc.status if exc.status < 600 else 502,
            "upstream_ws_refused",
            f"instance {inst.name} refused the WebSocket ({exc.status})",
            instance=inst.name,
        ) from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise RouterError(
            502, "upstream_unreachable", f"instance {inst.name} is unreachable", instance=inst.name
        ) from exc


# Decides whether a session's frames may reach the client (a scope's ``allows``).
Allows = Callable[[str], bool]


def in_scope(text: str, allows: Allows) -> bool:
    """True when the frame is a JSON object whose ``session`` ``allows`` admits."""
    try:
        event = json.loads(text)
    except ValueError:
        return False
    session = event.get("session") if isinstance(event, dict) else None
    return isinstance(session, str) and allows(session)


async def _pump_to_client(
    up: aiohttp.ClientWebSocketResponse,
    client: web.WebSocketResponse,
    allows: Allows | None = None,
) -> None:
    async for msg in up:
        if msg.type is aiohttp.WSMsgType.TEXT:
            if allows is None or in_scope(msg.data, allows):
                await client.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            if allows is None:
                await client.send_bytes(msg.data)
        elif msg.type is aiohttp.WSMsgType.ERROR:
            break


async def _pump_to_upstreams(
    client: web.WebSocketResponse, ups: list[aiohttp.ClientWebSocketResponse]
) -> None:
    async for msg in client:
        for up in ups:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await up.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await up.send_bytes(msg.data)


async def _bridge(
    request: web.BaseRequest,
    ups: list[aiohttp.ClientWebSocketResponse],
    request_id: str,
    allows: Allows | None = None,
) -> web.WebSocketResponse:
    client = web.WebSocketResponse(autoping=True)
    client.headers[REQUEST_ID_HEADER] = request_id
    await client.prepare(request)
    tasks = [asyncio.create_task(_pump_to_client(up, client, allows)) for up in ups]
    tasks.append(asyncio.create_task(_pump_to_upstreams(client, ups)))
    try:
        # Either side closing ends the bridge (for a fan-out: the client, or
        # every upstream).
        while tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[-1] in done or all(t.done() for t in tasks[:-1]):
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for up in ups:
            await up.close()
        await client.close()
    return client


async def proxy_websocket(
    rt: Runtime,
    request: web.BaseRequest,
    ureq: UpstreamRequest,
    inst: Instance,
    request_id: str,
) -> web.StreamResponse:
    protocols = tuple(
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    )
    up = await _connect(inst, ureq, request.rel_url.raw_path, protocols)
    return await _bridge(request, [up], request_id)


async def proxy_websocket_fanout(
    rt: Runtime,
    request: web.BaseRequest,
    ureq: UpstreamRequest,
    request_id: str,
    *,
    allows: Allows | None = None,
) -> web.StreamResponse:
    """Every healthy instance's events on one socket; with ``allows`` (a
    scoped key), only the frames of sessions it admits."""
    instances = rt.fleet.healthy()
    if not instances:
        raise RouterError(503, "no_healthy_instance", "no healthy instance is available")
    ups: list[aiohttp.ClientWebSocketResponse] = []
    for inst in instances:
        per = UpstreamRequest(
            ureq.method, ureq.path, ureq.query.copy(), ureq.headers.copy(), ureq.json
        )
        rt.adapter.apply_credential(per, inst.config)
        try:
            ups.append(await _connect(inst, per, request.rel_url.raw_path, ()))
        except RouterError as exc:
            log.warning("fan-out WebSocket skips %s: %s", inst.name, exc.message)
    if not ups:
        raise RouterError(502, "upstream_unreachable", "no instance accepted the WebSocket")
    return await _bridge(request, ups, request_id, allows)
