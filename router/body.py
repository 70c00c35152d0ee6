"""Client request bodies: bounded, decoded and parsed the way the upstream would.

* **Size**: ``limits.max_body_bytes`` per request, buffered or streamed (413).
* **Memory**: every buffered body counts against ``limits.max_buffered_bytes``
  for the whole process while its request lives; beyond it a request gets 503
  with ``Retry-After`` instead of memory (``BodyBudget``).
* **Time**: a body that makes no progress for ``limits.body_timeout`` seconds
  is a 408 and the connection closes (a slow client holds nothing forever).
* **Encoding**: the server does not decompress (a compressed body streams
  through untouched, header included); a body the router must read is
  decoded here, bounded (zip bombs), and garbage is a 400, never a 500.
* **Parsing**: by ``Content-Type``, as Express's parsers do: JSON only with
  ``application/json``, forms only where the adapter's upstream parses them.
  A body the upstream would not parse gives the adapter nothing, so the
  router routes by exactly what the upstream will act on. Invalid or too
  deeply nested JSON is a 400.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from router.errors import RouterError

JSON_TYPES = frozenset({"application/json"})
FORM_TYPE = "application/x-www-form-urlencoded"


class ClientGone(Exception):
    """The client closed the connection while sending its body."""


class BodyBudget:
    """Bytes of request bodies held in memory at once, process-wide."""

    __slots__ = ("cap", "held")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held = 0

    def fits(self, n: int) -> bool:
        return self.held + n <= self.cap

    def take(self, n: int) -> None:
        """Count ``n`` more bytes, or raise the 503 that says the router is full."""
        if not self.fits(n):
            raise RouterError(
                503,
                "router_busy",
                "the router holds too many request bodies right now; retry shortly",
                headers={"Retry-After": "1"},
            )
        self.held += n

    def give_back(self, n: int) -> None:
        self.held = max(0, self.held - n)


# request -> bytes it holds from the budget (released when its handler ends)
HELD: web.RequestKey[int] = web.RequestKey("wa_router.body_held", int)


async def read(
    request: web.BaseRequest,
    *,
    cap: int,
    budget: BodyBudget,
    progress: float,
    decoded: bool = True,
) -> bytes:
    """The whole body within every bound; decompressed when ``decoded`` and it
    was sent compressed (the caller then drops ``Content-Encoding``)."""
    length = request.content_length
    if length is not None and length > cap:
        raise RouterError(
            413, "body_too_large", f"request body of {length} bytes exceeds the {cap} byte cap"
        )
    if length:
        _hold(request, budget, length)
    content = request.content
    if length is not None and content.is_eof() and content.exception() is None:
        # All of it came with the head (a small body usually does): no
        # progress timer to arm per chunk.
        raw = content.read_nowait(-1)
    else:
        chunks: list[bytes] = []
        size = 0
        async for chunk in chunks_of(request, progress=progress):
            size += len(chunk)
            if size > cap:
                raise RouterError(413, "body_too_large", f"request body exceeds the {cap} byte cap")
            if length is None:
                _hold(request, budget, len(chunk))
            chunks.append(chunk)
        raw = b"".join(chunks)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if decoded and encoding and encoding != "identity" and raw:
        plain = decode(raw, encoding, cap)
        _hold(request, budget, len(plain))
        return plain
    return raw


def begin(request: web.BaseRequest) -> None:
    """Called before ``read``: the request holds nothing yet. (Set rather than
    looked up with ``request.get``, whose miss costs an exception per request.)"""
    request[HELD] = 0


def _hold(request: web.BaseRequest, budget: BodyBudget, n: int) -> None:
    budget.take(n)
    request[HELD] += n


def release(request: web.BaseRequest, budget: BodyBudget) -> None:
    held = request[HELD]
    if held:
        budget.give_back(held)
        request[HELD] = 0


async def chunks_of(
    request: web.BaseRequest, *, progress: float, cap: int | None = None
) -> AsyncIterator[bytes]:
    """The body as it arrives; 408 when ``progress`` seconds pass without a
    byte, 413 past ``cap`` (for streamed bodies), ``ClientGone`` when the
    client goes away, 400 for a body the HTTP parser refused."""
    size = 0
    while True:
        try:
            async with asyncio.timeout(progress):
                chunk = await request.content.readany()
        except TimeoutError:
            # Answered (408); the server then closes the connection, the body
            # being unread (router.connections: short lingering).
            raise RouterError(
                408, "body_timeout", f"no byte of the request body for {progress:g} s"
            ) from None
        except HttpProcessingError as exc:
            transport = request.transport
            if transport is None or transport.is_closing():
                # Cut off mid-body: the client went away, it did not send garbage.
                raise ClientGone(str(exc)) from None
            raise RouterError(400, "bad_body", f"malformed request body: {exc.message}") from None
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise ClientGone(str(exc)) from None
        if not chunk:
            failure = request.content.exception()
            if failure is not None:
                raise ClientGone(str(failure))
            return
        size += len(chunk)
        if cap is not None and size > cap:
            raise RouterError(413, "body_too_large", f"request body exceeds the {cap} byte cap")
        yield chunk


def decode(raw: bytes, encoding: str, cap: int) -> bytes:
    """``raw`` decompressed (gzip, deflate), at most ``cap`` bytes; else 400 / 415."""
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise RouterError(
            415, "unsupported_encoding", f"cannot read a body with Content-Encoding {encoding!r}"
        )
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(raw, cap + 1)
        if len(out) > cap or d.unconsumed_tail:
            raise RouterError(413, "body_too_large", f"decoded body exceeds the {cap} byte cap")
        out += d.flush()
    except zlib.error:
        raise RouterError(400, "bad_body", f"the body is not valid {encoding}") from None
    if not d.eof:
        raise RouterError(400, "bad_body", f"the {encoding} body is truncated")
    return out


def mime(request: web.BaseRequest) -> str:
    return request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def parse(body: bytes, content_type: str, *, forms: bool) -> dict[str, Any] | None:
    """The body as the upstream's parser reads it: a JSON object, a form
    (``forms``), or None (the upstream sees no fields)."""
    if not body:
        return None
    if content_type in JSON_TYPES:
        try:
            value = json.loads(body)
        except RecursionError:
            raise RouterError(400, "bad_body", "the JSON body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            raise RouterError(400, "bad_body", "the body is not valid JSON") from None
        return value if isinstance(value, dict) else None
    if forms and content_type == FORM_TYPE:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RouterError(400, "bad_body", "the form body is not UTF-8") from None
        fields: dict[str, Any] = {}
        for name, value in parse_qsl(text, keep_blank_values=True):
            # A repeated field is an array to Express's qs, as it is here.
            old = fields.get(name)
            if old is None:
                fields[name] = value
            elif isinstance(old, list):
                old.append(value)
            else:
                fields[name] = [old, value]
        return fields
    return None
