"""The config in force, as one immutable value, and the one place it is swapped.

A request takes ``live.snap`` once when it arrives and reads only that for
the rest of its life, so a reload landing while it awaits never mixes two
configs, adapters, fleets or key sets in one request. Background services
(failover, discovery, migration) take a fresh one per operation the same
way. Only the reloader assigns ``live.snap``, in one statement.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.adapters.base import Adapter
from router.config import RouterConfig
from router.instances import Fleet
from router.scoping import ClientKeys


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: RouterConfig
    adapter: Adapter
    fleet: Fleet
    api_keys: frozenset[str]
    # The same keys with the sessions each may reach (router.scoping).
    clients: ClientKeys

    @classmethod
    def of(cls, config: RouterConfig, adapter: Adapter, fleet: Fleet) -> Snapshot:
        clients = ClientKeys(config.api_keys)
        return cls(config, adapter, fleet, clients.keys, clients)


class Live:
    """Holds the snapshot in force; every service shares one."""

    __slots__ = ("snap",)

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
