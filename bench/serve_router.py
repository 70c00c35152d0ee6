"""Run the router for benchmarks: memory store pre-filled with N mapped sessions.

    python bench/serve_router.py --port 18400 --sessions 100000 [--transport fast|aiohttp]

Routes WAHA-style ``/api/<session>/…`` requests to the four static upstreams
of ``bench/peers/peers.sh`` (127.0.0.1:18001-18004). ``--transport aiohttp``
forces the aiohttp-based upstream transport (what the router used before
``router.transport.fast``), for A/B comparisons (``bench/transport_ab.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from router.config import (
    AdapterConfig,
    ClientKey,
    HealthConfig,
    InstanceConfig,
    ListenConfig,
    RouterConfig,
)
from router.server import Server, install_uvloop

UPSTREAM_PORTS = (18001, 18002, 18003, 18004)


def bench_config(port: int, sessions: int) -> RouterConfig:
    return RouterConfig(
        instances=tuple(
            InstanceConfig(
                name=f"i{n}",
                url=f"http://127.0.0.1:{p}",
                max_sessions=sessions,
                api_key="instance-key",
            )
            for n, p in enumerate(UPSTREAM_PORTS, 1)
        ),
        listen=ListenConfig("127.0.0.1", port),
        adapter=AdapterConfig("waha"),
        health=HealthConfig(interval=5.0, timeout=1.0),
        api_keys=(ClientKey("k"),),
    )


def force_aiohttp_transport() -> None:
    """Every instance proxies through its aiohttp.ClientSession (the old path)."""
    import router.instances
    from router.transport import AiohttpTransport

    def make(config: RouterConfig, inst: InstanceConfig, http: Any) -> AiohttpTransport:
        return AiohttpTransport(http, inst.url)

    setattr(router.instances, "make_transport", make)  # noqa: B010


async def main(port: int, sessions: int) -> None:
    server = Server(bench_config(port, sessions))
    await server.startup()
    assert server.runtime is not None
    names = [i.name for i in server.runtime.fleet]
    await server.runtime.smap.assign_many(
        {f"sess-{n}": names[n % len(names)] for n in range(1, sessions + 1)}
    )
    print(f"ROUTER READY {server.port} sessions={len(server.runtime.smap)}", flush=True)
    try:
        await server.serve()
    finally:
        await server.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--transport", choices=("fast", "aiohttp"), default="fast")
    ap.add_argument(
        "--no-metrics", action="store_true", help="record no per-request metrics (cost check)"
    )
    ns = ap.parse_args()
    if ns.no_metrics:
        import router.metrics

        router.metrics.HOT_PATH = False
    logging.basicConfig(level=logging.ERROR)
    if ns.transport == "aiohttp":
        force_aiohttp_transport()
    if not ns.no_uvloop:
        install_uvloop()
    asyncio.run(main(ns.port, ns.sessions))
