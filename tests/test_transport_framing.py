"""HTTP/1.1 framing of ``router.transport.fast`` (issue 12): property tests on real sockets.

A scripted server on 127.0.0.1 writes raw response bytes generated here,
split at arbitrary byte boundaries (a drain and a few loop turns between
pieces, so each piece is a separate segment and a separate
``data_received``), and the ``FastTransport`` must hand back exactly the
status, reason, headers (in order, duplicates kept) and body that were
framed, and reuse the connection exactly when ``Connection`` and the
framing allow it (counted as server accepts). Malformed, truncated,
oversized and unsolicited responses must end in the documented
``UpstreamError`` with the documented flags, never as a complete answer,
never on a reused broken connection, never hanging. On the request side,
``_head`` must refuse header and target injection and never put a bare CR
or LF on the wire (checked on what the server receives, parsed by llhttp).

Each example runs in a fresh loop, asyncio's or uvloop's (drawn), under a
time bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import httptools
import pytest
import uvloop
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from router.transport import (
    BadResponse,
    FastTransport,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
)
from router.transport import fast as fast_mod

BOUND = 10.0  # no example may take longer: "never hangs"
SPIN = 3  # loop turns after each piece: the client reads it before the next one comes

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,
    "uvloop": uvloop.new_event_loop,
}
loops = st.sampled_from(sorted(LOOPS))

SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run(loop: str, coro: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND):
            await coro()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(bounded())


# -- a scripted server ------------------------------------------------------------------


@dataclass
class Answer:
    """Raw bytes written as pieces cut at ``cuts``; then close (FIN) or keep open."""

    data: bytes
    cuts: list[int] = field(default_factory=list)
    close: bool = False
    # Written once the client has read the answer (bytes on an idle connection).
    later: bytes = b""


FOLLOW = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfollow"


@dataclass
class Received:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _RequestParser:
    """llhttp in request mode (strict): what the upstream would understand."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: deque[Received] = deque()
        self._new()

    def _new(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.done.append(Received(method, self.target, self.headers, bytes(self.body)))
        self._new()


class Server:
    def __init__(self, answers: list[Answer] | None = None) -> None:
        self.answers: deque[Answer] = deque(answers or [])
        self.accepts = 0
        self.requests: list[Received] = []
        self.raw: list[bytes] = []  # everything received, per connection
        self.bad_request = False  # a request llhttp could not parse
        self.read_the_answer = asyncio.Event()  # set by the test: send ``later`` now
        self.later_sent = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def transport(self, **kw: Any) -> FastTransport:
        kw.setdefault("read_timeout", 3.0)
        return FastTransport(self.host, self.port, connect_timeout=2.0, **kw)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        index = len(self.raw)
        self.raw.append(b"")
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parser = _RequestParser()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                self.raw[index] += data
                try:
                    parser.parser.feed_data(data)
                except httptools.HttpParserError:
                    self.bad_request = True
                    return
                while parser.done:
                    req = parser.done.popleft()
                    self.requests.append(req)
                    if not self.answers:
                        return
                    answer = self.answers.popleft()
                    await self._write(writer, answer)
                    if answer.later:
                        await self.read_the_answer.wait()
                        writer.write(answer.later)
                        await writer.drain()
                        self.later_sent.set()
                    if answer.close:
                        return
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, answer: Answer) -> None:
        pos = 0
        for cut in [*answer.cuts, len(answer.data)]:
            if cut > pos:
                writer.write(answer.data[pos:cut])
                await writer.drain()
                for _ in range(SPIN):
                    await asyncio.sleep(0)
            pos = cut


@contextlib.contextmanager
def segments() -> Iterator[list[int]]:
    """Sizes of what ``_Conn.data_received`` got (to check the split reached it)."""
    sizes: list[int] = []
    original = fast_mod._Conn.data_received

    def spy(self: fast_mod._Conn, data: bytes) -> None:
        sizes.append(len(data))
        original(self, data)

    with mock.patch.object(fast_mod._Conn, "data_received", spy):
        yield sizes


# -- generated valid responses ----------------------------------------------------------

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Headers that drive framing or upgrades: placed by the generator itself.
RESERVED = {"content-length", "transfer-encoding", "connection", "proxy-connection", "upgrade"}
# field-value bytes (RFC 9110 5.5): VCHAR, obs-text, SP and HTAB inside.
VALUE_BYTES = bytes([9, 32, *range(0x21, 0x7F), *range(0x80, 0x100)])
REASON_BYTES = VALUE_BYTES
NOT_SENT = RESERVED | {"host"}  # request headers the transport itself writes

header_names = st.one_of(
    st.sampled_from(["X-Dup", "x-dup", "Set-Cookie", "ETag", "Content-Type"]),
    st.text(TOKEN, min_size=1, max_size=16),
).filter(lambda n: n.lower() not in RESERVED)
short_values = st.lists(st.sampled_from(VALUE_BYTES), max_size=40).map(
    lambda b: bytes(b).strip(b" \t")
)
header_values = st.one_of(short_values, st.integers(500, 4000).map(lambda n: b"v" * n))


@dataclass
class Generated:
    """One valid HTTP/1.x response and what the transport must make of it."""

    raw: bytes
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    content_length: int | None
    keep: bool  # the connection may carry the next request
    server_closes: bool
    head: bool  # the answer to a HEAD request
    kind: str = "length"  # length, chunked, eof, none (HEAD), 204, 304
    head_len: int = 0  # where the final answer's head ends in ``raw``


def _line(name: str, value: bytes) -> bytes:
    return name.encode() + b": " + value + b"\r\n"


@st.composite
def responses(
    draw: st.DrawFn,
    *,
    head: bool | None = None,
    kind: str | None = None,
    small: bool = False,
    trailers: bool | None = None,
    coded: bool = False,
) -> Generated:
    if head is None:
        head = draw(st.booleans())
    versions = ["1.1"] if kind == "chunked" else ["1.1", "1.1", "1.1", "1.0"]
    version = draw(st.sampled_from(versions))
    if kind is None:
        if head:
            kinds = ["length", "none"] if version == "1.0" else ["length", "chunked", "none"]
        else:
            kinds = ["length", "eof", "204", "304"]
            if version == "1.1":
                kinds.append("chunked")
        kind = draw(st.sampled_from(kinds))
    if kind == "204":
        status = 204
    elif kind == "304":
        status = 304
    else:
        status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    reason = bytes(draw(st.lists(st.sampled_from(REASON_BYTES), max_size=24)))
    values = short_values if small else header_values
    headers = draw(st.lists(st.tuples(header_names, values), max_size=3 if small else 8))

    body_size = 100 if small else 3000
    body = b"" if head or kind in ("204", "304") else draw(st.binary(max_size=body_size))
    framing: list[tuple[str, bytes]] = []
    content_length: int | None = None
    chunked_body = b""
    if kind == "length" or (kind == "304" and draw(st.booleans())):
        declared = draw(st.integers(0, 10**9)) if head or kind == "304" else len(body)
        name = draw(st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH"]))
        framing.append((name, str(declared).encode()))
        content_length = declared
    elif kind == "chunked":
        te = draw(st.sampled_from(["Transfer-Encoding", "transfer-encoding"]))
        codings = [b"gzip, chunked", b"deflate,chunked"]
        if not coded:
            codings += [b"chunked", b"chunked", b"Chunked"]
        framing.append((te, draw(st.sampled_from(codings))))
        if not head:
            cuts = []
            if len(body) > 1:
                cuts = sorted(draw(st.sets(st.integers(1, len(body) - 1), max_size=12)))
            parts, pos = [], 0
            for cut in [*cuts, len(body)]:
                if cut > pos:
                    parts.append(body[pos:cut])
                    pos = cut
            for part in parts:
                size = (b"%X" if draw(st.booleans()) else b"%x") % len(part)
                ext = draw(st.sampled_from([b"", b"", b";ext", b';ext="v"']))
                chunked_body += size + ext + b"\r\n" + part + b"\r\n"
            chunked_body += b"0\r\n"
            trailer_lines = st.lists(
                st.tuples(header_names, values),
                min_size=1 if trailers else 0,
                max_size=0 if trailers is False else 2,
            )
            for name, value in draw(trailer_lines):
                chunked_body += _line(name, value)  # trailers
            chunked_body += b"\r\n"
    elif kind == "eof" and version == "1.1" and (coded or draw(st.booleans())):
        # A coding other than chunked last: read until the close too.
        framing.append(("Transfer-Encoding", draw(st.sampled_from([b"gzip", b"chunked, gzip"]))))
    connection = draw(st.sampled_from([None, "close", "keep-alive"]))
    if connection is not None:
        framing.append(("Connection", connection.encode()))
    for item in framing:
        headers.insert(draw(st.integers(0, len(headers))), item)

    if not reason and draw(st.booleans()):
        status_line = b"HTTP/%s %d\r\n" % (version.encode(), status)
    else:
        status_line = b"HTTP/%s %d %s\r\n" % (version.encode(), status, reason)
    interim = b""
    if version == "1.1":
        for _ in range(draw(st.integers(0, 2))):
            interim += draw(
                st.sampled_from(
                    [
                        b"HTTP/1.1 100 Continue\r\n\r\n",
                        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
                    ]
                )
            )
    head_bytes = interim + status_line + b"".join(_line(n, v) for n, v in headers) + b"\r\n"
    raw = head_bytes + (chunked_body if kind == "chunked" else body)

    keep = connection != "close" and (version == "1.1" or connection == "keep-alive")
    if kind == "eof" or (head and kind == "none"):
        keep = False  # the end of the body is the close (llhttp: HEAD included)
    return Generated(
        raw=raw,
        status=status,
        reason=reason.decode("utf-8", "surrogateescape"),
        headers=[(n, v.decode("utf-8", "surrogateescape")) for n, v in headers],
        body=body,
        content_length=content_length,
        keep=keep,
        server_closes=kind == "eof" or (not keep and draw(st.booleans())),
        head=head,
        kind=kind,
        head_len=len(head_bytes),
    )


def cut_points(raw: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=40, unique=True).map(sorted)


async def exchange(server: Server, t: FastTransport, gen: Generated) -> None:
    """The generated answer, then a follow-up: accepts say whether it was reused."""
    resp = await t.request("HEAD" if gen.head else "GET", "/first", [])
    try:
        assert (resp.status, resp.reason) == (gen.status, gen.reason)
        assert resp.headers == gen.headers
        assert resp.content_length == gen.content_length
        assert await resp.read() == gen.body
        # Read-until-close: complete only once the FIN is in.
        assert t.idle_connections == (1 if gen.keep else 0)
    finally:
        resp.release()
    resp = await t.request("GET", "/second", [])
    assert await resp.read() == b"follow"
    assert server.accepts == (1 if gen.keep else 2)
    assert [r.target for r in server.requests] == [b"/first", b"/second"]


# -- valid responses, split anywhere ----------------------------------------------------


KINDS = [
    pytest.param(head, kind, id=f"{'HEAD' if head else 'GET'}-{kind}")
    for head, kind in [
        (False, "length"),
        (False, "chunked"),
        (False, "eof"),
        (False, "204"),
        (False, "304"),
        (True, "length"),
        (True, "chunked"),
        (True, "none"),
    ]
]


def split_run(gen: Generated, cuts: list[int], loop: str) -> None:
    async def main() -> None:
        answers = [Answer(gen.raw, cuts, close=gen.server_closes), Answer(FOLLOW)]
        async with Server(answers) as server:
            t = server.transport()
            try:
                await exchange(server, t, gen)
            finally:
                await t.close()

    run(loop, main)


@pytest.mark.parametrize("head,kind", KINDS)
@settings(SETTINGS, max_examples=20)
@given(data=st.data(), loop=loops)
def test_valid_response_split_anywhere_is_returned_exactly(
    head: bool, kind: str, data: st.DataObject, loop: str
) -> None:
    gen = data.draw(responses(head=head, kind=kind), label="gen")
    event(f"{gen.kind} {'HEAD' if gen.head else 'GET'} {'keep' if gen.keep else 'close'}")
    split_run(gen, data.draw(cut_points(gen.raw), label="cuts"), loop)


@settings(SETTINGS, max_examples=15)
@given(gen=responses(head=False, kind="chunked", trailers=True), data=st.data(), loop=loops)
# Regression: trailers were appended to the response's headers after it was returned.
@example(
    gen=Generated(
        raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n0\r\nX-Trailer: t\r\n\r\n",
        status=200,
        reason="OK",
        headers=[("Transfer-Encoding", "chunked")],
        body=b"ab",
        content_length=None,
        keep=True,
        server_closes=False,
        head=False,
        kind="chunked",
        head_len=47,
    ),
    data=None,
    loop="uvloop",
)
def test_chunked_trailers_are_read_and_dropped(
    gen: Generated, data: st.DataObject | None, loop: str
) -> None:
    split_run(gen, data.draw(cut_points(gen.raw)) if data is not None else [], loop)


@pytest.mark.parametrize("head,kind", KINDS)
@settings(SETTINGS, max_examples=4)
@given(data=st.data(), loop=loops)
def test_valid_response_one_byte_per_segment(
    head: bool, kind: str, data: st.DataObject, loop: str
) -> None:
    gen = data.draw(responses(head=head, kind=kind, small=True), label="gen")
    cuts = list(range(1, len(gen.raw)))

    async def main() -> None:
        answers = [Answer(gen.raw, cuts, close=gen.server_closes), Answer(FOLLOW)]
        async with Server(answers) as server:
            t = server.transport()
            try:
                with segments() as sizes:
                    await exchange(server, t, gen)
                # The split reached the parser: (nearly) one byte per data_received.
                assert sum(sizes) == len(gen.raw) + len(FOLLOW)
                assert sizes.count(1) >= 0.9 * len(gen.raw)
            finally:
                await t.close()

    run(loop, main)


@settings(SETTINGS, max_examples=20)
@given(
    gen=st.sampled_from(["chunked", "eof"]).flatmap(
        lambda kind: responses(head=False, kind=kind, coded=True)
    ),
    data=st.data(),
    loop=loops,
)
# Regression: "chunked, gzip" was taken for chunked framing, its close for a break.
@example(
    gen=Generated(
        raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
        status=200,
        reason="OK",
        headers=[("Transfer-Encoding", "chunked, gzip")],
        body=b"abc",
        content_length=None,
        keep=False,
        server_closes=True,
        head=False,
        kind="eof",
        head_len=55,
    ),
    data=None,
    loop="asyncio",
)
def test_final_transfer_coding_decides_the_framing(
    gen: Generated, data: st.DataObject | None, loop: str
) -> None:
    split_run(gen, data.draw(cut_points(gen.raw)) if data is not None else [], loop)


# -- malformed, truncated, oversized -------------------------------------------------------


async def expect_failure(
    server: Server,
    t: FastTransport,
    cls: type[UpstreamError],
    *,
    at_read: bool | None,
    response_started: bool | None = None,
    method: str = "GET",
) -> UpstreamError:
    """The first request fails with ``cls`` (at ``request()`` or at ``read()``; None:
    either), then a follow-up goes on a *new* connection."""
    exc: UpstreamError | None = None
    try:
        resp = await t.request(method, "/first", [])
    except UpstreamError as e:
        assert at_read is not True, f"failed at request(): {e!r}"
        exc = e
    else:
        assert at_read is not False, "a response came back"
        try:
            body = await resp.read()
        except UpstreamError as e:
            exc = e
        else:
            raise AssertionError(f"returned as complete: {resp.status} {body[:50]!r}")
        finally:
            resp.release()
    assert isinstance(exc, cls), repr(exc)
    assert exc.request_sent and not exc.replay_safe
    if response_started is not None:
        assert isinstance(exc, UpstreamDisconnected)
        assert exc.response_started == response_started
    assert t.idle_connections == 0
    resp = await t.request("GET", "/second", [])
    assert await resp.read() == b"follow"
    assert server.accepts == 2  # never on the broken connection
    return exc


@st.composite
def truncated(draw: st.DrawFn) -> tuple[Generated, int]:
    """A valid answer whose end is not the close, cut short at any byte."""
    gen = draw(responses(head=False).filter(lambda g: g.kind != "eof"))
    return gen, draw(st.integers(0, len(gen.raw) - 1))


@settings(SETTINGS, max_examples=60)
@given(case=truncated(), data=st.data(), loop=loops)
def test_truncated_response_is_never_complete(
    case: tuple[Generated, int], data: st.DataObject, loop: str
) -> None:
    """Content-Length or chunked body (or the head) cut short by a FIN: the
    error says whether a byte of the answer had come; nothing partial passes."""
    gen, cut = case
    raw = gen.raw[:cut]
    cuts = data.draw(cut_points(raw)) if raw else []

    async def main() -> None:
        async with Server([Answer(raw, cuts, close=True), Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                await expect_failure(
                    server,
                    t,
                    UpstreamDisconnected,
                    at_read=cut >= gen.head_len,
                    response_started=cut > 0,
                )
            finally:
                await t.close()

    run(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(
    "raw",
    [
        # Regression: a 101 was returned as an answer with an empty body.
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\nxx",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: v\r\n\tfolded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : v\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: v\rContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: v\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=[
        "101-upgrade",
        "101-bare",
        "two-lengths",
        "length-and-chunked",
        "negative-length",
        "bad-length",
        "length-overflow",
        "obs-fold",
        "space-before-colon",
        "bare-cr",
        "empty-name",
    ],
)
def test_protocol_violations_are_bad_response(raw: bytes, loop: str) -> None:
    async def main() -> None:
        async with Server([Answer(raw), Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                await expect_failure(server, t, BadResponse, at_read=False)
            finally:
                await t.close()

    run(loop, main)


GARBAGE_STARTS = [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x16\x03\x01\x02\x00\x01", b"<html>", b"\x00"]


@settings(SETTINGS, max_examples=40)
@given(
    garbage=st.one_of(
        st.sampled_from(GARBAGE_STARTS),
        st.binary(min_size=1, max_size=64).filter(
            # Not a start llhttp would wait on, nor the blank lines it skips.
            lambda b: (
                b[0] not in b"\r\n"
                and not any(p.startswith(b[: len(p)]) for p in (b"HTTP/", b"RTSP/", b"ICE/"))
            )
        ),
        # A broken status line after a valid start.
        st.sampled_from(
            [
                b"HTTP/1.1 2OO OK\r\n\r\n",
                b"HTTP/1.1 20 OK\r\n\r\n",
                b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
                b"HTTP/1.1  200 OK\r\n\r\n",
                b"HTTP/x.1 200 OK\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nX-A: v\r\n  folded\r\nContent-Length: 0\r\n\r\n",
            ]
        ),
    ),
    data=st.data(),
    loop=loops,
)
def test_garbage_status_line_is_bad_response(
    garbage: bytes, data: st.DataObject, loop: str
) -> None:
    cuts = data.draw(cut_points(garbage))

    async def main() -> None:
        # The server keeps the connection open: only the transport can end it.
        async with Server([Answer(garbage, cuts), Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                await expect_failure(server, t, BadResponse, at_read=False)
            finally:
                await t.close()

    run(loop, main)


CTL_BYTES = bytes([*range(0, 9), *range(11, 13), *range(14, 32), 127])
NAME_BREAKERS = CTL_BYTES + b' \t"(),/;<=>?@[\\]{}'


@st.composite
def invalid_header_bytes(draw: st.DrawFn) -> bytes:
    """A valid head with one byte llhttp must refuse in a header name or value."""
    name = draw(st.text(TOKEN, min_size=1, max_size=10)).encode()
    value = draw(st.lists(st.sampled_from(VALUE_BYTES), max_size=20).map(bytes))
    value = b"v" + value.strip(b" \t") + b"v"
    if draw(st.booleans()):
        at = draw(st.integers(0, len(name)))
        name = name[:at] + bytes([draw(st.sampled_from(NAME_BREAKERS))]) + name[at:]
    else:
        at = draw(st.integers(1, len(value) - 1))
        value = value[:at] + bytes([draw(st.sampled_from(CTL_BYTES))]) + value[at:]
    line = name + b": " + value + b"\r\n"
    return b"HTTP/1.1 200 OK\r\nX-Ok: 1\r\n" + line + b"Content-Length: 0\r\n\r\n"


@settings(SETTINGS, max_examples=40)
@given(raw=invalid_header_bytes(), data=st.data(), loop=loops)
def test_invalid_header_bytes_are_bad_response(raw: bytes, data: st.DataObject, loop: str) -> None:
    cuts = data.draw(cut_points(raw))

    async def main() -> None:
        async with Server([Answer(raw, cuts), Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                await expect_failure(server, t, BadResponse, at_read=False)
            finally:
                await t.close()

    run(loop, main)


@settings(SETTINGS, max_examples=30)
@given(
    size=st.one_of(
        st.text("ghijklmnopqrstuvwxyzGXZ-+!@ ", min_size=1, max_size=4),
        st.just("1" * 20),  # overflow
    ),
    good=st.integers(0, 2),
    data=st.data(),
    loop=loops,
)
def test_invalid_chunk_size_fails_the_body(
    size: str, good: int, data: st.DataObject, loop: str
) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3\r\nabc\r\n" * good
        + size.encode()
        + b"\r\nxyz\r\n0\r\n\r\n"
    )
    cuts = data.draw(cut_points(raw))

    async def main() -> None:
        async with Server([Answer(raw, cuts), Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                await expect_failure(server, t, BadResponse, at_read=True)
            finally:
                await t.close()

    run(loop, main)


def _oversized_head(n: int, shape: str) -> bytes:
    """A response head of exactly ``n`` bytes (blank line included)."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    room = n - len(start) - 2
    if shape == "one line":
        lines = b"X-Big: " + b"a" * (room - 9) + b"\r\n"
    elif shape == "many lines":
        lines = b""
        while room - len(lines) >= 23:
            lines += b"X-%06d: %06d\r\n" % (len(lines), len(lines))
        lines += b"X: " + b"b" * (room - len(lines) - 5) + b"\r\n"
    else:  # half of it a reason phrase
        start = b"HTTP/1.1 200 " + b"R" * (room // 2) + b"\r\nContent-Length: 2\r\n"
        lines = b"X-Pad: " + b"p" * (n - len(start) - 2 - 9) + b"\r\n"
    head = start + lines + b"\r\n"
    assert len(head) == n, (len(head), n)
    return head


@settings(SETTINGS, max_examples=30)
@given(
    over=st.integers(1, 200_000),
    shape=st.sampled_from(["one line", "many lines", "reason"]),
    pieces=st.integers(1, 40),
    loop=loops,
)
# Regression: no limit at all (a 10 MB header line, 100,000 headers were accepted).
@example(over=1, shape="one line", pieces=1, loop="asyncio")
@example(over=1, shape="many lines", pieces=1, loop="uvloop")
def test_oversized_head_is_bad_response(over: int, shape: str, pieces: int, loop: str) -> None:
    """A head over ``_MAX_HEAD`` (all of it before the blank line, interim
    answers included) is refused however it arrives; one at the limit passes."""
    limit = fast_mod._MAX_HEAD
    raw = _oversized_head(limit + over, shape) + b"ok"
    step = max(1, len(raw) // pieces)
    cuts = list(range(step, len(raw), step))

    async def main() -> None:
        async with Server([Answer(raw, cuts), Answer(FOLLOW), Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                await expect_failure(server, t, BadResponse, at_read=False)
            finally:
                await t.close()

    run(loop, main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_head_at_the_limit_passes(loop: str) -> None:
    limit = fast_mod._MAX_HEAD
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    raw = interim + _oversized_head(limit - len(interim), "many lines") + b"ok"

    async def main() -> None:
        async with Server([Answer(raw), Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                resp = await t.request("GET", "/", [])
                assert await resp.read() == b"ok"
                resp = await t.request("GET", "/", [])
                assert await resp.read() == b"follow"
                assert server.accepts == 1
            finally:
                await t.close()

    run(loop, main)


# -- bytes nobody asked for -------------------------------------------------------------------


UNSOLICITED = st.one_of(
    st.sampled_from(
        [
            FOLLOW,  # a whole second answer
            b"HTTP/1.1 200 OK\r\nContent-Len",  # the start of one
            b"H",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
        ]
    ),
    st.binary(min_size=1, max_size=40).filter(lambda b: b[0] not in b"\r\n"),
)


def _llhttp_absorbs(head: bytes, extra: bytes) -> bool:
    """Would llhttp take ``extra`` after this HEAD answer's head without a
    body byte, a new message or an error (the chunk-size digits case)?"""

    class Watch:
        head_done = False  # the final (not interim) head
        seen = False

        def on_headers_complete(self) -> None:
            self.head_done = parser.get_status_code() >= 200

        def on_message_begin(self) -> None:
            self.seen = self.seen or self.head_done

        def on_body(self, body: bytes) -> None:
            self.seen = True

    watch = Watch()
    parser = httptools.HttpResponseParser(watch)
    try:
        parser.feed_data(head + extra)
    except httptools.HttpParserError:
        return False
    return not watch.seen


@settings(SETTINGS, max_examples=60)
@given(
    gen=responses().filter(lambda g: g.keep),
    extra=UNSOLICITED,
    same_segment=st.booleans(),
    loop=loops,
)
# Regression: a partial second answer in the same segment was kept for the next request.
@example(
    gen=Generated(
        raw=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        status=200,
        reason="OK",
        headers=[("Content-Length", "5")],
        body=b"first",
        content_length=5,
        keep=True,
        server_closes=False,
        head=False,
    ),
    extra=b"HTTP/1.1 200 OK\r\nContent-Len",
    same_segment=True,
    loop="asyncio",
)
# Regression: bytes after a HEAD answer's head were eaten as a body, the connection reused.
@example(
    gen=Generated(
        raw=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        status=200,
        reason="OK",
        headers=[("Content-Length", "5")],
        body=b"",
        content_length=5,
        keep=True,
        server_closes=False,
        head=True,
    ),
    extra=b"stale",
    same_segment=True,
    loop="uvloop",
)
@example(  # the documented exception: "A" is read as the start of a chunk size
    gen=Generated(
        raw=b"HTTP/1.1 200 \r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        status=200,
        reason="",
        headers=[("Transfer-Encoding", "gzip, chunked")],
        body=b"",
        content_length=None,
        keep=True,
        server_closes=False,
        head=True,
        kind="chunked",
        head_len=51,
    ),
    extra=b"A",
    same_segment=True,
    loop="asyncio",
)
def test_unsolicited_bytes_never_answer_the_next_request(
    gen: Generated, extra: bytes, same_segment: bool, loop: str
) -> None:
    """Bytes after a complete answer, before the next request was written (in
    the answer's own segment, or later on the idle connection): the answer
    stands, the connection is never reused, the next request gets its own.
    (One documented exception: after a HEAD answer declaring chunked, what
    llhttp takes as the start of a chunk size is dropped silently.)"""
    absorbed = same_segment and gen.head and _llhttp_absorbs(gen.raw, extra)

    async def main() -> None:
        first = Answer(gen.raw + extra) if same_segment else Answer(gen.raw, later=extra)
        async with Server([first, Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                resp = await t.request("HEAD" if gen.head else "GET", "/first", [])
                assert resp.status == gen.status and resp.headers == gen.headers
                assert await resp.read() == gen.body
                resp.release()
                server.read_the_answer.set()
                if not same_segment:
                    await server.later_sent.wait()
                # Whether or not the loop has read them yet: never reused.
                resp = await t.request("POST", "/second", [], b"{}")
                assert resp.status == 200 and await resp.read() == b"follow"
                assert server.accepts == (1 if absorbed else 2)
                assert [r.target for r in server.requests] == [b"/first", b"/second"]
            finally:
                await t.close()

    run(loop, main)


# -- the request head ----------------------------------------------------------------------

NASTY = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from(
        # Lone surrogates: an escaped byte (DC80-DCFF) or not encodable at all.
        [*"\r\n\x00\x7f\t :é\u2028\x85\U0001f600", "\udc80", "\udcff", "\ud800", "\udc0a"]
    ),
)
nasty_text = st.text(NASTY, max_size=20)
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]),
    st.text(TOKEN, min_size=1, max_size=8),
    nasty_text,
)
paths = st.one_of(st.just("/"), nasty_text.map(lambda s: "/" + s))
FRAMINGS = ["", "Content-Length: 0\r\n", "Content-Length: 12\r\n", "Transfer-Encoding: chunked\r\n"]


def _must_refuse(method: str, path: str, headers: list[tuple[str, str]]) -> bool:
    """The documented rule, independently: any CR, LF or other control character
    (HTAB only inside values and names), whitespace in the target, a method that
    is not a token, text that cannot be encoded."""
    texts = [method, path, *(s for h in headers for s in h)]
    for text in texts:
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return True
        if any((b < 32 and b != 9) or b == 127 for b in data):
            return True
    if any(c in path for c in " \t"):
        return True
    return not method or any(c not in TOKEN for c in method)


@settings(max_examples=400, deadline=None)
@given(
    method=methods,
    path=paths,
    headers=st.lists(st.tuples(nasty_text, nasty_text), max_size=6),
    framing=st.sampled_from(FRAMINGS),
)
# Regression: a tab in the target went out (a separator for a lenient parser).
@example(method="GET", path="/a\tb", headers=[], framing="")
def test_head_refuses_injection_and_never_writes_a_bare_cr_or_lf(
    method: str, path: str, headers: list[tuple[str, str]], framing: str
) -> None:
    t = FastTransport("127.0.0.1", 8080)
    refuse = _must_refuse(method, path, headers)
    try:
        head = t._head(method, path, headers, framing)
    except ValueError:
        event("refused")
        assert refuse
        return
    event("accepted")
    assert not refuse
    lines = head.split(b"\r\n")
    assert lines[-2:] == [b"", b""]
    assert not any(b"\r" in ln or b"\n" in ln for ln in lines)
    assert not any((b < 32 and b not in (9, 10, 13)) or b == 127 for b in head)
    expected = [
        f"{method} {path} HTTP/1.1".encode("utf-8", "surrogateescape"),
        b"Host: 127.0.0.1:8080",
        *(f"{n}: {v}".encode("utf-8", "surrogateescape") for n, v in headers),
    ]
    if framing:
        expected.append(framing[:-2].encode())
    assert lines[:-2] == expected


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


fine_values = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]) | st.sampled_from(["\t", " "]),
    max_size=30,
).map(lambda s: s.strip(" \t"))


@settings(SETTINGS, max_examples=60)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    headers=st.lists(
        st.tuples(
            st.text(TOKEN, min_size=1, max_size=12).filter(lambda n: n.lower() not in NOT_SENT),
            fine_values | st.integers(1000, 20_000).map(lambda n: "é" * n),
        ),
        max_size=6,
    ),
    body=st.one_of(
        st.none(),
        st.binary(max_size=40_000),
        st.lists(st.binary(max_size=3000), max_size=6),
    ),
    rejected=st.tuples(
        nasty_text,
        st.sampled_from(["\r\n", "\r", "\n", "\x00", "\x1b", "\x7f", "\ud800", "\udc0d"]),
        nasty_text,
        st.booleans(),
    ).map(lambda p: [(p[0] + p[1] + p[2], "v")] if p[3] else [("X-A", p[0] + p[1] + p[2])]),
    loop=loops,
)
def test_what_the_upstream_receives_is_exactly_the_request(
    method: str,
    headers: list[tuple[str, str]],
    body: bytes | list[bytes] | None,
    rejected: list[tuple[str, str]],
    loop: str,
) -> None:
    """On the wire (llhttp in strict request mode): the method, the target, Host,
    the headers in order, the framing and the body; a refused head never
    opens a connection."""

    async def main() -> None:
        async with Server([Answer(FOLLOW)]) as server:
            t = server.transport()
            try:
                with pytest.raises(ValueError):
                    await t.request("GET", "/", rejected)
                assert server.accepts == 0 and t.open_connections == 0

                sent: Any = _chunks(body) if isinstance(body, list) else body
                resp = await t.request(method, "/p?q=1", headers, sent)
                assert await resp.read() == b"follow"
                assert not server.bad_request and len(server.requests) == 1
                req = server.requests[0]
                assert (req.method, req.target) == (method, b"/p?q=1")
                framing: list[tuple[bytes, bytes]] = []
                if isinstance(body, list):
                    framing = [(b"Transfer-Encoding", b"chunked")]
                elif body is not None:
                    framing = [(b"Content-Length", str(len(body)).encode())]
                elif method not in ("GET", "OPTIONS"):
                    framing = [(b"Content-Length", b"0")]
                assert req.headers == [
                    (b"Host", f"127.0.0.1:{server.port}".encode()),
                    *((n.encode(), v.encode()) for n, v in headers),
                    *framing,
                ]
                whole = b"".join(body) if isinstance(body, list) else body or b""
                assert req.body == whole
                # The head as _head built it: CR and LF only as CR LF pairs.
                head = server.raw[0][: server.raw[0].index(b"\r\n\r\n") + 4]
                assert head.count(b"\r") == head.count(b"\n") == head.count(b"\r\n")
            finally:
                await t.close()

    run(loop, main)


# -- timeouts never become hangs -----------------------------------------------------------


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(
    "raw,at_read",
    [
        (b"", False),
        (b"HTTP/1.1 200 OK\r\n", False),
        (b"HTTP/1.1 100 Continue\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", True),
    ],
    ids=["silence", "status-line", "interim-only", "short-length", "short-chunk"],
)
def test_stalled_answer_is_a_timeout(loop: str, raw: bytes, at_read: bool) -> None:
    async def main() -> None:
        async with Server([Answer(raw), Answer(FOLLOW)]) as server:
            t = server.transport(read_timeout=0.2)
            try:
                await expect_failure(server, t, UpstreamTimeout, at_read=at_read)
            finally:
                await t.close()

    run(loop, main)
