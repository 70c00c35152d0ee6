"""The request path: authenticate, find the session, find its owner, forward.

One streaming path for every method. Request bodies are buffered only when
the adapter needs the JSON (session id or credential in the body) or when
they are small enough to keep for a safe replay; everything else streams.
Responses stream back chunk by chunk (SSE and chunked replies are flushed
as they arrive); small responses with a known length are sent in one write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from router.adapters.base import BadSessionId, Extraction, UpstreamRequest
from router.errors import REQUEST_ID_HEADER, RouterError, error_response
from router.instances import Instance

if TYPE_CHECKING:
    from router.runtime import Runtime

log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the ones the client library
# must compute itself for the upstream leg.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

# Bodies up to this size are read whole even when the adapter does not need
# them: one write upstream instead of a stream, and replayable after a
# connection failure that provably happened before the upstream got it.
SMALL_BODY = 64 * 1024
# Responses up to this size with a known length go back in one write.
SMALL_RESPONSE = 256 * 1024

_METHODS_WITHOUT_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


def _filtered_request_headers(request: web.BaseRequest) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    connection = request.headers.get("Connection")
    extra = {t.strip().lower() for t in connection.split(",")} if connection else frozenset[str]()
    for k, v in request.headers.items():
        lk = k.lower()
        if lk in _REQUEST_DROP or lk in extra:
            continue
        headers.add(k, v)
    return headers


def _response_headers(up: aiohttp.ClientResponse) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for k, v in up.headers.items():
        if k.lower() not in _RESPONSE_DROP:
            headers.add(k, v)
    return headers


def _add_forwarded(headers: CIMultiDict[str], request: web.BaseRequest, request_id: str) -> None:
    peer = request.remote or ""
    prior = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    headers.setdefault("X-Forwarded-Host", request.host)
    headers[REQUEST_ID_HEADER] = request_id


async def _read_capped(request: web.BaseRequest, cap: int) -> bytes:
    length = request.content_length
    if length is not None and length > cap:
        raise RouterError(
            413, "body_too_large", f"request body of {length} bytes exceeds the {cap} byte cap"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise RouterError(413, "body_too_large", f"request body exceeds the {cap} byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


class ProxyHandler:
    """The aiohttp handler for every client request."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        try:
            return await self._handle(request, request_id)
        except RouterError as exc:
            return error_response(exc, request_id)

    async def _handle(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        rt = self.rt
        adapter = rt.adapter
        method = request.method
        path = request.path

        body: bytes | None = None
        parsed: dict[str, Any] | None = None
        if adapter.needs_body(method, path):
            body = await _read_capped(request, rt.config.limits.max_body_bytes)
            if body:
                parsed = _parse_json_object(body)
        elif method not in _METHODS_WITHOUT_BODY or request.body_exists:
            length = request.content_length
            if length is not None and length <= SMALL_BODY:
                body = await request.read()

        ureq = UpstreamRequest(
            method=method,
            path=path,
            query=MultiDict(request.query),
            headers=_filtered_request_headers(request),
            json=parsed,
        )
        try:
            ext = adapter.extract(ureq)
        except BadSessionId as exc:
            raise RouterError(400, "bad_session_id", str(exc)) from None

        if rt.api_keys:
            key = adapter.client_key(ureq)
            if key is None or key not in rt.api_keys:
                raise RouterError(
                    401, "unauthorized", "missing or invalid router API key", session=ext.session
                )

        websocket = request.headers.get("Upgrade", "").lower() == "websocket"
        if ext.fanout and websocket:
            from router.websocket import proxy_websocket_fanout

            return await proxy_websocket_fanout(rt, request, ureq, request_id)

        if ext.create and ext.session is not None:
            lock = rt.create_locks.setdefault(ext.session, asyncio.Lock())
            try:
                async with lock:
                    return await self._send(request, request_id, ureq, body, ext, websocket)
            finally:
                if not lock.locked() and rt.create_locks.get(ext.session) is lock:
                    del rt.create_locks[ext.session]
        return await self._send(request, request_id, ureq, body, ext, websocket)

    async def _send(
        self,
        request: web.BaseRequest,
        request_id: str,
        ureq: UpstreamRequest,
        body: bytes | None,
        ext: Extraction,
        websocket: bool,
    ) -> web.StreamResponse:
        rt = self.rt
        inst, placed = await self._route(ext)
        rt.adapter.apply_credential(ureq, inst.config)
        _add_forwarded(ureq.headers, request, request_id)
        if ureq.json_dirty and ureq.json is not None:
            body = json.dumps(ureq.json, separators=(",", ":")).encode()
            ureq.headers["Content-Type"] = "application/json"

        if websocket:
            from router.websocket import proxy_websocket

            return await proxy_websocket(rt, request, ureq, inst, request_id)
        if not placed:
            return await self._forward(request, ureq, body, inst, ext, placed, request_id)
        rt.reservations.add(inst.name)
        try:
            return await self._forward(request, ureq, body, inst, ext, placed, request_id)
        finally:
            rt.reservations.release(inst.name)

    async def _route(self, ext: Extraction) -> tuple[Instance, bool]:
        """The owner of the request's session; ``placed`` when it is a new placement."""
        rt = self.rt
        fleet = rt.fleet
        session = ext.session
        if session is not None:
            inst = await rt.resolver.owner(session, fleet, rt.adapter)
            if inst is not None:
                return inst, False
            if not ext.create:
                raise RouterError(
                    404,
                    "unknown_session",
                    f"session {session!r} does not run on any instance",
                    session=session,
                )
        elif not ext.create:
            inst = rt.any_instance()
            if inst is None:
                raise RouterError(503, "no_healthy_instance", "no healthy instance is available")
            return inst, False
        inst = rt.place()
        if inst is None:
            raise RouterError(
                503,
                "fleet_full" if fleet.healthy() else "no_healthy_instance",
                "no instance has capacity for a new session"
                if fleet.healthy()
                else "no healthy instance is available",
                session=session,
                headers={"Retry-After": "30"},
            )
        return inst, True

    async def _forward(
        self,
        request: web.BaseRequest,
        ureq: UpstreamRequest,
        body: bytes | None,
        inst: Instance,
        ext: Extraction,
        placed: bool,
        request_id: str,
    ) -> web.StreamResponse:
        data: Any = body if body is not None else (request.content if request.body_exists else None)
        url = inst.url(_path_qs(request.rel_url.raw_path, ureq))
        try:
            up_cm = inst.http.request(
                ureq.method,
                url,
                headers=ureq.headers,
                data=data,
                allow_redirects=False,
            )
            up = await up_cm
        except aiohttp.ClientConnectorError as exc:
            raise RouterError(
                502,
                "upstream_unreachable",
                f"instance {inst.name} refused the connection",
                session=ext.session,
                instance=inst.name,
            ) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise RouterError(
                504,
                "upstream_timeout",
                f"instance {inst.name} did not answer in time",
                session=ext.session,
                instance=inst.name,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise RouterError(
                502,
                "upstream_error",
                f"instance {inst.name} closed or reset the connection",
                session=ext.session,
                instance=inst.name,
            ) from exc

        try:
            return await self._relay(request, up, inst, ext, placed, request_id)
        finally:
            up.release()

    async def _relay(
        self,
        request: web.BaseRequest,
        up: aiohttp.ClientResponse,
        inst: Instance,
        ext: Extraction,
        placed: bool,
        request_id: str,
    ) -> web.StreamResponse:
        headers = _response_headers(up)
        headers[REQUEST_ID_HEADER] = request_id
        length = up.content_length
        chunked = length is None
        if placed:
            # Read the create answer whole: we may need the session name from it.
            payload = await self._read_upstream(up, inst, ext)
            await self._record_placement(up.status, payload, inst, ext)
            return web.Response(status=up.status, reason=up.reason, body=payload, headers=headers)
        if not chunked and length is not None and length <= SMALL_RESPONSE:
            payload = await self._read_upstream(up, inst, ext)
            return web.Response(status=up.status, reason=up.reason, body=payload, headers=headers)

        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        try:
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Headers are gone already: all we can do is cut the client off
            # so it sees a truncated body rather than a "complete" one.
            log.warning("upstream %s broke off a streamed response: %r", inst.name, exc)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def _read_upstream(
        self, up: aiohttp.ClientResponse, inst: Instance, ext: Extraction
    ) -> bytes:
        try:
            return await up.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise RouterError(
                504,
                "upstream_timeout",
                f"instance {inst.name} stopped answering mid-response",
                session=ext.session,
                instance=inst.name,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise RouterError(
                502,
                "upstream_error",
                f"instance {inst.name} broke off its response",
                session=ext.session,
                instance=inst.name,
            ) from exc

    async def _record_placement(
        self, status: int, payload: bytes, inst: Instance, ext: Extraction
    ) -> None:
        if not 200 <= status < 300:
            return
        session = ext.session or self.rt.adapter.created_session(status, payload)
        if session is None:
            log.warning("instance %s created a session the router cannot name", inst.name)
            return
        await self.rt.resolver.record(session, inst)


def _path_qs(raw_path: str, ureq: UpstreamRequest) -> str:
    # The raw (still percent-encoded) path goes upstream as the client sent
    # it; the query is rebuilt because adapters may move credentials in it.
    if not ureq.query:
        return raw_path
    return raw_path + "?" + urlencode(list(ureq.query.items()))


def _parse_json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        # Not JSON: the adapter sees no body fields and the bytes pass as sent.
        return None
    return value if isinstance(value, dict) else None
