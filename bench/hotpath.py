"""In-process CPU cost of the router's own Python on the hot path, without sockets.

    .venv/bin/python bench/hotpath.py [-n 20000] [--profile]

Runs ``ProxyHandler`` on pre-built WAHA ``POST /api/<session>/sendText``
requests (the peers.sh workload) against ``FastTransport`` connections whose
"socket" answers every request with nginx's 36-byte JSON reply on the next
loop iteration. What it measures is the router's Python per request (proxy
logic, adapter, session map, transport bookkeeping, response parsing), not
aiohttp's server side nor the kernel: use it to compare changes, and
``bench/run.sh`` for the real figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from serve_router import bench_config  # bench/ is on sys.path when run as a script
from yarl import URL

from router.proxy import ProxyHandler
from router.server import Server, install_uvloop
from router.transport.fast import FastTransport, _Conn

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 11:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 36\r\nConnection: keep-alive\r\n\r\n"
    b'{"id":"true_123@c.us_ABC","ok":true}'
)
BODY = b'{"chatId":"123@c.us","text":"hello"}'


class FakeSocket:
    """Just enough of an asyncio transport: every write is answered next iteration."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.conn.data_received, RESPONSE)

    def writelines(self, data: Any) -> None:
        self.write(b"")

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.conn.connection_lost, None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Protocol:
    """The few attributes of aiohttp's RequestHandler a request reads (no Mock:
    its call recording would dominate the figures)."""

    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 18400)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport = None

    def _payload_factory(self) -> StreamReader:
        return StreamReader(self, 2**16, loop=self.loop)  # type: ignore[arg-type]

    def pause_reading(self, *args: Any, **kwargs: Any) -> None:
        pass

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        pass


def fake_connections(handler: ProxyHandler) -> None:
    """Fresh fake upstream connections in every instance's pool (no real socket)."""
    for inst in handler.rt.fleet:
        transport = inst.transport
        assert isinstance(transport, FastTransport)
        pool = transport.pool
        for conn in pool.idle:
            conn.close()
        pool.idle.clear()
        for _ in range(8):
            conn = _Conn(pool)
            conn.connection_made(FakeSocket(conn))  # type: ignore[arg-type]
            pool.open += 1
            pool.put(conn)


def make_request(n: int, protocol: Any) -> web.BaseRequest:
    """A request as aiohttp's server would build it (no mocks: they would dominate)."""
    payload = protocol._payload_factory()
    payload.feed_data(BODY)
    payload.feed_eof()
    path = f"/api/sess-{n}/sendText"
    raw = (
        (b"Host", b"127.0.0.1:18400"),
        (b"Content-Type", b"application/json"),
        (b"X-Api-Key", b"k"),
        (b"Content-Length", str(len(BODY)).encode()),
    )
    headers = CIMultiDictProxy(CIMultiDict((k.decode(), v.decode()) for k, v in raw))
    message = RawRequestMessage(
        "POST", path, HttpVersion11, headers, raw, False, None, False, False, URL(path)
    )
    return web.BaseRequest(message, payload, protocol, None, None, protocol.loop)  # type: ignore[arg-type]


async def main(n: int, rounds: int, profile: bool) -> None:
    server = Server(bench_config(0, 1000))
    await server.startup()
    rt = server.runtime
    assert rt is not None
    # No real upstream behind the fake sockets: keep the health checker from
    # marking the instances down.
    if server.health is not None:
        await server.health.stop()
        server.health = None
    for inst in rt.fleet:
        inst.healthy = True
    names = [i.name for i in rt.fleet]
    await rt.smap.assign_many({f"sess-{k}": names[k % len(names)] for k in range(1, 1001)})
    handler = ProxyHandler(rt)
    loop = asyncio.get_running_loop()
    proto: Any = _Protocol(loop)
    try:
        await _measure(handler, proto, n, rounds, profile)
    finally:
        await server.shutdown()


async def _measure(handler: ProxyHandler, proto: Any, n: int, rounds: int, profile: bool) -> None:
    results = []
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    for _ in range(rounds):
        requests = [make_request(1 + k % 1000, proto) for k in range(n)]
        fake_connections(handler)
        if profiler is not None:
            profiler.enable()
        t0 = time.process_time()
        for req in requests:
            resp = await handler(req)
            assert resp.status == 200, resp
        dt = time.process_time() - t0
        if profiler is not None:
            profiler.disable()
        results.append(dt / n * 1e6)
    print(
        f"hot path: {statistics.median(results):.1f} µs/request median, "
        f"{min(results):.1f} min over {rounds} rounds of {n}"
    )
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ns = ap.parse_args()
    install_uvloop()
    asyncio.run(main(ns.n, ns.rounds, ns.profile))
