"""JSON error answers: every error the router itself produces goes through here.

Each body has ``error`` (a stable machine-readable code), ``message`` (for
people), ``request_id`` and, when known, ``session``. Never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"


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
