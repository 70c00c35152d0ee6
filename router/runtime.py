"""Everything a request needs, behind one reference that a reload swaps.

The proxy reads ``runtime.config``, ``runtime.adapter`` and ``runtime.fleet``
once per request; a reload builds new ones and assigns them, so a request
in flight keeps a consistent set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.adapters.base import Adapter
from router.config import RouterConfig
from router.events import EventLog
from router.failover import Failover
from router.health import Outliers
from router.idempotency import IdempotencyStore, MemoryIdempotency
from router.instances import Fleet, Instance
from router.locks import LocalLocks, SessionLocks
from router.placement import Reservations, choose
from router.removals import Removals
from router.resolver import Resolver
from router.retry import RetryBudget
from router.sessionmap import SessionMap

if TYPE_CHECKING:
    from router.discovery import Discovery
    from router.migration import Migration
    from router.reload import Reloader


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a request reads of the config in force, as one immutable value:
    a reload builds a new one and swaps the reference in one statement, so a
    request that took one at its start never mixes two configs, adapters or
    key sets, whatever it awaits meanwhile."""

    config: RouterConfig
    adapter: Adapter
    fleet: Fleet
    api_keys: frozenset[str]

    @classmethod
    def of(cls, config: RouterConfig, adapter: Adapter, fleet: Fleet) -> Snapshot:
        return cls(config, adapter, fleet, frozenset(config.api_keys))


@dataclass(slots=True)
class Runtime:
    snap: Snapshot
    smap: SessionMap
    resolver: Resolver
    # Per-session restore locks: in-process, or Redis-backed with several replicas.
    locks: SessionLocks = field(default_factory=LocalLocks)
    # Recent failovers, health changes and moves, for the admin API and dashboard.
    events: EventLog = field(default_factory=EventLog)
    reservations: Reservations = field(default_factory=Reservations)
    idempotency: IdempotencyStore = field(default_factory=MemoryIdempotency)
    budget: RetryBudget = field(default_factory=RetryBudget)
    # Built from the runtime itself, right after it (see ``Runtime.create``).
    failover: Failover = field(init=False)
    outliers: Outliers = field(init=False)
    removals: Removals = field(init=False)
    # Rediscovery / reconcile and drain / move, set by the server at start
    # (they outlive a reload: each reads the current runtime through a getter).
    discovery: Discovery | None = None
    migration: Migration | None = None
    # Live config reload (SIGHUP, POST /admin/reload, file watch); set by the server.
    reloader: Reloader | None = None
    # Sessions an operator pinned to their instance (POST /admin/sessions/{s}/pin):
    # rebalancing leaves them where they are. In process, like admin state.
    pins: set[str] = field(default_factory=set)
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    # The current snapshot's parts, for services that act on the config in
    # force (a request reads its own ``snap`` once instead).
    @property
    def config(self) -> RouterConfig:
        return self.snap.config

    @property
    def adapter(self) -> Adapter:
        return self.snap.adapter

    @property
    def fleet(self) -> Fleet:
        return self.snap.fleet

    @property
    def api_keys(self) -> frozenset[str]:
        return self.snap.api_keys

    def any_instance(self, exclude: Instance | None = None) -> Instance | None:
        """A healthy instance for a request that names no session (round robin)."""
        healthy = [i for i in self.fleet.healthy() if i is not exclude]
        if not healthy:
            return None
        return healthy[next(self._rr) % len(healthy)]

    def place(self, exclude: frozenset[str] = frozenset()) -> Instance | None:
        """Where a new (or restored) session should start: least loaded, with
        pending placements and slow start of recovered instances counted."""
        return choose(
            self.fleet,
            self.reservations.with_counts(self.smap.counts()),
            exclude=exclude,
            slow_start=self.config.outlier.slow_start,
        )

    def __post_init__(self) -> None:
        self.removals = Removals(self.smap, self.events)
        self.resolver.removals = self.removals
        self.failover = Failover(self)
        self.outliers = Outliers(lambda: (self.fleet, self.config.outlier), self.events)
        self.budget.ratio = self.config.failover.retry_budget
