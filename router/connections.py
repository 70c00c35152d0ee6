"""Client connections: bounded in number and in time, and quiet in the logs.

aiohttp's server gives a client as long as it likes to send a request head,
and logs a malformed request at ERROR with a traceback that can carry the raw
bytes (an ``X-Api-Key`` included). ``GuardedServer`` makes its connections
``GuardedHandler``s, which a sweep (every second) holds to ``limits``:

* a request head must arrive within ``header_timeout`` of its first byte;
* a connection with no request in progress closes after ``idle_timeout``
  (also one that never sent a byte);
* at most ``max_client_connections`` are open; a connection beyond that is
  closed at once (one log line a second says so);
* body progress is the request handler's business (``router.body``).

Parse errors and handler failures aiohttp would log become one WARNING line
per kind per minute, with no request bytes. ``raise_nofile_limit`` lifts the
open-file soft limit to the hard one, so the cap, not the kernel, decides.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import HttpVersion10, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from router.config import Limits

log = logging.getLogger(__name__)

_QUIET_FOR = 60.0  # seconds between two log lines of the same kind
LINGER = 2.0


class _Throttle:
    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(kind, -_QUIET_FOR) >= _QUIET_FOR:
            self._last[kind] = now
            return True
        self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
        return False


class GuardedHandler(RequestHandler):
    """One client connection, with what the sweep needs to judge it."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = manager
        self.opened = time.monotonic()
        self.last_seen = self.opened
        # When the first byte of a request head in progress arrived.
        self.head_started: float | None = None
        # Its request line had no HTTP version (the dispatcher answers 400).
        # On the connection, not the request: a request-key lookup that
        # misses raises KeyError inside Mapping, on every request.
        self.obsolete_http = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guard.opened(self, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_seen = now
        if self.head_started is None and not self._request_in_progress:
            self.head_started = now
        super().data_received(data)

    @property
    def busy(self) -> bool:
        return bool(self._request_in_progress)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        kind = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        if self.guard.throttle.allow(kind):
            # Never the request bytes or headers: they may carry a key.
            log.warning(
                "bad request from a client (%s); more of this kind are counted, not logged",
                kind,
            )


class GuardedServer(web.Server):
    def __init__(self, handler: Any, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(
            handler,
            keepalive_timeout=limits.idle_timeout,
            auto_decompress=False,
            # After an answer to a request whose body was not read (a 401
            # before the body, a 413, a 408), read what still comes for this
            # long, so the client sees the answer rather than a reset; then close.
            lingering_time=LINGER,
            **kwargs,
        )
        self.limits = limits
        self.throttle = _Throttle()
        self.handlers: set[GuardedHandler] = set()
        self.refused = 0
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if message.version >= HttpVersion10:
            return super()._make_request(message, payload, protocol, writer, task)
        # aiohttp reads a request line without a version as HTTP/0.9 and would
        # answer with an "HTTP/0.9 200" status line and headers, which is no
        # protocol at all. A request line without a version is malformed in
        # HTTP/1.1 (RFC 9112 section 3): refused (400) in HTTP/1.0, then closed.
        message = message._replace(version=HttpVersion10, should_close=True)
        if isinstance(protocol, GuardedHandler):
            protocol.obsolete_http = True  # should_close: its only request
        return super()._make_request(message, payload, protocol, writer, task)

    # -- bookkeeping ---------------------------------------------------------------------

    def opened(self, handler: GuardedHandler, transport: asyncio.BaseTransport) -> None:
        cap = self.limits.max_client_connections
        if cap and len(self.handlers) >= cap:
            self.refused += 1
            if self.throttle.allow("connection_cap"):
                log.warning(
                    "%d client connections open (limits.max_client_connections): closing new"
                    " ones (%d so far)",
                    len(self.handlers),
                    self.refused,
                )
            transport.close()
            return
        self.handlers.add(handler)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="client-connections"
            )

    def closed(self, handler: GuardedHandler) -> None:
        self.handlers.discard(handler)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().shutdown(timeout)

    # -- the sweep -----------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> int:
        """Close what overstayed; how many."""
        limits = self.limits
        closed = 0
        for handler in list(self.handlers):
            if handler.busy:
                continue
            if handler.head_started is not None:
                late = now - handler.head_started > limits.header_timeout
                why = "request head not complete"
            else:
                late = now - handler.last_seen > limits.idle_timeout
                why = "idle"
            if late:
                closed += 1
                if self.throttle.allow(f"timeout:{why}"):
                    log.warning("closing client connections: %s for too long", why)
                handler.force_close()
                transport = handler.transport
                if transport is not None:
                    transport.close()
                self.handlers.discard(handler)
        return closed


def raise_nofile_limit() -> tuple[int, int]:
    """Lift the open-file soft limit to the hard limit; the (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft, hard
