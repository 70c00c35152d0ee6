"""Small request helpers shared by both dialects: bodies and the echo."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from aiohttp import web

from router.simulator.express import FORM_TYPE, JSON_TYPE, _media_type, qs_parse, v8_loads

# The echo returns at most this much of the body as text (all of it is hashed).
ECHO_BODY_LIMIT = 64 * 1024


async def json_object(request: web.Request) -> dict[str, Any] | None:
    """The request body as a JSON object; ``{}`` when empty, None when not an object."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = v8_loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def parsed_body(request: web.Request) -> dict[str, Any] | None:
    """The body as NestJS (Express body parsers) gives it to a handler.

    JSON only with ``Content-Type: application/json`` (``{}`` when empty,
    None when not a JSON object); form bodies parsed as forms (string values);
    anything else is ``{}``, whatever it contains.
    """
    media = _media_type(request)[0]
    if media == JSON_TYPE:
        return await json_object(request)
    if media == FORM_TYPE:
        raw = await request.read()
        return qs_parse(raw.decode("utf-8", errors="replace"), depth=32, array_limit=100)
    await request.read()
    return {}


def random_hex(nbytes: int = 10) -> str:
    return secrets.token_hex(nbytes).upper()


def joined_headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


async def echo(request: web.Request, instance: str, session: str | None) -> dict[str, Any]:
    """What reached this instance, for router tests.

    The body is streamed, so uploads of any size are hashed (``sha256``,
    ``length``) while only the first ``ECHO_BODY_LIMIT`` bytes come back as text.
    """
    digest = hashlib.sha256()
    head = bytearray()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
        if len(head) < ECHO_BODY_LIMIT:
            head += chunk[: ECHO_BODY_LIMIT - len(head)]
    return {
        "instance": instance,
        "session": session,
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "query": dict(request.query),
        "headers": joined_headers(request),
        "remote": request.remote,
        "body": head.decode("utf-8", errors="replace"),
        "body_truncated": length > len(head),
        "length": length,
        "sha256": digest.hexdigest(),
    }
