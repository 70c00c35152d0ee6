"""Which instance owns a session: cache, then store, then ask the instances.

Design principle 2, "never guess": a session nobody has mapped is looked for
on every reachable instance (the adapter's probe, in parallel) and only
recorded once an instance says it runs it. Concurrent requests for the same
unknown session share one lookup (single-flight).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from router.adapters.base import Adapter, SessionInfo, SessionStatus
from router.instances import Fleet, Instance
from router.removals import Removals
from router.sessionmap import SessionMap
from router.store.base import StoreUnavailable

log = logging.getLogger(__name__)

# A copy in one of these states runs on its instance.
RUNNING = frozenset({SessionStatus.READY, SessionStatus.STARTING, SessionStatus.NEEDS_AUTH})

# Order in which to prefer copies when a session answers on several instances.
_PREFERENCE = {
    SessionStatus.READY: 0,
    SessionStatus.STARTING: 1,
    SessionStatus.NEEDS_AUTH: 2,
    SessionStatus.FAILED: 3,
    SessionStatus.STOPPED: 4,
}


class Resolver:
    def __init__(self, smap: SessionMap, probe_timeout: float = 2.0) -> None:
        self.smap = smap
        self.probe_timeout = probe_timeout
        # Sessions removed on purpose are not looked for (router.removals).
        self.removals: Removals | None = None
        self._inflight: dict[str, asyncio.Future[Instance | None]] = {}

    async def owner(self, session: str, fleet: Fleet, adapter: Adapter) -> Instance | None:
        """The instance running ``session``, or None when it runs nowhere."""
        name = self.smap.cached(session)
        if name is not None:
            inst = fleet.get(name)
            if inst is not None:
                return inst
        pending = self._inflight.get(session)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Instance | None] = asyncio.get_running_loop().create_future()
        self._inflight[session] = fut
        try:
            inst = await self._resolve(session, fleet, adapter)
            fut.set_result(inst)
            return inst
        except BaseException as exc:
            fut.set_exception(exc)
            # Retrieve it so a lone waiter-less future does not log a warning.
            fut.exception()
            raise
        finally:
            del self._inflight[session]

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
        if self.removals is not None and await self.removals.is_removed(session):
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
            *(self.probe_info(inst, session, adapter) for inst in candidates)
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
        hits.sort(key=lambda h: _PREFERENCE.get(h[1].status, 9))
        return hits[0][0]

    async def probe_info(
        self, inst: Instance, session: str, adapter: Adapter
    ) -> SessionInfo | None:
        """``session`` as ``inst`` reports it; None when absent or unanswered."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                return await adapter.probe(inst.http, inst.config, session)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("probe of %s on %s failed: %r", session, inst.name, exc)
            return None

    async def probe_state(self, inst: Instance, session: str, adapter: Adapter) -> str:
        """Whether ``session`` runs on ``inst``: "running", "absent", "unreachable"
        (no connection: it cannot be running there) or "unknown" (no answer)."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                info = await adapter.probe(inst.http, inst.config, session)
        except aiohttp.ClientConnectorError:
            return "unreachable"
        except (aiohttp.ClientError, OSError, TimeoutError):
            return "unknown"
        return "running" if info is not None and info.status in RUNNING else "absent"

    async def confirm_absent(self, session: str, fleet: Fleet, adapter: Adapter) -> Instance | None:
        """Before a create places ``session``: ask every instance, healthy or not.

        Returns the instance that runs it, None when none does, and raises
        ``Unanswered`` when some instance could not say: "could not ask" is
        not "not running", and guessing starts a session twice.
        """
        instances = list(fleet)
        states = await asyncio.gather(*(self.probe_state(i, session, adapter) for i in instances))
        running = [i for i, st in zip(instances, states, strict=True) if st == "running"]
        if running:
            await self.record(session, running[0])
            return running[0]
        silent = [i.name for i, st in zip(instances, states, strict=True) if st == "unknown"]
        if silent:
            raise Unanswered(silent)
        return None


class Unanswered(Exception):
    """Some instances could not say whether they run a session."""

    def __init__(self, instances: list[str]) -> None:
        super().__init__(", ".join(instances))
        self.instances = instances
