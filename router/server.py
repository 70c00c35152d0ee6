"""The router process: an explicit ``startup -> serve -> shutdown`` lifecycle.

``startup`` opens the store, warms the session cache, builds the fleet and
starts listening; ``serve`` waits for SIGTERM/SIGINT (SIGHUP reloads the
config: ``router.reload``); ``shutdown`` stops accepting, lets in-flight
requests finish within ``drain_timeout`` and closes every pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from router.adapters import build_adapter
from router.adapters.base import BadSessionId, valid_session_id
from router.admin import AdminAPI
from router.config import RouterConfig
from router.connections import (
    GuardedHandler,
    GuardedServer,
    raise_nofile_limit,
)
from router.dashboard import Dashboard
from router.discovery import Discovery
from router.errors import RouterError, error_response, request_id_of
from router.health import HealthChecker
from router.idempotency import IdempotencyStore, MemoryIdempotency, RedisIdempotency
from router.instances import Fleet
from router.locks import LocalLocks, LockBusy, SessionLocks
from router.metrics import CONFIG_LAST_RELOAD_TIME, metrics_exposition, register_runtime
from router.migration import Migration
from router.pacing import MemoryPacer, Pacer, RedisPacer
from router.proxy import ProxyHandler
from router.reload import Reloader
from router.runtime import Runtime
from router.sessionmap import SessionMap
from router.store import build_store
from router.store.base import SessionStore, StoreUnavailable
from router.store.redis import RedisStore
from router.store.redis_locks import RedisLocks
from router.store.sync import MapSync

if TYPE_CHECKING:
    from router.webhooks.relay import WebhookRelay

log = logging.getLogger(__name__)

_JSON = "application/json"


class Server:
    def __init__(
        self,
        config: RouterConfig,
        *,
        drain_timeout: float = 15.0,
        watch_interval: float | None = 1.0,
    ) -> None:
        # The config in force (a reload replaces it: see router.reload).
        self.config = config
        self.drain_timeout = drain_timeout
        # Seconds between two looks at the config file (None: no watch).
        self.watch_interval = watch_interval
        # SIGHUP, POST /admin/reload and the file watch (also on the runtime).
        self.reloader: Reloader | None = None
        self.runtime: Runtime | None = None
        self.health: HealthChecker | None = None
        # Rediscovery / reconcile, and drain / move / rebalance (also on the runtime).
        self.discovery: Discovery | None = None
        self.migration: Migration | None = None
        # Redis store only: the change feed keeping this replica's cache in step.
        self.sync: MapSync | None = None
        # The durable webhook relay (config ``webhooks:``), None when disabled.
        self.webhooks: WebhookRelay | None = None
        # ``/dashboard`` (admin key); closed first on shutdown (it holds open streams).
        self.dashboard: Dashboard | None = None
        self._runner: web.ServerRunner | None = None
        # Client connections (bounded in number and time): router.connections.
        self.guard: GuardedServer | None = None
        self._stop = asyncio.Event()
        self.port: int | None = None

    # -- lifecycle ------------------------------------------------------------
    async def startup(self, sock: socket.socket | None = None) -> None:
        cfg = self.config
        store = build_store(cfg.store)
        smap = SessionMap(store)
        locks: SessionLocks = LocalLocks()
        if isinstance(store, RedisStore):
            # Several replicas may share this store: restore locks live in
            # redis, and the change feed's first connection is the initial
            # cache load (subscribed first, so no change is missed).
            locks = RedisLocks.for_store(store)
            self.sync = MapSync(smap, store)
            if not await self.sync.start():
                log.warning("session store unreachable at start; the map fills from the instances")
        else:
            try:
                await smap.load()
            except StoreUnavailable:
                log.warning("session store unreachable at start; the map fills from the instances")
        runtime = self.runtime = Runtime.build(
            cfg,
            build_adapter(cfg.adapter),
            Fleet.build(cfg),
            smap=smap,
            locks=locks,
            idempotency=_idempotency_store(store, cfg),
            pacer=_pacer(store),
        )
        register_runtime(runtime)
        self.health = HealthChecker(runtime.live, runtime.events)
        # A down instance's idle sessions are recovered too, not only busy ones;
        # when it comes back, what was moved off it is stopped there first.
        self.health.on_down = runtime.failover.evacuate_soon
        self.health.on_up = runtime.failover.fence
        self.health.start()

        # Map every session the instances run before the first request.
        self.discovery = runtime.discovery
        self.migration = runtime.migration
        self.reloader = runtime.reloader = Reloader(
            runtime,
            path=cfg.source,
            on_apply=self._config_applied,
            watch_interval=self.watch_interval,
        )
        CONFIG_LAST_RELOAD_TIME.set(time.time())
        if cfg.discovery.on_start:
            await self.discovery.discover()
        self.discovery.start()

        if cfg.webhooks is not None:
            # Open the queue before listening: an event is never answered
            # 200 before it is stored. Redelivers what a previous run left.
            from router.webhooks.relay import WebhookRelay

            self.webhooks = WebhookRelay(
                cfg,
                on_session_hint=self._session_hint,
                on_qr=runtime.failover.readiness.auth_needed,
                claim_sessions=self._claim_sessions,
            )
            await self.webhooks.start()

        proxy = ProxyHandler(self.runtime)
        soft, _ = raise_nofile_limit()
        if cfg.limits.max_client_connections > soft - 256:
            log.warning(
                "limits.max_client_connections (%d) is close to the open-file limit (%d)",
                cfg.limits.max_client_connections,
                soft,
            )
        server = self.guard = GuardedServer(
            self._dispatcher(proxy), limits=cfg.limits, access_log=None
        )
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
        self.reloader.start()
        log.info(
            "router listening on http://%s:%s (%d instances, %s adapter, %s store)",
            cfg.listen.host,
            self.port,
            len(cfg.instances),
            cfg.adapter.kind,
            "memory" if cfg.store.is_memory else "redis",
        )

    async def serve(self) -> None:
        self._install_signals()
        await self._stop.wait()

    def _install_signals(self) -> None:
        """SIGTERM / SIGINT stop, SIGHUP reloads the config (``router.reload``)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        if self.reloader is not None and not self._stop.is_set():
            self.reloader.request("sighup")

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        if self.dashboard is not None:
            # Ends the live streams, which would otherwise hold the drain below.
            await self.dashboard.close()
        if self._runner is not None:
            # Stops accepting, then waits up to drain_timeout for handlers.
            await self._runner.cleanup()
            self._runner = None
        if self.reloader is not None:
            # No request is in flight now: retired pools close at once.
            await self.reloader.close()
        if self.webhooks is not None:
            # After the listener: no ingest is in flight any more.
            await self.webhooks.stop()
            self.webhooks = None
        if self.discovery is not None:
            await self.discovery.stop()
        if self.migration is not None:
            # Moves in flight finish (a session is never left stopped half-way).
            await self.migration.close(within=self.config.failover.ready_timeout)
        if self.health is not None:
            await self.health.stop()
        if self.runtime is not None:
            await self.runtime.failover.close()
        if self.sync is not None:
            await self.sync.stop()
            self.sync = None
        if self.runtime is not None:
            await self.runtime.locks.close()
            await self.runtime.fleet.close()
            await self.runtime.smap.store.close()
        log.info("router stopped")

    async def run(self) -> None:
        # Before listening: a signal sent once the port is open is never fatal.
        self._install_signals()
        await self.startup()
        try:
            await self.serve()
        finally:
            await self.shutdown()

    # -- plumbing -------------------------------------------------------------
    async def _session_hint(self, session: str, instance: str) -> None:
        """A webhook announced where a session runs: a hint, probed before trusted."""
        if self.discovery is not None:
            await self.discovery.hint(session, instance)

    async def _claim_sessions(self, instance: str, sessions: list[str]) -> set[str]:
        """A starting Blazz instance asked its main app which accounts to restore
        (router.webhooks.mainapp): of ``sessions``, the ones it should run.

        Those the map gives it, and those no instance runs, mapped to it now,
        under each session's lock, so that two instances starting at once never
        both restore one. Unknown to the store (unreachable): not claimed."""
        rt = self.runtime
        assert rt is not None
        inst = rt.fleet.get(instance)
        if inst is None:
            return set()
        keep: set[str] = set()
        for session in sessions:
            try:
                valid_session_id(session)
                owner = await rt.smap.lookup(session)
                if owner == instance:
                    keep.add(session)
                elif owner is None:
                    async with rt.locks.hold(session, rt.config.failover.lock_ttl):
                        if await rt.smap.fetch(session) is None:
                            await rt.resolver.record(session, inst)
                            keep.add(session)
            except (BadSessionId, LockBusy, StoreUnavailable):
                continue  # not an id, someone is placing it, or nobody can say
        return keep

    def _config_applied(self, cfg: RouterConfig) -> None:
        """A reload put ``cfg`` in force (synchronously, with the runtime's switch)."""
        self.config = cfg
        relay_admin = getattr(self.webhooks, "admin", None)
        if relay_admin is not None and hasattr(relay_admin, "admin_key"):
            relay_admin.admin_key = cfg.admin_key  # one admin key for all of /admin
        if self.webhooks is not None:
            self.webhooks.apply_config(cfg)  # new instances may send webhooks at once

    def _dispatcher(
        self, proxy: ProxyHandler
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        runtime = self.runtime
        assert runtime is not None
        admin = AdminAPI(runtime)
        dashboard = self.dashboard = Dashboard(runtime, admin)

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            conn = request.protocol
            if type(conn) is GuardedHandler:
                conn.head_started = None  # the head is complete
                if conn.obsolete_http:
                    return error_response(
                        RouterError(400, "bad_request", "the request line has no HTTP/1.x version"),
                        request_id_of(request),
                    )
            path = request.path
            if path == "/healthz":
                return web.Response(body=b'{"status":"ok"}', content_type=_JSON)
            if path == "/readyz":
                return await self._readyz()
            if path == "/metrics":
                return _metrics_response(request)
            relay = self.webhooks
            if relay is not None and relay.handles(path):
                return await relay.handle(request)
            if path.startswith("/admin/") or path == "/admin":
                return await admin(request)
            if path.startswith("/dashboard/") or path == "/dashboard":
                return await dashboard(request)
            return await proxy(request)

        return dispatch

    async def _readyz(self) -> web.Response:
        rt = self.runtime
        assert rt is not None
        store_ok = await rt.smap.store.ping()
        healthy = [i.name for i in rt.fleet.healthy()]
        ready = store_ok and bool(healthy)
        # A runtime exists only once a config was loaded and validated.
        body = {"ready": ready, "config": True, "store": store_ok, "healthy_instances": healthy}
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


def _pacer(store: SessionStore) -> Pacer:
    """Pacing slots live beside the session map: on redis every replica shares
    them and they outlive restarts (router.pacing)."""
    if isinstance(store, RedisStore):
        return RedisPacer.for_store(store)
    return MemoryPacer()


def _metrics_response(request: web.BaseRequest) -> web.Response:
    # Prometheus text format (or OpenMetrics when the scraper asks for it).
    output, content_type = metrics_exposition(request.headers.get("Accept", ""))
    resp = web.Response(body=output)
    resp.headers["Content-Type"] = content_type
    return resp
