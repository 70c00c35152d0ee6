"""Which instance owns a session: cache, then store, then ask the instances.

Design principle 2, "never guess": a session nobody has mapped is looked for
on every reachable instance (the adapter's probe, in parallel) and only
recorded once an instance says it runs it. Concurrent requests for the same
unknown session share one lookup (single-flight).
"""

from __future__ import annotations

import asyncio
import logging

from router.adapters.base import Adapter
from router.instances import Fleet, Instance
from router.probe import PREFERENCE, Probe, ProbeState
from router.removals import Removals
from router.sessionmap import SessionMap
from router.singleflight import SingleFlight
from router.store.base import StoreUnavailable

log = logging.getLogger(__name__)


class Resolver:
    def __init__(self, smap: SessionMap, probe: Probe, removals: Removals) -> None:
        self.smap = smap
        self.probe = probe
        # Sessions removed on purpose are not looked for (router.removals).
        self.removals = removals
        self._lookups: SingleFlight[str, Instance | None] = SingleFlight("locate")

    async def owner(self, session: str, fleet: Fleet, adapter: Adapter) -> Instance | None:
        """The instance running ``session``, or None when it runs nowhere."""
        name = self.smap.cached(session)
        if name is not None:
            inst = fleet.get(name)
            if inst is not None:
                return inst
        return await self._lookups.run(session, lambda: self._resolve(session, fleet, adapter))

    async def _resolve(self, session: str, fleet: Fleet, adapter: Adapter) -> Instance | None:
        try:
            name = await self.smap.fetch(session)
        except StoreUnavailable:
            log.warning("session store unavailable; locating %s by asking instances", session)
            name = None
        if name is not None:
            inst = fleet.get(name)
            if inst is not None:
                return inst
        if await self.removals.is_removed(session):
            return None
        found = await self.locate(session, fleet, adapter)
        if found is not None:
            await self.record(session, found)
        return found

    async def record(self, session: str, inst: Instance) -> None:
        try:
            await self.smap.assign(session, inst.name)
        except StoreUnavailable:
            # assign() updated this replica's cache before the store failed:
            # keep serving; the next reconcile writes the entry back.
            log.warning(
                "session store unavailable; %s -> %s kept in cache only", session, inst.name
            )

    async def locate(self, session: str, fleet: Fleet, adapter: Adapter) -> Instance | None:
        """Probe every healthy instance in parallel; the best copy wins."""
        return await self.locate_among(session, fleet.healthy(), adapter)

    async def locate_among(
        self, session: str, candidates: list[Instance], adapter: Adapter
    ) -> Instance | None:
        if not candidates:
            return None
        results = await asyncio.gather(
            *(self.probe.info(adapter, inst, session) for inst in candidates)
        )
        hits = [(inst, info) for inst, info in zip(candidates, results, strict=True) if info]
        if not hits:
            return None
        if len(hits) > 1:
            log.warning(
                "session %s runs on %d instances: %s",
                session,
                len(hits),
                ", ".join(i.name for i, _ in hits),
            )
        hits.sort(key=lambda h: PREFERENCE.get(h[1].status, 9))
        return hits[0][0]

    async def confirm_absent(self, session: str, fleet: Fleet, adapter: Adapter) -> Instance | None:
        """Before a create places ``session``: ask every instance, healthy or not.

        Returns the instance that runs it, None when none does, and raises
        ``Unanswered`` when some instance could not say: "could not ask" is
        not "not running", and guessing starts a session twice.
        """
        instances = list(fleet)
        states = await asyncio.gather(*(self.probe.state(adapter, i, session) for i in instances))
        running = [i for i, st in zip(instances, states, strict=True) if st is ProbeState.RUNNING]
        if running:
            await self.record(session, running[0])
            return running[0]
        silent = [
            i.name for i, st in zip(instances, states, strict=True) if st is ProbeState.UNKNOWN
        ]
        if silent:
            raise Unanswered(silent)
        return None


class Unanswered(Exception):
    """Some instances could not say whether they run a session."""

    def __init__(self, instances: list[str]) -> None:
        super().__init__(", ".join(instances))
        self.instances = instances
