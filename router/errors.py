"""JSON error answers: every error the router itself produces goes through here.

Each body has ``error`` (a stable machine-readable code), ``message`` (for
people), ``request_id`` and, when known, ``session``. Never a traceback.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"
# A client's own id is kept (logs correlate across systems) only when it is
# short and plain: it is echoed in answers and logs.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_randbits = random.getrandbits


def new_request_id() -> str:
    """``uuid.uuid4().hex`` without the syscall and the UUID object: random bits
    with the version-4 and variant bits set (ids correlate logs, they are not secrets)."""
    n = _randbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48)
    return "%032x" % (n | (0x4000 << 64) | (0x8000 << 48))


def request_id_of(request: web.BaseRequest) -> str:
    """The client's ``X-Request-Id`` when it is a bounded, printable token, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _CLIENT_ID.fullmatch(given):
        return given
    return new_request_id()


class RouterError(Exception):
    """An error with a definite HTTP answer, raised anywhere below the handler."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        session: str | None = None,
        headers: dict[str, str] | None = None,
        request_sent: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        # The upstream may have received (and acted on) the request: an
        # Idempotency-Key repeat must be told so, never sent again.
        self.request_sent = request_sent
        self.status = status
        self.error = error
        self.message = message
        self.session = session
        self.headers = headers or {}
        self.extra = extra


def error_response(exc: RouterError, request_id: str) -> web.Response:
    body: dict[str, Any] = {"error": exc.error, "message": exc.message}
    if exc.session is not None:
        body["session"] = exc.session
    body.update(exc.extra)
    body["request_id"] = request_id
    headers = {REQUEST_ID_HEADER: request_id, **exc.headers}
    return web.Response(
        status=exc.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )
