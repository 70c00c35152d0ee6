"""A real router (``router.server.Server``) on a real socket, for end-to-end tests.

async def test_x(sim_fleet, start_router):
    fleet = sim_fleet(3, api_key="inst-key")
    router = await start_router(fleet.urls, names=[p.name for p in fleet])
    async with router.client() as http:
        await http.get(router.url + "/api/s1/me")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest

from router.config import (
    AdapterConfig,
    ClientKey,
    DiscoveryConfig,
    FailoverConfig,
    HealthConfig,
    InstanceConfig,
    Limits,
    ListenConfig,
    RouterConfig,
    StoreConfig,
    Timeouts,
)
from router.runtime import Runtime
from router.server import Server
from tests.support.simulator import SimFleet

ROUTER_KEY = "router-key"
INSTANCE_KEY = "inst-key"


@dataclasses.dataclass
class RouterHandle:
    server: Server
    url: str
    key: str | None

    @property
    def runtime(self) -> Runtime:
        assert self.server.runtime is not None
        return self.server.runtime

    def client(self, **kwargs: Any) -> aiohttp.ClientSession:
        headers = {"X-Api-Key": self.key} if self.key else {}
        headers.update(kwargs.pop("headers", {}))
        return aiohttp.ClientSession(headers=headers, auto_decompress=False, **kwargs)


def router_config(
    urls: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    adapter: str = "waha",
    adapter_options: dict[str, Any] | None = None,
    instance_key: str | None = INSTANCE_KEY,
    instance_keys: Sequence[str] | None = None,
    router_key: str | None = ROUTER_KEY,
    max_sessions: int | Sequence[int] = 1000,
    weights: Sequence[float] | None = None,
    store: str = "memory",
    key_prefix: str = "wa-router:",
    timeouts: Timeouts | None = None,
    limits: Limits | None = None,
    health: HealthConfig | None = None,
    admin_key: str | None = None,
    discovery: DiscoveryConfig | None = None,
    failover: FailoverConfig | None = None,
) -> RouterConfig:
    caps = [max_sessions] * len(urls) if isinstance(max_sessions, int) else list(max_sessions)
    return RouterConfig(
        instances=tuple(
            InstanceConfig(
                name=names[i] if names else f"wa-{i + 1}",
                url=url,
                max_sessions=caps[i],
                weight=weights[i] if weights else 1.0,
                api_key=instance_keys[i] if instance_keys is not None else instance_key,
            )
            for i, url in enumerate(urls)
        ),
        listen=ListenConfig("127.0.0.1", 0),
        adapter=AdapterConfig(adapter, adapter_options or {}),
        store=StoreConfig(url=store, key_prefix=key_prefix),
        timeouts=timeouts or Timeouts(connect=1.0, read=5.0, idle_keepalive=4.0),
        limits=limits or Limits(),
        health=health or HealthConfig(interval=0.2, timeout=0.5, rise=1, fall=2),
        api_keys=(ClientKey(router_key),) if router_key else (),
        admin_key=admin_key,
        # No periodic reconcile unless a test asks: rounds are driven explicitly.
        discovery=discovery or DiscoveryConfig(interval=0),
        failover=failover or FailoverConfig(),
    )


StartRouter = Callable[..., Awaitable[RouterHandle]]


async def create_ready(
    http: aiohttp.ClientSession,
    router: RouterHandle,
    fleet: SimFleet,
    name: str,
    *,
    wait: bool = True,
) -> str:
    """Create WAHA session ``name`` through the router (201); its owner, once
    the owner runs it (unless not ``wait``)."""
    async with http.post(f"{router.url}/api/sessions", json={"name": name}) as resp:
        assert resp.status == 201, await resp.text()
    owner = router.runtime.smap.cached(name)
    assert owner is not None
    if wait:
        await fleet.by_name(owner).wait_session(name)
    return owner


def next_event(
    rt: Runtime, kind: str, *, within: float, seen: bool = False, **match: Any
) -> asyncio.Task[float]:
    """Subscribe to ``rt``'s events now, before the caller acts (kills, pauses):
    the task ends with ``time.monotonic()`` when the next event of exactly
    ``kind`` whose fields equal ``match`` came, or times out after ``within`` s.
    With ``seen``, one already in the event log counts too (ends at once).
    """
    queue = rt.events.subscribe()

    def matches(event: dict[str, Any]) -> bool:
        return event["kind"] == kind and all(event.get(k) == v for k, v in match.items())

    already = seen and any(matches(e) for e in rt.events.recent(kind=kind))

    async def wait() -> float:
        try:
            if not already:
                async with asyncio.timeout(within):
                    while not matches(await queue.get()):
                        pass
            return time.monotonic()
        finally:
            rt.events.unsubscribe(queue)

    return asyncio.ensure_future(wait())


@pytest.fixture
async def start_router() -> AsyncIterator[StartRouter]:
    """``await start_router(urls, **router_config_kwargs)`` or ``start_router(config=cfg)``."""
    servers: list[Server] = []

    async def start(
        urls: Sequence[str] = (), *, config: RouterConfig | None = None, **kwargs: Any
    ) -> RouterHandle:
        cfg = config or router_config(urls, **kwargs)
        server = Server(cfg, drain_timeout=2.0)
        servers.append(server)
        await server.startup()
        key = cfg.api_keys[0].key if cfg.api_keys else None
        return RouterHandle(server, f"http://127.0.0.1:{server.port}", key)

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            await server.shutdown()
