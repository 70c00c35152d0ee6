"""The fleet: one ``Instance`` per upstream WhatsApp process.

An instance carries two independent flags (design principle 6): ``healthy``
comes from health checks and live traffic, ``admin`` from an operator.
Placement needs both; routing an existing session needs only reachability.
Each instance owns one pooled ``aiohttp.ClientSession``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import aiohttp
from yarl import URL

from router.config import InstanceConfig, RouterConfig


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
        "config",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "healthy_since",
        "http",
        "name",
    )

    def __init__(self, config: InstanceConfig, http: aiohttp.ClientSession) -> None:
        self.name = config.name
        self.config = config
        self.base = URL(config.url.rstrip("/"))
        self.http = http
        self.healthy = True
        self.admin = AdminState.ACTIVE
        # Passive health (router.health.Outliers): consecutive failures seen in
        # live traffic, how often this instance was ejected, and until when.
        self.failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        # monotonic time it last came back; 0 = healthy since start (no slow start).
        self.healthy_since = 0.0

    @property
    def placeable(self) -> bool:
        return self.healthy and self.admin is AdminState.ACTIVE

    def url(self, path_qs: str) -> URL:
        return URL(str(self.base) + path_qs, encoded=True)

    def __repr__(self) -> str:
        return f"<Instance {self.name} {self.base} healthy={self.healthy} {self.admin.value}>"


class Fleet:
    """Instances by name, in config order."""

    def __init__(self) -> None:
        self._by_name: dict[str, Instance] = {}

    @classmethod
    def build(cls, config: RouterConfig) -> Fleet:
        fleet = cls()
        for inst_cfg in config.instances:
            fleet._by_name[inst_cfg.name] = Instance(inst_cfg, make_http_session(config))
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

    async def close(self) -> None:
        for inst in self._by_name.values():
            await inst.http.close()
