"""The router process: an explicit ``startup -> serve -> shutdown`` lifecycle.

``startup`` opens the store, warms the session cache, builds the fleet and
starts listening; ``serve`` waits for SIGTERM/SIGINT; ``shutdown`` stops
accepting, lets in-flight requests finish within ``drain_timeout`` and
closes every pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from router.adapters import build_adapter
from router.adapters.base import Adapter
from router.config import HealthConfig, RouterConfig
from router.health import HealthChecker
from router.idempotency import IdempotencyStore, MemoryIdempotency, RedisIdempotency
from router.instances import Fleet
from router.proxy import ProxyHandler
from router.resolver import Resolver
from router.runtime import Runtime
from router.sessionmap import SessionMap
from router.store import build_store
from router.store.base import SessionStore, StoreUnavailable
from router.store.redis import RedisStore

log = logging.getLogger(__name__)

_JSON = "application/json"


class Server:
    def __init__(self, config: RouterConfig, *, drain_timeout: float = 15.0) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.runtime: Runtime | None = None
        self.health: HealthChecker | None = None
        self._runner: web.ServerRunner | None = None
        self._stop = asyncio.Event()
        self.port: int | None = None

    # -- lifecycle ------------------------------------------------------------
    async def startup(self, sock: socket.socket | None = None) -> None:
        cfg = self.config
        store = build_store(cfg.store)
        smap = SessionMap(store)
        try:
            await smap.load()
        except StoreUnavailable:
            log.warning("session store unreachable at start; the map fills from the instances")
        self.runtime = Runtime(
            config=cfg,
            adapter=build_adapter(cfg.adapter),
            fleet=Fleet.build(cfg),
            smap=smap,
            resolver=Resolver(smap, probe_timeout=cfg.timeouts.connect + cfg.health.timeout),
            api_keys=frozenset(cfg.api_keys),
            idempotency=_idempotency_store(store, cfg),
        )
        self.health = HealthChecker(self._health_state, self.runtime.events)
        self.health.start()

        proxy = ProxyHandler(self.runtime)
        server = web.Server(self._dispatcher(proxy), access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=self.drain_timeout)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock, backlog=1024)
        else:
            site = web.TCPSite(
                self._runner, cfg.listen.host, cfg.listen.port, backlog=1024, reuse_address=True
            )
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info(
            "router listening on http://%s:%s (%d instances, %s adapter, %s store)",
            cfg.listen.host,
            self.port,
            len(cfg.instances),
            cfg.adapter.kind,
            "memory" if cfg.store.is_memory else "redis",
        )

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        if self._runner is not None:
            # Stops accepting, then waits up to drain_timeout for handlers.
            await self._runner.cleanup()
            self._runner = None
        if self.health is not None:
            await self.health.stop()
        if self.runtime is not None:
            await self.runtime.fleet.close()
            await self.runtime.smap.store.close()
        log.info("router stopped")

    async def run(self) -> None:
        await self.startup()
        try:
            await self.serve()
        finally:
            await self.shutdown()

    # -- plumbing -------------------------------------------------------------
    def _health_state(self) -> tuple[Fleet, Adapter, HealthConfig]:
        rt = self.runtime
        assert rt is not None
        return rt.fleet, rt.adapter, rt.config.health

    def _dispatcher(
        self, proxy: ProxyHandler
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            path = request.path
            if path == "/healthz":
                return web.Response(body=b'{"status":"ok"}', content_type=_JSON)
            if path == "/readyz":
                return await self._readyz()
            return await proxy(request)

        return dispatch

    async def _readyz(self) -> web.Response:
        rt = self.runtime
        assert rt is not None
        store_ok = await rt.smap.store.ping()
        healthy = [i.name for i in rt.fleet.healthy()]
        ready = store_ok and bool(healthy)
        body = {"ready": ready, "store": store_ok, "healthy_instances": healthy}
        return web.Response(
            status=200 if ready else 503, body=json.dumps(body).encode(), content_type=_JSON
        )


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True


def _idempotency_store(store: SessionStore, cfg: RouterConfig) -> IdempotencyStore:
    """Idempotency keys live beside the session map, so they work across replicas."""
    if isinstance(store, RedisStore):
        return RedisIdempotency(store.client, cfg.store.key_prefix)
    return MemoryIdempotency()
