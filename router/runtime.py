"""The services of one router process, built in one place (``Runtime.build``).

``build`` is the composition root: it creates each service with the few
things it uses (the live snapshot, the session map, the resolver, the
locks, the event log ...) and nothing else; no service reaches back into
the Runtime. The Runtime itself is what the edges hold: the proxy, the
admin API, the dashboard and the reloader, which act on all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.adapters.base import Adapter
from router.config import RouterConfig
from router.discovery import Discovery
from router.events import EventLog
from router.failover import Failover
from router.health import Outliers
from router.idempotency import IdempotencyStore
from router.instances import Fleet
from router.locks import SessionLocks
from router.migration import Migration
from router.pacing import MemoryPacer, Pacer
from router.placement import Placer
from router.probe import Probe
from router.removals import Removals
from router.resolver import Resolver
from router.retry import RetryBudget
from router.sessionmap import SessionMap
from router.snapshot import Live, Snapshot

if TYPE_CHECKING:
    from router.reload import Reloader


@dataclass(slots=True, eq=False)
class Runtime:
    live: Live
    smap: SessionMap
    resolver: Resolver
    # Per-session restore locks: in-process, or Redis-backed with several replicas.
    locks: SessionLocks
    # Recent failovers, health changes and moves, for the admin API and dashboard.
    events: EventLog
    placer: Placer
    removals: Removals
    failover: Failover
    outliers: Outliers
    migration: Migration
    discovery: Discovery
    idempotency: IdempotencyStore
    budget: RetryBudget
    # Sessions an operator pinned to their instance (POST /admin/sessions/{s}/pin):
    # rebalancing leaves them where they are. In process, like admin state.
    pins: set[str]
    # Live config reload (SIGHUP, POST /admin/reload, file watch); set by the
    # server, since it needs the runtime it reloads.
    reloader: Reloader | None = field(default=None)
    # Send pacing slots (router.pacing): in memory, or in redis for every replica.
    pacer: Pacer = field(default_factory=MemoryPacer)

    @classmethod
    def build(
        cls,
        config: RouterConfig,
        adapter: Adapter,
        fleet: Fleet,
        *,
        smap: SessionMap,
        locks: SessionLocks,
        idempotency: IdempotencyStore,
        pacer: Pacer | None = None,
    ) -> Runtime:
        live = Live(Snapshot.of(config, adapter, fleet))
        events = EventLog()
        removals = Removals(smap, events)
        probe = Probe()
        probe.configure(config)
        resolver = Resolver(smap, probe, removals)
        placer = Placer(live, smap, events)
        failover = Failover(live, smap, resolver, locks, placer, removals, events)
        pins: set[str] = set()
        migration = Migration(live, smap, resolver, locks, placer, failover, events, pins=pins)
        discovery = Discovery(
            live,
            smap,
            resolver,
            locks,
            removals,
            events,
            busy=lambda session: migration.active(session) or failover.recovering(session),
            rebalance=migration.rebalance,
        )
        return cls(
            live=live,
            smap=smap,
            resolver=resolver,
            locks=locks,
            events=events,
            placer=placer,
            removals=removals,
            failover=failover,
            outliers=Outliers(live, events),
            migration=migration,
            discovery=discovery,
            idempotency=idempotency,
            budget=RetryBudget(config.failover.retry_budget),
            pins=pins,
            pacer=pacer or MemoryPacer(),
        )

    # The snapshot in force and its parts, for the edges that act on the
    # current config (a request reads its own ``snap`` once instead).
    @property
    def snap(self) -> Snapshot:
        return self.live.snap

    @property
    def config(self) -> RouterConfig:
        return self.live.snap.config

    @property
    def adapter(self) -> Adapter:
        return self.live.snap.adapter

    @property
    def fleet(self) -> Fleet:
        return self.live.snap.fleet

    @property
    def api_keys(self) -> frozenset[str]:
        return self.live.snap.api_keys
