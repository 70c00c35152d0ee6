"""The fleet: one ``Instance`` per upstream WhatsApp process.

An instance carries two independent flags (design principle 6): ``healthy``
comes from health checks and live traffic, ``admin`` from an operator.
Placement needs both; routing an existing session needs only reachability.
Each instance owns one upstream ``Transport`` for proxied requests (the lean
keep-alive client of ``router.transport.fast`` for plain HTTP) and one pooled
``aiohttp.ClientSession`` (``http``) for WebSockets, management calls and
whatever the transport does not cover.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from router.adapters.base import HealthReport
from router.config import InstanceConfig, RouterConfig
from router.transport import AiohttpTransport, Transport, make_transport


class AdminState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"


def make_http_session(config: RouterConfig) -> aiohttp.ClientSession:
    """A pooled client for one upstream.

    - ``keepalive_timeout`` below Node's 5 s so that *we* close idle sockets
      before the upstream does (a stale socket is the classic proxy 502);
    - no automatic decompression: ``Content-Encoding`` passes through untouched;
    - no cookie jar and no automatic headers: the client's headers go through as sent.
    """
    t = config.timeouts
    connector = aiohttp.TCPConnector(
        limit=config.limits.max_connections_per_instance,
        limit_per_host=0,
        keepalive_timeout=t.idle_keepalive,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=t.connect, sock_read=t.read),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        read_bufsize=2**16,
    )


class Instance:
    __slots__ = (
        "admin",
        "base",
        "checks_down",
        "config",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "healthy_since",
        "http",
        "last_health",
        "name",
        "transport",
    )

    def __init__(
        self,
        config: InstanceConfig,
        http: aiohttp.ClientSession,
        transport: Transport | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.base = URL(config.url.rstrip("/"))
        self.http = http
        # Proxied requests; without one of their own they go through ``http``.
        self.transport: Transport = transport or AiohttpTransport(http, config.url)
        self.healthy = True
        self.admin = AdminState.ACTIVE
        # Passive health (router.health.Outliers): consecutive failures seen in
        # live traffic, how often this instance was ejected, and until when.
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        # monotonic time it last came back, or joined by a reload; 0 = healthy
        # since start (no slow start).
        self.healthy_since = 0.0
        # What its last active health check said (None: none answered yet).
        self.last_health: HealthReport | None = None
        # Down by active health checks (it does not answer /health), as opposed
        # to ejected for errors while it still answers (then it may well still
        # run its sessions, and failover asks it first).
        self.checks_down = False

    @property
    def placeable(self) -> bool:
        return self.healthy and self.admin is AdminState.ACTIVE

    def url(self, path_qs: str) -> URL:
        return URL(str(self.base) + path_qs, encoded=True)

    async def close(self) -> None:
        await self.transport.close()
        await self.http.close()

    @property
    def pools(self) -> Pools:
        return Pools(self.http, self.transport)

    def __repr__(self) -> str:
        return f"<Instance {self.name} {self.base} healthy={self.healthy} {self.admin.value}>"


@dataclass(frozen=True, slots=True)
class Pools:
    """An instance's upstream connections: the proxy's transport and the aiohttp
    session (management calls, WebSockets). A reload that changes timeouts or
    limits gives an instance new ones; the old ones are closed once idle."""

    http: aiohttp.ClientSession
    transport: Transport

    @classmethod
    def build(cls, config: RouterConfig, inst: InstanceConfig) -> Pools:
        http = make_http_session(config)
        return cls(http, make_transport(config, inst, http))

    def busy(self) -> int:
        """Connections in use right now (requests, streams, WebSockets in flight)."""
        n = 0
        transport = self.transport
        open_conns = getattr(transport, "open_connections", None)
        idle_conns = getattr(transport, "idle_connections", None)
        if isinstance(open_conns, int) and isinstance(idle_conns, int):
            n += max(0, open_conns - idle_conns)
        # aiohttp has no public count of checked-out connections.
        n += len(getattr(self.http.connector, "_acquired", ()))
        return n

    async def close(self) -> None:
        await self.transport.close()
        await self.http.close()


def pool_settings(config: RouterConfig) -> tuple[object, ...]:
    """What an instance's pools are built from, besides its URL."""
    return (config.timeouts, config.limits.max_connections_per_instance)


@dataclass(slots=True)
class FleetChange:
    """A new fleet for a new config (``Fleet.plan``), not yet in force.

    ``commit()`` updates the instances that are kept (config, pools) in
    place, synchronously; the caller then swaps ``runtime.fleet`` for
    ``fleet``, with no await in between. ``retired`` are the pools nothing
    new will use: close them once the requests in flight on them are done.
    """

    fleet: Fleet
    added: list[str] = field(default_factory=list)
    # Gone from the config but still owning sessions: kept in ``fleet`` (to drain).
    removed: list[str] = field(default_factory=list)
    # Gone from the config and owning nothing: not in ``fleet``.
    dropped: list[str] = field(default_factory=list)
    # Same name, new URL: a new Instance (fresh health, same admin state).
    readdressed: list[str] = field(default_factory=list)
    # Kept instances whose settings changed: name -> changed fields.
    updated: dict[str, list[str]] = field(default_factory=dict)
    # Kept instances given new pools (timeouts or limits changed).
    repooled: list[str] = field(default_factory=list)
    retired: list[Pools] = field(default_factory=list)
    _swaps: list[tuple[Instance, InstanceConfig, Pools | None]] = field(default_factory=list)
    committed: bool = False

    @property
    def changed(self) -> bool:
        return bool(
            self.added
            or self.removed
            or self.dropped
            or self.readdressed
            or self.updated
            or self.repooled
        )

    def commit(self) -> None:
        for inst, cfg, pools in self._swaps:
            inst.config = cfg
            if pools is not None:
                inst.http, inst.transport = pools.http, pools.transport
        self.committed = True


class Fleet:
    """Instances by name, in config order."""

    def __init__(self) -> None:
        self._by_name: dict[str, Instance] = {}
        # The pool settings (timeouts, limits) the instances were built with.
        self._settings: tuple[object, ...] | None = None

    @classmethod
    def build(cls, config: RouterConfig) -> Fleet:
        fleet = cls()
        fleet._settings = pool_settings(config)
        for inst_cfg in config.instances:
            http = make_http_session(config)
            fleet._by_name[inst_cfg.name] = Instance(
                inst_cfg, http, make_transport(config, inst_cfg, http)
            )
        return fleet

    def get(self, name: str) -> Instance | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Instance]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def healthy(self) -> list[Instance]:
        return [i for i in self._by_name.values() if i.healthy]

    @classmethod
    def of(cls, instances: Iterable[Instance]) -> Fleet:
        fleet = cls()
        for inst in instances:
            fleet._by_name[inst.name] = inst
        return fleet

    def without(self, name: str) -> Fleet:
        """A new fleet, this one minus ``name`` (a fleet in force is never mutated)."""
        fleet = Fleet.of(i for i in self._by_name.values() if i.name != name)
        fleet._settings = self._settings
        return fleet

    def plan(self, config: RouterConfig, keep: Callable[[Instance], bool]) -> FleetChange:
        """The fleet ``config`` describes, reusing what can be reused.

        An instance whose name and URL are unchanged stays the same object
        (health, admin state, ejections and its pools carry over; new pools
        only if timeouts or limits changed); a name with a new URL is a new
        object with the old admin state; a new name, a new instance. An
        instance gone from the config stays, after the configured ones, when
        ``keep(inst)`` (it still owns sessions: the caller drains it), else
        it is dropped. Nothing in force changes until ``commit()``.
        """
        repool = self._settings != pool_settings(config)
        change = FleetChange(Fleet())
        by_name = change.fleet._by_name
        for cfg in config.instances:
            old = self._by_name.get(cfg.name)
            if old is None:
                pools = Pools.build(config, cfg)
                inst = Instance(cfg, pools.http, pools.transport)
                # A new process joining a running fleet takes new sessions with
                # slow start (router.placement), not every create at once.
                inst.healthy_since = time.monotonic()
                by_name[cfg.name] = inst
                change.added.append(cfg.name)
            elif old.config.url != cfg.url:
                pools = Pools.build(config, cfg)
                inst = Instance(cfg, pools.http, pools.transport)
                inst.admin = old.admin
                inst.healthy_since = time.monotonic()
                by_name[cfg.name] = inst
                change.readdressed.append(cfg.name)
                change.retired.append(old.pools)
            else:
                fields = [
                    f
                    for f in ("max_sessions", "weight", "api_key", "labels")
                    if getattr(old.config, f) != getattr(cfg, f)
                ]
                if fields:
                    change.updated[cfg.name] = fields
                new_pools: Pools | None = None
                if repool:
                    new_pools = Pools.build(config, cfg)
                    change.retired.append(old.pools)
                    change.repooled.append(cfg.name)
                if fields or new_pools is not None:
                    change._swaps.append((old, cfg, new_pools))
                by_name[cfg.name] = old
        for name, old in self._by_name.items():
            if name in by_name:
                continue
            if keep(old):
                by_name[name] = old
                change.removed.append(name)
            else:
                change.dropped.append(name)
                change.retired.append(old.pools)
        change.fleet._settings = pool_settings(config)
        return change

    async def close(self) -> None:
        for inst in self._by_name.values():
            await inst.close()
