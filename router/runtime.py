"""Everything a request needs, behind one reference that a reload swaps.

The proxy reads ``runtime.config``, ``runtime.adapter`` and ``runtime.fleet``
once per request; a reload builds new ones and assigns them, so a request
in flight keeps a consistent set.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from router.adapters.base import Adapter
from router.config import RouterConfig
from router.events import EventLog
from router.instances import Fleet, Instance
from router.locks import LocalLocks, SessionLocks
from router.placement import Reservations
from router.resolver import Resolver
from router.sessionmap import SessionMap


@dataclass(slots=True)
class Runtime:
    config: RouterConfig
    adapter: Adapter
    fleet: Fleet
    smap: SessionMap
    resolver: Resolver
    api_keys: frozenset[str] = frozenset()
    # Per-session restore locks: in-process, or Redis-backed with several replicas.
    locks: SessionLocks = field(default_factory=LocalLocks)
    # Recent failovers, health changes and moves, for the admin API and dashboard.
    events: EventLog = field(default_factory=EventLog)
    reservations: Reservations = field(default_factory=Reservations)
    # One create per session name at a time, so two concurrent creates of
    # the same session cannot start it on two instances.
    create_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    def any_instance(self) -> Instance | None:
        """A healthy instance for a request that names no session (round robin)."""
        healthy = self.fleet.healthy()
        if not healthy:
            return None
        return healthy[next(self._rr) % len(healthy)]
