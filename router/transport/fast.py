"""A lean HTTP/1.1 keep-alive client for one plain-``http://`` upstream.

Why it stays (issue 12): against aiohttp's client behind the same router it
gives ~2x the throughput at half the CPU per request
(``bench/transport_ab.py``, ``bench/RESULTS.md``), and its errors say
exactly whether a byte of the request left this host, which the replay rules
("never duplicate a send") are built on. The price is that this module owns
HTTP/1.1 framing itself; its scope is written down here and held by
``tests/test_transport_framing.py`` (property tests on real sockets: any
valid answer split at any byte, malformed, truncated, oversized and
unsolicited answers, request-head injection) and ``tests/test_transport.py``.

Built for the proxy's hot path: one ``asyncio.Protocol`` per connection,
responses parsed by ``httptools`` (llhttp, as uvicorn uses, strict mode: no
leniency flag set), the request head built as one string and written with
one ``transport.write``, one future per request (resolved when the headers
are in), and a LIFO pool per instance. A small answer that arrives in one
segment costs one wake-up: its body is already complete when the caller
reads it, and the connection went back to the pool from the protocol
callback.

What it implements of HTTP/1.1
------------------------------

Request (``FastTransport._head``): ``METHOD prefix+path_qs HTTP/1.1``, then
``Host`` (from the base URL), the caller's headers as given (order and
duplicates kept; text encoded UTF-8, ``surrogateescape`` turning
U+DC80-U+DCFF back into raw bytes), then the framing: ``Content-Length`` for
a bytes body (sent with the head, one write up to 16 KiB), ``Content-Length:
0`` for no body on a method other than GET/HEAD/OPTIONS/TRACE (as aiohttp
does), ``Transfer-Encoding: chunked`` for an async iterable (written as it
comes, with back-pressure; empty pieces skipped; no trailers). The head is
refused with ``ValueError`` (nothing sent, no connection taken) when the
method is neither a known one nor a token, the target holds a space, a tab
or a control character, any text holds CR, LF or another control character
but HTAB, or cannot be encoded; so the only CR and LF on the wire are the
CR LF pairs that end its lines. Not checked: header names against the token
grammar, and the framing and ``Host`` headers the caller must not pass
(``router.upstream`` drops them with the other hop-by-hop ones). A request
body answered before it was all sent stops there and its connection closes.

Response: status line ``HTTP/x.y NNN reason`` (any three digits; the reason
is whatever llhttp accepts, any byte but CR and LF, decoded UTF-8 with
``surrogateescape``); headers as a list of (name, value) in order, duplicates
kept (names latin-1, values UTF-8 with ``surrogateescape``, leading
whitespace stripped by llhttp, trailing kept). Body framing, as RFC 9112 6.3
and llhttp decide it: ``Content-Length``; chunked as the final transfer
coding (chunk extensions ignored, trailers parsed and dropped); any other
transfer coding, or neither header, reads until the close. HEAD answers and
204/304 have no body whatever they declare (``content_length`` reports the
declared length; None when chunked or read-until-close). Interim 1xx answers
(``100 Continue``, ``103 Early Hints``), any number, are skipped; a request
never waits for ``100 Continue`` before its body. Bytes pass through
untouched (no decompression).

Connection reuse: the connection goes back to the pool only when llhttp says
keep-alive (HTTP/1.1 without ``Connection: close``, HTTP/1.0 only with
``Connection: keep-alive``), the body was framed (not read-until-close; a
HEAD answer declaring neither length nor chunked also closes) and read to
its end, and the whole request was written. No pipelining: one request per
connection at a time, so any byte after the answer before the next request
is an answer nobody asked for and closes the connection, never handed to the
next request: in the answer's own segment (a new message starting), later on
the idle connection, or found by the pre-reuse ``poll()``. One exception:
after a HEAD answer that declares chunked, bytes in the same segment that
llhttp takes as the start of a chunk size are dropped.

Deliberately not done (``router.transport.make_transport`` gives such
instances the aiohttp transport): TLS (``https://``), credentials in the URL,
HTTP/2, proxies, redirects (a 3xx is returned as is), decompression, cookies,
upgrades (a ``101`` is ``BadResponse``; WebSockets go through
``router.websocket`` on aiohttp).

Limits
------

- Response head: ``_MAX_HEAD`` (64 KiB), counted over everything received
  before the final head's blank line (interim answers included), however it
  is split: beyond it, ``BadResponse`` (llhttp and httptools buffer a head
  without limit; aiohttp's client stops at 8190 bytes per line).
- Bodies: no size limit (``read()`` buffers the whole body; ``iter_chunks()``
  pauses the socket above 1 MiB buffered, resumes below 256 KiB); a
  ``Content-Length`` or chunk size beyond 64 bits is ``BadResponse``.
- Request head: no limit here (Node answers 431 above 16 KiB).
- Time: ``Timeouts.connect`` for a connection (or a free pool slot),
  ``Timeouts.read`` of silence between bytes of the answer; nothing waits
  unbounded.

Errors (classes in ``router.transport.base``)
----------------------------------------------

- ``ConnectFailed``: no connection, or no pool slot in time;
  ``request_sent`` False.
- ``StaleConnection``: a reused connection's first write was refused at once
  (the peer's RST was already in): ``request_sent`` False; retried here.
- ``UpstreamDisconnected``: FIN or RST. ``request_sent``: the write had
  succeeded; ``reused``: the connection had served a request before;
  ``response_started``: a byte of an answer (interim included) had arrived.
  Raised by ``request()`` before the head is in, by ``read()`` /
  ``iter_chunks()`` after it (then ``response_started`` is True): a
  ``Content-Length`` or chunked body cut short is never returned as complete.
- ``UpstreamTimeout``: ``Timeouts.read`` of silence, before or after the head.
- ``BadResponse`` (``request_sent`` True): not a valid HTTP/1.x answer, an
  oversized head, a 101; from ``request()`` when the head is bad, from the
  body readers when the body's framing is (an invalid chunk size).
- ``InstanceDown``: ``abort_in_flight`` released a request nothing came back for.

After any of them, a body released before its end, or an answer that does
not allow reuse, the connection is closed, never pooled.

Pool: at most ``Limits.max_connections_per_instance`` connections (0: no
limit); a request waits up to ``Timeouts.connect`` for one. Idle
connections are closed after ``Timeouts.idle_keepalive`` (below Node's 5 s
``keepAliveTimeout``, so we close first) by a lazy sweep, and never reused
past it. Before a pooled connection is reused it is checked as described in
``router.transport.base`` (no EOF/error seen, zero-timeout ``poll()`` of the
socket shows nothing readable and no hang-up); a connection failing the
check is dropped silently and the next one (or a new one) is used.

Read timeout: ``Timeouts.read`` of silence while waiting for the headers or
for the next piece of the body. One ticker per pool (period ``read / 10``,
at most 1 s) checks the connections with a request in flight, instead of a
timer per request (arming and cancelling a uvloop timer costs ~3 µs, more
than the rest of the request bookkeeping): a stall is noticed between
``read`` and ``read + period`` after the last byte. Paused reading (our own
back-pressure) does not count as silence.

Transparent retry (once, on a *new* connection, only when the body can be
sent again, i.e. bytes or None, or a stream nothing was read from):

- ``StaleConnection``, any method: the request provably did not leave;
- ``UpstreamDisconnected`` on a reused connection before any response byte,
  idempotent methods only (GET, HEAD, OPTIONS, TRACE, PUT, DELETE).

A first-attempt ``ConnectFailed`` is not retried here: the same address was
just refused; failover is the caller's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final, cast

import httptools

from router.transport.base import (
    IDEMPOTENT_METHODS,
    BadResponse,
    Body,
    ConnectFailed,
    HeaderItems,
    InstanceDown,
    StaleConnection,
    Transport,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    header_items,
)

__all__ = ["FastResponse", "FastTransport"]

# Buffered response body above which we stop reading the socket until the
# consumer catches up, and the level at which we read again.
_HIGH_WATER: Final = 1024 * 1024
_LOW_WATER: Final = 256 * 1024
# A body up to this size is appended to the head (one write); larger ones
# go as a second buffer of the same writelines call.
_COALESCE: Final = 16 * 1024
# Response head (status line and header lines up to the blank line, interim
# 1xx answers included) above which the answer is refused: llhttp and
# httptools buffer a head without limit.
_MAX_HEAD: Final = 64 * 1024

# Control characters other than HTAB and CR/LF (those are counted separately).
_CTL_BYTES: Final = bytes([*(c for c in range(32) if c not in (9, 10, 13)), 127])
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
)
# Methods aiohttp sends ``Content-Length: 0`` for when they carry no body.
_NO_BODY_NO_LENGTH: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

_POLL_FLAGS: Final = (
    select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0) | select.POLLERR
)


class FastResponse(UpstreamResponse):
    """Body bytes arrive from the protocol; ``read``/``iter_chunks`` take them."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_exc",
        "_loop",
        "_size",
        "_waiter",
        "_whole",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        conn: _Conn,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        content_length: int | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self._conn: _Conn | None = conn
        self._loop = conn.loop
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._whole = False  # read() wants it all: no back-pressure

    def __repr__(self) -> str:
        return f"<FastResponse {self.status} {self.reason}>"

    # -- fed by the protocol ------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._whole and self._conn is not None:
            # iter_chunks() is behind: stop reading the socket for a while.
            self._conn.pause_for_consumer()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if self._done or self._exc is not None:
            return
        self._exc = exc
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        except BaseException:
            # Cancelled while waiting: nobody will read the rest.
            self.close()
            raise

    def _took(self, n: int) -> None:
        self._size -= n
        conn = self._conn
        if conn is not None and conn.paused_reading and self._size <= _LOW_WATER:
            conn.resume_for_consumer()

    # -- UpstreamResponse -------------------------------------------------------
    async def read(self) -> bytes:
        if not self._done:
            self._whole = True
            conn = self._conn
            if conn is not None and conn.paused_reading:
                conn.resume_for_consumer()
            while not self._done:
                if self._exc is not None:
                    raise self._exc
                await self._wait()
        chunks = self._chunks
        if len(chunks) == 1:
            data = chunks.popleft()
        else:
            data = b"".join(chunks)
            chunks.clear()
        self._size = 0
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        chunks = self._chunks
        while True:
            if chunks:
                data = chunks.popleft()
                self._took(len(data))
                yield data
            elif self._done:
                return
            elif self._exc is not None:
                raise self._exc
            else:
                await self._wait()

    def release(self) -> None:
        conn = self._conn
        if conn is not None:
            # The body is not complete: the connection cannot be reused.
            exc = UpstreamDisconnected(
                "response released before its end", request_sent=True, response_started=True
            )
            self._fail(exc)
            conn.abort(exc)

    def close(self) -> None:
        self.release()


class _Conn(asyncio.Protocol):
    """One upstream connection and the request in flight on it."""

    __slots__ = (
        "body_task",
        "chunked",
        "closed",
        "content_length",
        "drain_waiter",
        "eof_body",
        "head_fut",
        "head_only",
        "head_rx",
        "headers",
        "headers_done",
        "idle_since",
        "interim",
        "keep_alive",
        "last_rx",
        "loop",
        "parser",
        "paused_reading",
        "paused_writing",
        "poller",
        "pool",
        "read_timeout",
        "reason",
        "req_done",
        "resp",
        "reused",
        "rx",
        "sent",
        "transport",
        "waiting_body",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.poller: select.poll | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.paused_reading = False
        self.paused_writing = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_rx = 0.0
        self.read_timeout = pool.read_timeout
        self._reset()

    def _reset(self) -> None:
        self.body_task: asyncio.Task[None] | None = None
        self.head_fut: asyncio.Future[FastResponse] | None = None
        self.resp: FastResponse | None = None
        self.head_only = False
        self.headers_done = False
        self.interim = False
        self.keep_alive = False
        self.eof_body = False
        self.content_length: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunked = False
        self.reason = b""
        self.sent = False
        self.req_done = False
        # The request body's next chunk is awaited from our caller (the
        # client): the silence is theirs, not the upstream's.
        self.waiting_body = False
        self.rx = False
        self.head_rx = 0  # bytes received before the final head was complete

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            poller = select.poll()
            poller.register(sock.fileno(), _POLL_FLAGS)
            self.poller = poller

    def data_received(self, data: bytes) -> None:
        if self.head_fut is None:
            # Bytes on an idle connection: nothing asked for them.
            self.close()
            return
        self.rx = True
        self.last_rx = self.loop.time()
        try:
            if self.headers_done:
                self.parser.feed_data(data)
            else:
                self._feed_head(data)
        except httptools.HttpParserUpgrade:
            self._broken(BadResponse("upstream switched protocols unasked"))
            return
        except httptools.HttpParserError as exc:
            if not (self.head_only and self.headers_done):
                cause = exc.__context__  # raised by one of our callbacks
                if not isinstance(cause, BadResponse):
                    cause = BadResponse(f"invalid HTTP response from upstream: {exc}")
                self._broken(cause)
                return
            # Bytes after a HEAD answer's head that llhttp refused (or an
            # unsolicited answer, on_message_begin): the answer stands, the
            # connection goes.
            self.keep_alive = False
        except BadResponse as exc:  # _feed_head: head too large
            self._broken(exc)
            return
        if self.head_only and self.headers_done and self.resp is not None:
            # A HEAD answer has no body whatever it declares: fresh parser
            # for the next answer on this connection.
            self.parser = httptools.HttpResponseParser(self)
            self._complete()

    def _feed_head(self, data: bytes) -> None:
        """Feed the parser while the final head is not complete: at most
        ``_MAX_HEAD`` bytes of head, then BadResponse (checked before the
        parser buffers more: one read may carry far more than the limit)."""
        room = _MAX_HEAD - self.head_rx
        self.head_rx += len(data)
        if len(data) <= room:
            self.parser.feed_data(data)
        else:
            view = memoryview(data)
            self.parser.feed_data(view[:room])
            if not self.headers_done:
                raise BadResponse(f"response head larger than {_MAX_HEAD} bytes")
            self.parser.feed_data(view[room:])

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.pool.lost(self)
        self._wake_drain()
        self._closed_by_peer(exc)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.headers_done:
            # A second answer after the final one, in the same segment (an
            # answer arriving later on the idle connection is caught in
            # data_received): nothing asked for it. Without this the
            # connection went back to the pool with the parser holding its
            # start, and the next request got it as its answer.
            raise BadResponse("unsolicited response from upstream")

    def on_status(self, data: bytes) -> None:
        self.reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # a trailer (after a chunked body): dropped, never added to headers
        self.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            try:
                self.content_length = int(value)
            except ValueError:
                self.content_length = None
        elif n == 17 and name.lower() == b"transfer-encoding":
            # Chunked only as the final coding (RFC 9112 6.3, as llhttp frames
            # it): "chunked, gzip" is read until the close, not "broken off".
            self.chunked = value.rpartition(b",")[2].strip(b" \t").lower() == b"chunked"

    def on_headers_complete(self) -> None:
        if self.head_fut is None:
            # An answer nobody asked for (the parser stops on this error).
            raise BadResponse("unsolicited response from upstream")
        status = self.parser.get_status_code()
        if status == 101:
            # Never asked for (WebSockets go through aiohttp): without this the
            # caller got the 101 as an answer with an empty body.
            raise BadResponse("upstream switched protocols unasked")
        if status < 200:
            # Interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.interim = True
            self.headers = []
            self.reason = b""
            self.content_length = None
            self.chunked = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        chunked = self.chunked
        self.eof_body = (
            not self.keep_alive
            and self.content_length is None
            and not chunked
            and not self.head_only
            and status not in (204, 304)
        )
        self.headers_done = True
        resp = self.resp = FastResponse(
            self,
            status,
            self.reason.decode("utf-8", "surrogateescape"),
            self.headers,
            None if chunked else self.content_length,
        )
        fut = self.head_fut
        if not fut.done():
            fut.set_result(resp)

    def on_body(self, data: bytes) -> None:
        if self.head_only:
            # A HEAD answer has no body: these bytes came unasked after its
            # head (llhttp reads them as the declared body). The connection
            # must not be reused.
            self.keep_alive = False
            return
        resp = self.resp
        if resp is not None:
            resp._feed(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.head_only:
            self._complete()

    # -- request lifecycle --------------------------------------------------------------
    def usable(self, now: float, keepalive: float) -> bool:
        """May this idle pooled connection carry a request? (the stale check)"""
        if self.closed or now - self.idle_since >= keepalive:
            return False
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        poller = self.poller
        # Anything readable on an idle connection is a FIN, a RST or garbage.
        return poller is None or not poller.poll(0)

    def begin(
        self, head_only: bool, read_timeout: float | None = None
    ) -> asyncio.Future[FastResponse]:
        self._reset()
        self.head_only = head_only
        self.read_timeout = self.pool.read_timeout if read_timeout is None else read_timeout
        fut: asyncio.Future[FastResponse] = self.loop.create_future()
        self.head_fut = fut
        return fut

    def write_first(self, data: bytes, body: bytes | None) -> None:
        """Write the head (and a buffered body); raise if the kernel refused it at once."""
        transport = self.transport
        assert transport is not None
        if body:
            if len(body) <= _COALESCE:
                transport.write(data + body)
            else:
                transport.writelines((data, body))
        else:
            transport.write(data)
        if transport.is_closing():
            # The write failed inside write(): the peer's reset was already
            # here, not a byte of the request left. (asyncio and uvloop both
            # try the send right away on an idle socket and close the
            # transport on EPIPE / ECONNRESET.)
            self.closed = True
            self.pool.lost(self)
            self.head_fut = None
            if self.reused:
                raise StaleConnection("pooled connection was closed by the upstream")
            raise UpstreamDisconnected(
                "upstream closed the new connection before the request", request_sent=False
            )
        self.sent = True
        self.last_rx = self.loop.time()
        self.pool.busy(self)

    def write_more(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def write_chunk(self, chunk: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            if len(chunk) <= _COALESCE:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))

    async def drain(self) -> None:
        if self.paused_writing and not self.closed:
            waiter = self.loop.create_future()
            self.drain_waiter = waiter
            await waiter

    def _complete(self) -> None:
        self.pool.not_busy(self)
        if self.paused_reading:
            # The whole answer is buffered; the connection reads again.
            self.resume_for_consumer()
        resp = self.resp
        keep = self.keep_alive and self.req_done and not self.eof_body
        self.head_fut = None
        self.resp = None
        if resp is not None:
            resp._finish()
        if keep and not self.closed:
            self.reused = True
            self.pool.put(self)
        else:
            self.close()

    def check_timeout(self, now: float) -> None:
        """Called by the pool's ticker while a request is in flight."""
        if self.paused_reading or self.waiting_body:
            # Our consumer is slow, or the body's producer: not the upstream.
            # (A body that never comes ends through its own timeout.)
            self.last_rx = now
            return
        read_timeout = self.read_timeout
        if now - self.last_rx >= read_timeout:
            self._broken(
                UpstreamTimeout(f"no answer within {read_timeout:g} s", request_sent=self.sent)
            )

    def _broken(self, exc: UpstreamError) -> None:
        """Fail the request in flight with ``exc`` and close."""
        self._fail(exc)
        self.close()

    def _fail(self, exc: UpstreamError) -> None:
        self.pool.not_busy(self)
        fut = self.head_fut
        resp = self.resp
        self.head_fut = None
        self.resp = None
        if resp is not None:
            resp._fail(exc)
        elif fut is not None and not fut.done():
            fut.set_exception(exc)
        self._wake_drain()
        self._stop_body()

    def _stop_body(self) -> None:
        """Stop streaming the request body (failed, or answered before it was out)."""
        task = self.body_task
        if task is not None:
            self.body_task = None
            if not task.done() and task is not asyncio.current_task():
                task.cancel()

    def _closed_by_peer(self, exc: Exception | None) -> None:
        if self.head_fut is None and self.resp is None:
            return
        if self.headers_done:
            if self.eof_body and exc is None:
                # Read-until-close body: the close is its end.
                self._complete()
                return
            self._fail(
                UpstreamDisconnected(
                    "upstream broke off its response",
                    request_sent=True,
                    reused=self.reused,
                    response_started=True,
                )
            )
            return
        what = f": {exc!r}" if exc is not None else ""
        self._fail(
            UpstreamDisconnected(
                f"upstream closed the connection before answering{what}",
                request_sent=self.sent,
                reused=self.reused,
                response_started=self.rx,
            )
        )

    def pause_for_consumer(self) -> None:
        transport = self.transport
        if not self.paused_reading and transport is not None and not self.closed:
            self.paused_reading = True
            transport.pause_reading()

    def resume_for_consumer(self) -> None:
        transport = self.transport
        if self.paused_reading and transport is not None and not self.closed:
            self.paused_reading = False
            self.last_rx = self.loop.time()  # the silence was ours
            transport.resume_reading()

    def abort(self, exc: UpstreamError) -> None:
        """Give up on the request in flight (cancelled caller, abandoned body)."""
        self._fail(exc)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.lost(self)
        if self.body_task is not None:
            self._stop_body()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()


class _Pool:
    """Connections to one ``host:port``: idle ones on a LIFO stack."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        idle_keepalive: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_keepalive = idle_keepalive
        self.idle: list[_Conn] = []
        self.open = 0  # connections open or being opened
        # Connections with a request in flight, watched by the read-timeout ticker.
        self.in_flight: set[_Conn] = set()
        self._tick = min(1.0, max(0.005, read_timeout / 10))
        self._ticker: asyncio.TimerHandle | None = None
        self.waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self.closing = False

    def take_idle(self) -> _Conn | None:
        idle = self.idle
        if not idle:
            return None
        now = self.loop.time()
        keepalive = self.idle_keepalive
        while idle:
            conn = idle.pop()
            if conn.usable(now, keepalive):
                return conn
            conn.close()
        return None

    async def acquire(self, fresh: bool = False) -> _Conn:
        """A pooled connection, or a new one (always new when ``fresh``)."""
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn
        if self.limit and self.open >= self.limit:
            conn = await self._wait_for_slot(fresh)
            if conn is not None:
                return conn
        return await self._connect()

    async def _wait_for_slot(self, fresh: bool) -> _Conn | None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                while self.open >= self.limit:
                    if self.idle:
                        if fresh:
                            # Make room: the oldest idle connection goes.
                            self.idle.pop(0).close()
                            continue
                        conn = self.take_idle()
                        if conn is not None:
                            return conn
                        continue
                    waiter = self.loop.create_future()
                    self.waiters.append(waiter)
                    try:
                        await waiter
                    finally:
                        with contextlib.suppress(ValueError):
                            self.waiters.remove(waiter)
        except TimeoutError:
            raise ConnectFailed(
                f"no free connection to {self.host}:{self.port} within "
                f"{self.connect_timeout:g} s ({self.limit} open)",
                timeout=True,
            ) from None
        return None

    async def _connect(self) -> _Conn:
        if self.closing:
            raise ConnectFailed("transport is closed")
        self.open += 1
        conn = _Conn(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(lambda: conn, self.host, self.port)
        except TimeoutError:
            self._unopened(conn)
            raise ConnectFailed(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout:g} s",
                timeout=True,
            ) from None
        except OSError as exc:
            self._unopened(conn)
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            self._unopened(conn)
            raise
        return conn

    def _unopened(self, conn: _Conn) -> None:
        # Counted once: mark it closed before its transport (if any) reports.
        if not conn.closed:
            conn.closed = True
            self.open -= 1
            self._wake_one()
        conn.close()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def put(self, conn: _Conn) -> None:
        if self.closing:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self.waiters:
            self._wake_one()
        if self._sweep is None:
            self._sweep = self.loop.call_at(conn.idle_since + self.idle_keepalive, self._on_sweep)

    def lost(self, conn: _Conn) -> None:
        """``conn`` closed (called once per connection)."""
        self.open -= 1
        if self.waiters:
            self._wake_one()

    def busy(self, conn: _Conn) -> None:
        self.in_flight.add(conn)
        if self._ticker is None:
            self._ticker = self.loop.call_later(self._tick, self._on_tick)

    def not_busy(self, conn: _Conn) -> None:
        self.in_flight.discard(conn)

    def _on_tick(self) -> None:
        self._ticker = None
        if not self.in_flight:
            return
        now = self.loop.time()
        for conn in list(self.in_flight):
            conn.check_timeout(now)
        if self.in_flight:
            self._ticker = self.loop.call_later(self._tick, self._on_tick)

    def _on_sweep(self) -> None:
        self._sweep = None
        idle = self.idle
        now = self.loop.time()
        keepalive = self.idle_keepalive
        # Oldest at the bottom of the stack.
        drop = 0
        for conn in idle:
            if conn.closed or now - conn.idle_since >= keepalive:
                drop += 1
            else:
                break
        if drop:
            expired = idle[:drop]
            del idle[:drop]
            for conn in expired:
                conn.close()
        # Connections closed by the peer further up the stack go too.
        if any(c.closed for c in idle):
            idle[:] = [c for c in idle if not c.closed]
        if idle:
            self._sweep = self.loop.call_at(idle[0].idle_since + keepalive, self._on_sweep)

    def close(self) -> None:
        self.closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class FastTransport(Transport):
    """``Transport`` over ``_Pool`` for one ``http://host:port[/prefix]`` upstream."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        prefix: str = "",
        host_header: str | None = None,
        limit: int = 512,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
        idle_keepalive: float = 4.0,
    ) -> None:
        self._host = host
        self._port = port
        self._prefix = prefix.rstrip("/")
        self._host_header = host_header or (f"{host}:{port}" if port != 80 else host)
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_keepalive = idle_keepalive
        self._pool: _Pool | None = None  # made on first use, inside the running loop

    @property
    def pool(self) -> _Pool:
        pool = self._pool
        if pool is None:
            pool = self._pool = _Pool(
                self._host,
                self._port,
                limit=self._limit,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                idle_keepalive=self._idle_keepalive,
            )
        return pool

    @property
    def idle_connections(self) -> int:
        return len(self._pool.idle) if self._pool is not None else 0

    @property
    def open_connections(self) -> int:
        return self._pool.open if self._pool is not None else 0

    def _head(self, method: str, path_qs: str, headers: HeaderItems, framing: str) -> bytes:
        lines = [f"{k}: {v}\r\n" for k, v in header_items(headers)]
        head = (
            f"{method} {self._prefix}{path_qs} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"{''.join(lines)}{framing}\r\n"
        ).encode("utf-8", "surrogateescape")
        # Request smuggling guard, three C-speed scans: exactly the CR LF pairs
        # we wrote, no other control character, no space in the target.
        crlf = len(lines) + (4 if framing else 3)
        if (
            head.count(b"\n") != crlf
            or head.count(b"\r") != crlf
            or len(head.translate(None, _CTL_BYTES)) != len(head)
            or " " in path_qs
            or "\t" in path_qs  # whitespace too for a lenient parser (RFC 9112 3)
            or (method not in _KNOWN_METHODS and _TOKEN_RE.fullmatch(method) is None)
        ):
            raise ValueError("control character in request method, target or headers")
        return head

    async def request(
        self,
        method: str,
        path_qs: str,
        headers: HeaderItems,
        body: Body = None,
        *,
        read_timeout: float | None = None,
    ) -> UpstreamResponse:
        if body is not None and not isinstance(body, bytes | bytearray | memoryview):
            return await self._request_streamed(method, path_qs, headers, body, read_timeout)
        data = bytes(body) if body is not None else None
        if data is not None:
            framing = f"Content-Length: {len(data)}\r\n"
        elif method in _NO_BODY_NO_LENGTH:
            framing = ""
        else:
            framing = "Content-Length: 0\r\n"
        head = self._head(method, path_qs, headers, framing)
        # The hot path, inlined: a pooled connection, one write, one wait.
        pool = self._pool or self.pool
        conn = pool.take_idle() or await pool.acquire()
        fut = conn.begin(method == "HEAD", read_timeout)
        try:
            _write(conn, head, data, None)
            return await fut
        except UpstreamError as exc:
            if not _retryable(method, exc):
                raise
        except BaseException:
            _abandon(conn, fut)
            raise
        return await self._send(method, head, data, None, read_timeout, fresh=True)

    async def _request_streamed(
        self,
        method: str,
        path_qs: str,
        headers: HeaderItems,
        body: AsyncIterable[bytes],
        read_timeout: float | None,
    ) -> UpstreamResponse:
        head = self._head(method, path_qs, headers, "Transfer-Encoding: chunked\r\n")
        try:
            return await self._send(method, head, None, body, read_timeout)
        except UpstreamError as exc:
            # A stream can go again only when nothing was read from it: the
            # head never left (the body is read only after the head is out).
            if exc.request_sent or not _retryable(method, exc):
                raise
        return await self._send(method, head, None, body, read_timeout, fresh=True)

    async def _send(
        self,
        method: str,
        head: bytes,
        data: bytes | None,
        stream: AsyncIterable[bytes] | None,
        read_timeout: float | None = None,
        *,
        fresh: bool = False,
    ) -> FastResponse:
        conn = await self.pool.acquire(fresh)
        fut = conn.begin(method == "HEAD", read_timeout)
        try:
            _write(conn, head, data, stream)
            return await fut
        except UpstreamError:
            raise
        except BaseException:
            _abandon(conn, fut)
            raise

    def stalled(self, silent_for: float) -> int:
        pool = self._pool
        if pool is None:
            return 0
        now = pool.loop.time()
        return sum(1 for c in pool.in_flight if not c.rx and now - c.last_rx >= silent_for)

    def abort_in_flight(self, reason: str) -> int:
        pool = self._pool
        if pool is None:
            return 0
        silent = [c for c in pool.in_flight if not c.rx]
        for conn in silent:
            conn._broken(InstanceDown(reason, request_sent=conn.sent, reused=conn.reused))
        return len(silent)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def _write(
    conn: _Conn, head: bytes, data: bytes | None, stream: AsyncIterable[bytes] | None
) -> None:
    """Write the request on ``conn`` (after ``conn.begin``); a stream goes on in a task."""
    conn.write_first(head, data)  # raises StaleConnection / UpstreamDisconnected
    if stream is None:
        conn.req_done = True
    else:
        conn.body_task = asyncio.ensure_future(_stream_body(conn, stream))


def _abandon(conn: _Conn, fut: asyncio.Future[FastResponse]) -> None:
    # Cancelled (the client went away) or a bug: the connection is in an
    # unknown state, never reuse it.
    if not fut.done():
        fut.cancel()
    conn.abort(UpstreamDisconnected("request abandoned", request_sent=conn.sent))


def _retryable(method: str, exc: UpstreamError) -> bool:
    if isinstance(exc, StaleConnection):
        return True
    return (
        isinstance(exc, UpstreamDisconnected)
        and exc.reused
        and not exc.response_started
        and method in IDEMPOTENT_METHODS
    )


async def _stream_body(conn: _Conn, stream: AsyncIterable[bytes]) -> None:
    """Write ``stream`` chunked, with back-pressure; mark the request done."""
    chunks = aiter(stream)
    try:
        while True:
            conn.waiting_body = True
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            finally:
                conn.waiting_body = False
            if conn.closed:
                return
            if chunk:
                conn.write_chunk(chunk)
                await conn.drain()
        if conn.closed:
            # Failed, or answered before the body was out (an upstream that
            # did not wait for it): that connection was closed, not reused.
            return
        conn.write_more(b"0\r\n\r\n")
        conn.req_done = True
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        conn.abort(UpstreamDisconnected(f"request body stream failed: {exc!r}", request_sent=True))
