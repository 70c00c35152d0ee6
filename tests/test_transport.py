"""The upstream transports (``router.transport``) against real servers on real sockets.

aiohttp test servers and scripted raw TCP servers started here, and the
project's simulator (``router.simulator.build_app``) run in-process. Every
async test runs twice, on the default asyncio loop and on uvloop (the
router's loop), each in a fresh ``asyncio.Runner`` (``@on_both_loops``).
Synchronisation is by events, never by sleeping; the only clocks are the
transports' own timeouts and a safety bound on waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.config import InstanceConfig, Limits, RouterConfig, Timeouts
from router.instances import Fleet
from router.simulator.app import build_app
from router.simulator.options import SimulatorOptions
from router.transport import (
    AiohttpTransport,
    BadResponse,
    ConnectFailed,
    FastTransport,
    StaleConnection,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
    fast_transport_for,
    make_transport,
)
from router.transport import fast as fast_mod

WAIT = 10.0  # safety bound on any awaited event


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=list(LOOPS))
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop] | None:
    return LOOPS[request.param]


Resource = Callable[[dict[str, Any]], contextlib.AbstractAsyncContextManager[Any]]


def on_both_loops(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh runner on the loop of the ``loop_factory``
    fixture; its ``upstream`` / ``raw_server`` / ``sim`` arguments are servers
    started (and stopped) inside that loop; other arguments are pytest's."""
    sig = inspect.signature(fn)
    # Names, looked up when the test runs (the servers are defined below).
    resources = {"upstream": "serve_upstream", "raw_server": "serve_raw", "sim": "serve_sim"}
    wanted = [name for name in sig.parameters if name in resources]
    outer = [p for name, p in sig.parameters.items() if name not in resources]
    if "sim" in wanted and "tmp_path" not in sig.parameters:
        outer.append(inspect.Parameter("tmp_path", inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def test(loop_factory: Callable[[], asyncio.AbstractEventLoop] | None, **kwargs: Any) -> None:
        async def main() -> None:
            async with contextlib.AsyncExitStack() as stack:
                args = {k: v for k, v in kwargs.items() if k in sig.parameters}
                for name in wanted:
                    serve: Resource = globals()[resources[name]]
                    args[name] = await stack.enter_async_context(serve(kwargs))
                await fn(**args)

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())

    loop_param = inspect.Parameter("loop_factory", inspect.Parameter.KEYWORD_ONLY)
    params = [loop_param] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in outer]
    test.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    del test.__wrapped__  # pytest must see the new signature
    return test


def fast(url: str, **kw: Any) -> FastTransport:
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("read_timeout", 5.0)
    kw.setdefault("idle_keepalive", 4.0)
    t = fast_transport_for(url, **kw)
    assert t is not None
    return t


async def wait(aw: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(aw, WAIT)


# -- an aiohttp upstream --------------------------------------------------------


@dataclass
class Upstream:
    url: str
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request came in
    seen: list[tuple[str, str, int, dict[str, str]]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


def upstream_app(up: Upstream) -> web.Application:
    async def record(request: web.Request) -> None:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        up.seen.append(
            (request.method, request.path_qs, peer[1] if peer else 0, dict(request.headers))
        )
        up.bodies.append(body)
        up.arrived.set()

    async def echo(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "port": up.seen[-1][2],
                "len": len(up.bodies[-1]),
                "sha": hashlib.sha256(up.bodies[-1]).hexdigest(),
                "te": request.headers.get("Transfer-Encoding"),
                "cl": request.headers.get("Content-Length"),
                "host": request.headers.get("Host"),
            }
        )

    async def status(request: web.Request) -> web.StreamResponse:
        await record(request)
        code = int(request.match_info["code"])
        if code == 304:
            return web.Response(status=304, headers={"ETag": '"x"', "Content-Length": "10"})
        return web.Response(status=code)

    async def resource(request: web.Request) -> web.Response:
        # GET and HEAD (aiohttp answers HEAD on a GET route without the body).
        await record(request)
        return web.Response(body=b"x" * 1234, content_type="text/plain")

    async def gated_stream(request: web.Request) -> web.StreamResponse:
        """First chunk, then wait for the test to say it got it, then the rest."""
        await record(request)
        sse = request.match_info["kind"] == "sse"
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream" if sse else "application/x-ndjson"}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"data: one\n\n" if sse else b'{"i":1}\n')
        await up.gate.wait()
        await resp.write(b"data: two\n\n" if sse else b'{"i":2}\n')
        await resp.write_eof()
        return resp

    async def stall(request: web.Request) -> web.Response:
        await record(request)
        await up.gate.wait()
        return web.Response(text="late")

    async def big(request: web.Request) -> web.StreamResponse:
        await record(request)
        size = int(request.query.get("bytes", "0"))
        resp = web.StreamResponse()
        if request.query.get("chunked"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def close(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="bye", headers={"Connection": "close"})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/resource", resource)
    app.router.add_get("/stream/{kind}", gated_stream)
    app.router.add_get("/stall", stall)
    app.router.add_get("/big", big)
    app.router.add_get("/close", close)
    return app


@contextlib.asynccontextmanager
async def serve_upstream(_: dict[str, Any]) -> AsyncIterator[Upstream]:
    up = Upstream(url="")
    server = TestServer(upstream_app(up))
    await server.start_server()
    up.url = str(server.make_url("")).rstrip("/")
    try:
        yield up
    finally:
        up.gate.set()
        await server.close()


# -- a scripted raw TCP upstream ---------------------------------------------------


@dataclass
class RawConn:
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed

    async def read_request(self) -> tuple[bytes, bytes] | None:
        """One request (head, body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length) if length else b""
        return head, body

    def reset(self) -> None:
        """Close with a RST (SO_LINGER 0), like a crashed or abortive peer."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[RawConn], Awaitable[None]]


class RawServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[RawConn] = []
        self.requests = 0
        self.new_conn = asyncio.Event()
        # Scripts that must wait for the test wait on this.
        self.gate = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(len(self.conns), reader, writer)
        self.conns.append(conn)
        self.new_conn.set()
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.conns:
                conn.writer.transport.abort()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def serve_raw(_: dict[str, Any]) -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(script: Script) -> RawServer:
        server = await RawServer(script).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def counting(server_ref: list[RawServer], answer: bytes = OK) -> Script:
    """Answer every request with ``answer``; wait for the client to close."""

    async def script(conn: RawConn) -> None:
        while (req := await conn.read_request()) is not None:
            del req
            server_ref[0].requests += 1
            conn.writer.write(answer)
            await conn.writer.drain()
        conn.closed.set()

    return script


async def raw_with(
    raw_server: Callable[[Script], Awaitable[RawServer]], make: Callable[[list[RawServer]], Script]
) -> RawServer:
    ref: list[RawServer] = []
    server = await raw_server(make(ref))
    ref.append(server)
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- keep-alive ---------------------------------------------------------------------


@on_both_loops
async def test_keep_alive_reuses_one_connection(upstream: Upstream) -> None:
    t = fast(upstream.url)
    try:
        ports = set()
        for i in range(5):
            resp = await t.request("GET", f"/echo?i={i}", [("Accept", "*/*")])
            data = json.loads(await resp.read())
            resp.release()
            assert resp.status == 200 and data["path"] == f"/echo?i={i}"
            ports.add(data["port"])
        assert len(ports) == 1
        assert t.open_connections == 1 and t.idle_connections == 1
        # Host names the upstream, as aiohttp's client would.
        assert data["host"] == upstream.url.removeprefix("http://")
    finally:
        await t.close()


@on_both_loops
async def test_idle_connection_is_closed_by_us_before_the_server_would(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    # The raw server never closes idle connections: if the socket closes,
    # the transport closed it (after idle_keepalive).
    server = await raw_with(raw_server, counting)
    t = fast(server.url, idle_keepalive=0.2)
    try:
        resp = await t.request("GET", "/", [])
        assert await resp.read() == b"ok"
        assert t.idle_connections == 1
        await wait(server.conns[0].closed.wait())
        assert t.open_connections == 0 and t.idle_connections == 0
    finally:
        await t.close()


@on_both_loops
async def test_expired_idle_connection_is_never_reused(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    server = await raw_with(raw_server, counting)
    t = fast(server.url, idle_keepalive=30.0)
    try:
        resp = await t.request("GET", "/", [])
        await resp.read()
        # Age the idle connection past the keep-alive without waiting for it.
        conn = t.pool.idle[0]
        conn.idle_since -= 31.0
        resp = await t.request("GET", "/", [])
        assert await resp.read() == b"ok"
        assert len(server.conns) == 2
        await wait(server.conns[0].closed.wait())
    finally:
        await t.close()


# -- stale pooled connections ----------------------------------------------------------


def close_after_answer(ref: list[RawServer], *, rst: bool = False) -> Script:
    """Answer one request as keep-alive, then close the idle connection (FIN or RST):
    what a Node instance does at its keepAliveTimeout, or when it restarts."""

    async def script(conn: RawConn) -> None:
        if await conn.read_request() is None:
            return
        ref[0].requests += 1
        conn.writer.write(OK)
        await conn.writer.drain()
        # Wait until the client has taken the answer, then close.
        await ref[0].gate.wait()
        if rst:
            conn.reset()
        else:
            conn.writer.close()
        conn.closed.set()

    return script


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("method", ["POST", "GET"])
@on_both_loops
async def test_server_closing_an_idle_pooled_connection_costs_no_error(
    raw_server: Callable[[Script], Awaitable[RawServer]], method: str, rst: bool
) -> None:
    ref: list[RawServer] = []
    server = await raw_server(close_after_answer(ref, rst=rst))
    ref.append(server)
    t = fast(server.url)
    try:
        resp = await t.request(method, "/", [], b"{}")
        assert await resp.read() == b"ok"
        server.gate.set()
        await wait(server.conns[0].closed.wait())
        resp = await t.request(method, "/", [], b"{}")
        assert resp.status == 200 and await resp.read() == b"ok"
        # Exactly one request per connection: nothing was sent twice.
        assert server.requests == 2 and len(server.conns) == 2
    finally:
        await t.close()


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
@on_both_loops
async def test_close_not_yet_seen_by_the_loop_is_caught_before_writing(
    raw_server: Callable[[Script], Awaitable[RawServer]], rst: bool
) -> None:
    """The peer's FIN/RST is in our kernel but the loop has not read it (reading
    paused): the pre-write poll() check drops the connection, the POST goes
    on a new one and reaches the upstream once."""
    ref: list[RawServer] = []
    server = await raw_server(close_after_answer(ref, rst=rst))
    ref.append(server)
    t = fast(server.url)
    try:
        resp = await t.request("POST", "/", [], b"{}")
        await resp.read()
        idle = t.pool.idle[0]
        assert idle.transport is not None
        idle.transport.pause_reading()
        server.gate.set()
        await wait(server.conns[0].closed.wait())
        assert not idle.closed  # the loop cannot know yet
        resp = await t.request("POST", "/", [], b"{}")
        assert await resp.read() == b"ok"
        assert idle.closed
        assert server.requests == 2 and len(server.conns) == 2
    finally:
        await t.close()


@on_both_loops
async def test_write_refused_on_a_reset_pooled_connection_is_stale_and_replayed(
    raw_server: Callable[[Script], Awaitable[RawServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the RST slips past the pre-write check, the kernel refuses the write
    itself: ``StaleConnection`` (not a byte left), replayed even for a POST."""
    ref: list[RawServer] = []
    server = await raw_server(close_after_answer(ref, rst=True))
    ref.append(server)
    t = fast(server.url)
    try:
        resp = await t.request("POST", "/", [], b"{}")
        await resp.read()
        idle = t.pool.idle[0]
        assert idle.transport is not None
        idle.transport.pause_reading()
        server.gate.set()
        await wait(server.conns[0].closed.wait())
        # Blind the pre-write check to reach the write-time detection.
        monkeypatch.setattr(fast_mod._Conn, "usable", lambda self, now, keepalive: True)
        stale: list[UpstreamError] = []
        original = fast_mod._retryable

        def spy(method: str, exc: UpstreamError) -> bool:
            stale.append(exc)
            return original(method, exc)

        monkeypatch.setattr(fast_mod, "_retryable", spy)
        resp = await t.request("POST", "/", [], b"{}")
        assert await resp.read() == b"ok"
        assert len(stale) == 1 and isinstance(stale[0], StaleConnection)
        assert stale[0].replay_safe and not stale[0].request_sent
        assert server.requests == 2
    finally:
        await t.close()


def drop_first_request(ref: list[RawServer]) -> Script:
    """First connection: answer once, then read the next request and close
    without answering ("read it, then died"). Later connections answer."""

    async def script(conn: RawConn) -> None:
        while (req := await conn.read_request()) is not None:
            del req
            ref[0].requests += 1
            if conn.index == 0 and ref[0].requests == 2:
                conn.writer.close()
                return
            conn.writer.write(OK)
            await conn.writer.drain()

    return script


@on_both_loops
async def test_reused_connection_dropped_after_the_write_is_replayed_for_get_only(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    server = await raw_with(raw_server, drop_first_request)
    t = fast(server.url)
    try:
        resp = await t.request("GET", "/", [])
        await resp.read()
        resp = await t.request("GET", "/", [])  # dropped, then replayed on a new connection
        assert await resp.read() == b"ok"
        assert server.requests == 3 and len(server.conns) == 2
    finally:
        await t.close()

    server = await raw_with(raw_server, drop_first_request)
    t = fast(server.url)
    try:
        resp = await t.request("POST", "/", [], b"{}")
        await resp.read()
        with pytest.raises(UpstreamDisconnected) as info:
            await t.request("POST", "/", [], b"{}")
        exc = info.value
        assert exc.request_sent and not exc.replay_safe and exc.reused
        assert not exc.response_started
        assert server.requests == 2  # never sent twice
    finally:
        await t.close()


# -- bodies -----------------------------------------------------------------------------


@on_both_loops
async def test_request_bodies_bytes_and_streamed(upstream: Upstream) -> None:
    t = fast(upstream.url)
    try:
        body = b'{"chatId":"1@c.us","text":"hi"}'
        resp = await t.request("POST", "/echo", [("Content-Type", "application/json")], body)
        data = json.loads(await resp.read())
        assert data["len"] == len(body) and data["cl"] == str(len(body)) and data["te"] is None

        parts = [b"a" * 1000, b"", b"b" * 70_000, b"c"]

        async def stream() -> AsyncIterator[bytes]:
            for p in parts:
                yield p

        resp = await t.request("PUT", "/echo", [], stream())
        data = json.loads(await resp.read())
        joined = b"".join(parts)
        assert data["te"] == "chunked" and data["cl"] is None
        assert data["len"] == len(joined) and data["sha"] == hashlib.sha256(joined).hexdigest()

        # No body: Content-Length 0 on POST (as aiohttp sends), nothing on GET.
        resp = await t.request("POST", "/echo", [])
        assert json.loads(await resp.read())["cl"] == "0"
        resp = await t.request("GET", "/echo", [])
        assert json.loads(await resp.read())["cl"] is None
        assert t.open_connections == 1
    finally:
        await t.close()


@on_both_loops
async def test_early_answer_to_a_streamed_body_and_a_failing_body(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")  # the head only
        conn.writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await conn.writer.drain()
        await conn.reader.read()  # whatever else comes, until the close
        conn.closed.set()

    server = await raw_server(script)
    t = fast(server.url)
    answered = asyncio.Event()
    more_read = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal more_read
        yield b"first"
        await answered.wait()
        more_read = True
        yield b"second"

    try:
        resp = await t.request("POST", "/", [], body())
        answered.set()
        assert resp.status == 413 and await resp.read() == b""
        # Answered before the body was out: that connection is not reused.
        assert t.open_connections == 0
        await wait(server.conns[0].closed.wait())
        assert not more_read

        async def broken() -> AsyncIterator[bytes]:
            yield b"x"
            raise ConnectionResetError("client went away")

        with pytest.raises(UpstreamDisconnected) as info:
            await t.request("POST", "/", [], broken())
        assert info.value.request_sent
    finally:
        await t.close()


@on_both_loops
async def test_large_bodies_both_ways(upstream: Upstream) -> None:
    t = fast(upstream.url)
    try:
        big = bytes(range(256)) * (20 * 1024)  # 5 MiB
        resp = await t.request("POST", "/echo", [], big)
        data = json.loads(await resp.read())
        assert data["len"] == len(big) and data["sha"] == hashlib.sha256(big).hexdigest()

        size = 8 * 1024 * 1024 + 3
        resp = await t.request("GET", f"/big?bytes={size}", [])
        assert resp.content_length == size
        assert len(await resp.read()) == size

        # Chunked, consumed slowly enough for the transport to pause reading.
        resp = await t.request("GET", f"/big?bytes={size}&chunked=1", [])
        assert resp.content_length is None
        got = 0
        async for chunk in resp.iter_chunks():
            got += len(chunk)
            await asyncio.sleep(0)
        assert got == size
        resp.release()
        assert t.idle_connections == 1
    finally:
        await t.close()


@pytest.mark.parametrize("kind", ["ndjson", "sse"])
@on_both_loops
async def test_chunked_and_sse_responses_flush_as_they_arrive(
    upstream: Upstream, kind: str
) -> None:
    t = fast(upstream.url)
    try:
        resp = await t.request("GET", f"/stream/{kind}", [])
        assert resp.status == 200 and resp.content_length is None
        chunks = resp.iter_chunks()
        first = await wait(chunks.__anext__())
        # The server holds the rest until we have seen the first chunk.
        assert first == (b"data: one\n\n" if kind == "sse" else b'{"i":1}\n')
        upstream.gate.set()
        rest = b"".join([c async for c in chunks])
        assert rest == (b"data: two\n\n" if kind == "sse" else b'{"i":2}\n')
        resp.release()
        assert t.idle_connections == 1
    finally:
        await t.close()


@on_both_loops
async def test_head_204_and_304_have_no_body_and_keep_the_connection(
    upstream: Upstream,
) -> None:
    t = fast(upstream.url)
    try:
        resp = await t.request("HEAD", "/resource", [])
        assert resp.status == 200 and resp.content_length == 1234
        assert await resp.read() == b""
        resp = await t.request("GET", "/resource", [])
        assert await resp.read() == b"x" * 1234
        resp = await t.request("DELETE", "/status/204", [])
        assert resp.status == 204 and await resp.read() == b""
        resp = await t.request("GET", "/status/304", [])
        assert resp.status == 304 and await resp.read() == b""
        resp = await t.request("GET", "/resource", [])
        assert await resp.read() == b"x" * 1234
        ports = {s[2] for s in upstream.seen}
        assert len(ports) == 1 and t.open_connections == 1
    finally:
        await t.close()


@on_both_loops
async def test_interim_100_continue_until_close_body_and_connection_close(
    raw_server: Callable[[Script], Awaitable[RawServer]], upstream: Upstream
) -> None:
    async def script(conn: RawConn) -> None:
        req = await conn.read_request()
        assert req is not None
        if req[0].startswith(b"GET /continue"):
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
            await conn.writer.drain()
            req = await conn.read_request()
        # No length, not chunked: the body runs until the close.
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await conn.writer.drain()
        conn.writer.write(b"close")
        conn.writer.close()

    server = await raw_server(script)
    t = fast(server.url)
    try:
        resp = await t.request("GET", "/continue", [("Expect", "100-continue")])
        assert resp.status == 200 and await resp.read() == b"ok"
        resp = await t.request("GET", "/", [])
        assert resp.content_length is None
        assert await resp.read() == b"until close"
        assert t.open_connections == 0
    finally:
        await t.close()

    t = fast(upstream.url)
    try:
        resp = await t.request("GET", "/close", [])
        assert await resp.read() == b"bye"
        assert t.open_connections == 0  # Connection: close honoured
    finally:
        await t.close()


# -- failures ----------------------------------------------------------------------------


@on_both_loops
async def test_connect_refused_is_connect_failed() -> None:
    t = fast(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ConnectFailed) as info:
            await t.request("POST", "/x", [], b"{}")
        assert not info.value.request_sent and info.value.replay_safe
        assert not info.value.timeout
        assert t.open_connections == 0
    finally:
        await t.close()


@on_both_loops
async def test_reset_mid_response_after_the_request_was_written(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    async def script(conn: RawConn) -> None:
        req = await conn.read_request()
        assert req is not None
        if b"/before" in req[0]:
            conn.reset()
            return
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await conn.writer.drain()
        await server.gate.wait()  # until the client has the head and the first bytes
        conn.reset()

    server = await raw_server(script)
    t = fast(server.url)
    try:
        with pytest.raises(UpstreamDisconnected) as info:
            await t.request("POST", "/before", [], b"{}")
        assert info.value.request_sent and not info.value.replay_safe
        assert not info.value.response_started

        resp = await t.request("POST", "/during", [], b"{}")
        assert resp.status == 200 and resp.content_length == 100
        reader = resp.iter_chunks()
        assert await wait(reader.__anext__()) == b"partial"
        server.gate.set()
        with pytest.raises(UpstreamDisconnected) as info:
            await wait(reader.__anext__())
        assert info.value.request_sent and info.value.response_started
        assert t.open_connections == 0
    finally:
        await t.close()


@on_both_loops
async def test_read_timeout_is_upstream_timeout(upstream: Upstream) -> None:
    t = fast(upstream.url, read_timeout=0.2)
    try:
        with pytest.raises(UpstreamTimeout) as info:
            await t.request("GET", "/stall", [])
        assert info.value.request_sent and not info.value.replay_safe
        assert t.open_connections == 0
    finally:
        await t.close()


@on_both_loops
async def test_bad_response_and_header_injection(
    raw_server: Callable[[Script], Awaitable[RawServer]],
) -> None:
    async def script(conn: RawConn) -> None:
        await conn.read_request()
        conn.writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await conn.writer.drain()
        await conn.reader.read()

    server = await raw_server(script)
    t = fast(server.url)
    try:
        with pytest.raises(BadResponse):
            await t.request("GET", "/", [])
        for headers, path in (
            ([("X-Evil", "a\r\nInjected: 1")], "/"),
            ([("X-Evil", "a\nb")], "/"),
            ([("X-Nul", "a\x00b")], "/"),
            ([], "/a b HTTP/1.1\r\nX: y"),
        ):
            with pytest.raises(ValueError):
                await t.request("GET", path, headers)
    finally:
        await t.close()


@on_both_loops
async def test_pool_limit_waits_then_times_out(upstream: Upstream) -> None:
    t = fast(upstream.url, limit=1, connect_timeout=0.3)
    try:
        first = asyncio.create_task(t.request("GET", "/stall", []))
        await wait(upstream.arrived.wait())
        with pytest.raises(ConnectFailed) as info:
            await t.request("GET", "/echo", [])
        assert info.value.timeout and not info.value.request_sent
        # A waiter gets the connection as soon as it is free.
        second = asyncio.create_task(t.request("GET", "/echo", []))
        upstream.gate.set()
        resp = await wait(first)
        assert await resp.read() == b"late"
        resp = await wait(second)
        assert json.loads(await resp.read())["path"] == "/echo"
        assert t.open_connections == 1
    finally:
        await t.close()


@on_both_loops
async def test_cancelled_request_never_returns_its_connection(upstream: Upstream) -> None:
    t = fast(upstream.url)
    try:
        task = asyncio.create_task(t.request("GET", "/stall", []))
        await wait(upstream.arrived.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert t.open_connections == 0 and t.idle_connections == 0
    finally:
        await t.close()


# -- the simulator (a WAHA instance) ----------------------------------------------------


@contextlib.asynccontextmanager
async def serve_sim(kwargs: dict[str, Any]) -> AsyncIterator[str]:
    tmp_path: Path = kwargs["tmp_path"]
    opts = SimulatorOptions(
        name="wa-1",
        api_key="k",
        auth_dir=tmp_path / "auth",
        record=tmp_path / "sent.jsonl",
        start_delay=0.0,
    )
    server = TestServer(build_app(opts))
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def sim_json(t: FastTransport, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = [("X-Api-Key", "k"), ("Content-Type", "application/json")]
    resp = await t.request(method, path, headers, data)
    try:
        return resp.status, json.loads(await resp.read() or b"null")
    finally:
        resp.release()


@on_both_loops
async def test_simulator_sends_and_faults(sim: str) -> None:
    t = fast(sim)
    try:
        await sim_json(t, "POST", "/_sim/bulk_sessions", {"names": ["s1"]})
        status, data = await sim_json(
            t, "POST", "/api/sendText", {"session": "s1", "chatId": "1@c.us", "text": "a"}
        )
        assert status == 201, data
        # drop: the instance read the send and closed without answering.
        await sim_json(t, "POST", "/_sim/fault", {"mode": "drop", "count": 1})
        with pytest.raises(UpstreamDisconnected) as info:
            await sim_json(
                t, "POST", "/api/sendText", {"session": "s1", "chatId": "1@c.us", "text": "b"}
            )
        assert info.value.request_sent and not info.value.replay_safe
        # The same fault on an idempotent GET over a reused connection is replayed.
        await sim_json(t, "POST", "/_sim/fault", {"mode": "drop", "count": 1})
        status, data = await sim_json(t, "GET", "/api/sessions/s1")
        assert status == 200 and data["name"] == "s1"
        # drop_after: the instance sent the message, then the answer was lost.
        await sim_json(t, "POST", "/_sim/fault", {"mode": "drop_after", "count": 1})
        with pytest.raises(UpstreamDisconnected) as info:
            await sim_json(
                t, "POST", "/api/sendText", {"session": "s1", "chatId": "1@c.us", "text": "c"}
            )
        assert info.value.request_sent and not info.value.replay_safe
        status, sent = await sim_json(t, "GET", "/_sim/sent")
        # "b" was never replayed (a replay would have gone through and been
        # recorded); "c" was sent once, not twice.
        assert [r["text"] for r in sent["sent"]] == ["a", "c"]
        # SSE from the simulator arrives event by event.
        resp = await t.request("GET", "/_sim/sse?n=3&interval=0", [("X-Api-Key", "k")])
        events = b"".join([c async for c in resp.iter_chunks()]).decode()
        assert events.count("event: tick") == 3
    finally:
        await t.close()


# -- the aiohttp transport and the choice between them ----------------------------------


@on_both_loops
async def test_aiohttp_transport_same_interface_and_errors(upstream: Upstream) -> None:
    session = aiohttp.ClientSession(auto_decompress=False)
    t = AiohttpTransport(session, upstream.url, owns_session=True)
    try:
        resp = await t.request("POST", "/echo?a=1", [("X-A", "1")], b"abc")
        data = json.loads(await resp.read())
        resp.release()
        assert resp.status == 200 and data["len"] == 3 and data["path"] == "/echo?a=1"
        assert any(k.lower() == "content-type" for k, _ in resp.headers)

        async def stream() -> AsyncIterator[bytes]:
            yield b"x" * 10
            yield b"y" * 10

        resp = await t.request("PUT", "/echo", [], stream())
        assert json.loads(await resp.read())["len"] == 20
        resp = await t.request("GET", "/stream/sse", [])
        chunks = resp.iter_chunks()
        assert await wait(chunks.__anext__()) == b"data: one\n\n"
        upstream.gate.set()
        assert b"".join([c async for c in chunks]) == b"data: two\n\n"
        resp.release()
    finally:
        await t.close()

    dead = AiohttpTransport(aiohttp.ClientSession(), f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ConnectFailed):
            await dead.request("GET", "/", [])
    finally:
        await dead.session.close()

    upstream.gate.clear()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=0.2))
    slow = AiohttpTransport(session, upstream.url, owns_session=True)
    try:
        with pytest.raises(UpstreamTimeout):
            await slow.request("GET", "/stall", [])
    finally:
        upstream.gate.set()
        await slow.close()


@on_both_loops
async def test_fleet_uses_the_fast_transport_for_plain_http_only() -> None:
    cfg = RouterConfig(
        instances=(
            InstanceConfig("a", "http://127.0.0.1:3000/prefix/"),
            InstanceConfig("b", "https://wa.example:8443"),
            InstanceConfig("c", "http://user:pw@127.0.0.1:3001"),
        ),
        timeouts=Timeouts(connect=1.5, read=7.0, idle_keepalive=3.0),
        limits=Limits(max_connections_per_instance=9),
    )
    fleet = Fleet.build(cfg)
    try:
        a, b, c = (fleet.get(n) for n in "abc")
        assert a is not None and b is not None and c is not None
        assert isinstance(a.transport, FastTransport)
        assert isinstance(b.transport, AiohttpTransport)
        assert isinstance(c.transport, AiohttpTransport)
        head = a.transport._head("GET", "/api/x?y=1", [("X-A", "b")], "")
        assert head == (b"GET /prefix/api/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nX-A: b\r\n\r\n")
        pool = a.transport.pool
        assert (pool.limit, pool.connect_timeout, pool.read_timeout, pool.idle_keepalive) == (
            9,
            1.5,
            7.0,
            3.0,
        )
        assert isinstance(make_transport(cfg, cfg.instances[0], a.http), FastTransport)
    finally:
        await fleet.close()


def test_error_classes_say_when_a_replay_is_safe() -> None:
    assert ConnectFailed("x").replay_safe
    assert ConnectFailed("x", timeout=True).replay_safe
    assert StaleConnection("x").replay_safe and StaleConnection("x").reused
    assert UpstreamDisconnected("x", request_sent=False).replay_safe
    assert not UpstreamDisconnected("x", request_sent=True).replay_safe
    assert not UpstreamTimeout("x", request_sent=True).replay_safe
    assert UpstreamTimeout("x", request_sent=False).replay_safe
    assert not BadResponse("x").replay_safe
    for cls in (ConnectFailed, StaleConnection, UpstreamDisconnected, UpstreamTimeout):
        assert issubclass(cls, UpstreamError)
