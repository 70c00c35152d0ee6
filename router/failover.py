"""Transparent failover: bring a session back when its owner fails it.

Once per session however many requests wait (single-flight, as a task that
outlives any one client), bounded in time:

1. ask the other healthy instances whether the session runs there; if so,
   move the map entry;
2. otherwise, under the session's lock (Redis-backed across replicas),
   restore it on the healthy instance with the lowest load, wait until it
   reports ready, and move the map entry;
3. the caller then replays its request if that is safe (``router.retry``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from router.adapters.base import SessionStatus
from router.events import EventLog
from router.instances import Instance
from router.locks import LockBusy, SessionLocks
from router.metrics import FAILOVERS, RESTORE_DURATION
from router.placement import Placer
from router.probe import ProbeState
from router.readiness import Readiness
from router.removals import Removals
from router.resolver import Resolver
from router.restore import start_and_wait, with_notes
from router.sessionmap import SessionMap
from router.singleflight import SingleFlight
from router.snapshot import Live
from router.store.base import StoreUnavailable

log = logging.getLogger(__name__)

# Why a recovery started: the ``reason`` label of wa_router_failovers_total.
REASONS = ("owner_down", "connect_failed", "session_missing")


class Failover:
    def __init__(
        self,
        live: Live,
        smap: SessionMap,
        resolver: Resolver,
        locks: SessionLocks,
        placer: Placer,
        removals: Removals,
        events: EventLog,
    ) -> None:
        self.live = live
        self.smap = smap
        self.resolver = resolver
        self.locks = locks
        self.placer = placer
        self.removals = removals
        self.events = events
        self._recoveries: SingleFlight[str, Instance | None] = SingleFlight("failover")
        self._evacuating: dict[str, asyncio.Task[int]] = {}
        # Sessions the router started, until their instance reports them READY.
        cfg = live.snap.config.failover
        self.readiness = Readiness(
            live,
            resolver.probe,
            events,
            owner_of=smap.peek,
            limit=max(cfg.wait, cfg.ready_timeout) * 10,
        )
        # instance -> sessions brought back elsewhere while it could not answer:
        # if it was only hung, it still runs them (two browsers on one phone),
        # so they are stopped there before it is routed to again (``fence``).
        self.moved_off: dict[str, set[str]] = {}

    def recovering(self, session: str) -> bool:
        return self._recoveries.running(session)

    def evacuate_soon(self, inst: Instance) -> None:
        """Recover every session of a down instance in the background."""
        if not self.live.snap.config.failover.evacuate_down or inst.name in self._evacuating:
            return
        task = asyncio.create_task(self.evacuate(inst), name=f"evacuate:{inst.name}")
        self._evacuating[inst.name] = task
        task.add_done_callback(lambda _: self._evacuating.pop(inst.name, None))

    async def evacuate(self, inst: Instance) -> int:
        """Bring back, elsewhere, every session mapped to ``inst``; the number recovered.

        Requests drive failover for busy sessions; this covers the idle ones
        (a session that only receives messages sends no request). Each goes
        through the same single-flight recovery, so a request arriving
        meanwhile waits for the same restore.
        """
        cfg = self.live.snap.config.failover
        sessions = self.smap.sessions_on(inst.name)
        if not sessions:
            return 0
        log.warning("instance %s is down: recovering its %d sessions", inst.name, len(sessions))
        self.events.add("evacuate", instance=inst.name, sessions=len(sessions))
        gate = asyncio.Semaphore(max(1, cfg.evacuate_concurrency))

        async def one(session: str) -> bool:
            async with gate:
                # Stop if the instance came back or the session moved meanwhile.
                if inst.healthy or self.smap.peek(session) != inst.name:
                    return False
                # Wait for the restore itself, not for a client's bounded wait:
                # the gate must bound restores actually running.
                task = self._task(session, inst, "owner_down", exclude_failed=True)
                return await asyncio.shield(task) is not None

        results = await asyncio.gather(*(one(s) for s in sessions))
        return sum(results)

    async def close(self) -> None:
        await self.readiness.close()
        tasks = [*self._evacuating.values(), *self._recoveries.tasks()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def recover(
        self, session: str, failed: Instance | None, reason: str, *, exclude_failed: bool
    ) -> Instance | None:
        """The session's new owner, or None if it could not be brought back in time.

        ``exclude_failed``: the instance itself is gone (do not restore there);
        otherwise it only lacked the session and may host it again.
        """
        task = self._task(session, failed, reason, exclude_failed)
        try:
            return await asyncio.wait_for(
                asyncio.shield(task), timeout=self.live.snap.config.failover.wait
            )
        except TimeoutError:
            return None

    def _task(
        self, session: str, failed: Instance | None, reason: str, exclude_failed: bool
    ) -> asyncio.Task[Instance | None]:
        """The one recovery task of ``session`` (single-flight)."""
        return self._recoveries.task(
            session, lambda: self._recover(session, failed, reason, exclude_failed)
        )

    async def _recover(
        self, session: str, failed: Instance | None, reason: str, exclude_failed: bool
    ) -> Instance | None:
        snap = self.live.snap
        started = time.monotonic()
        exclude = frozenset({failed.name}) if failed is not None and exclude_failed else frozenset()
        failed_name = failed.name if failed is not None else None
        if await self.removals.is_removed(session):
            # A client deleted, stopped or logged it out: gone on purpose.
            self._event(session, failed_name, None, reason, "removed", started)
            return None
        try:
            others = [
                i for i in snap.fleet.healthy() if i.name not in exclude and i.name != failed_name
            ]
            found = await self.resolver.locate_among(session, others, snap.adapter)
            if found is not None:
                await self.resolver.record(session, found)
                self._moved_off(failed, exclude_failed, session)
                self._event(session, failed_name, found.name, reason, "found_elsewhere", started)
                return found
            if failed is not None and exclude_failed and not failed.checks_down:
                # Before starting it elsewhere, make sure the owner is really
                # gone: an instance ejected for errors, slow, or with a full
                # pool may still run the session (two browsers on one phone).
                # One that health checks took down does not answer anything:
                # asking would only cost the probe timeout per session, and
                # it is fenced before it serves again.
                state = await self._owner_state(failed, session)
                if state is ProbeState.RUNNING:
                    self._event(session, failed_name, failed_name, reason, "owner_alive", started)
                    return failed
                if state is ProbeState.UNKNOWN and failed.healthy:
                    self._event(session, failed_name, None, reason, "owner_unknown", started)
                    return None
            target = await self._restore(session, exclude, failed_name, started)
            if target is not None:
                self._moved_off(failed, exclude_failed, session)
            self._event(
                session,
                failed_name,
                target.name if target else None,
                reason,
                "restored" if target else "failed",
                started,
            )
            return target
        except Exception:
            log.exception("failover of %s failed", session)
            self._event(session, failed_name, None, reason, "error", started)
            return None

    def _moved_off(self, failed: Instance | None, gone: bool, session: str) -> None:
        if failed is not None and gone:
            self.moved_off.setdefault(failed.name, set()).add(session)

    async def fence(self, inst: Instance) -> bool:
        """Before ``inst`` serves again after being down: stop the sessions that
        were brought back elsewhere meanwhile (whatever discovery.stop_duplicates
        says). What it accepted before it hung is its own business: nothing is
        replayed. True when it may serve (nothing left to stop)."""
        sessions = self.moved_off.get(inst.name)
        if not sessions:
            return True
        snap = self.live.snap
        adapter = snap.adapter
        gate = asyncio.Semaphore(8)

        async def stop(session: str) -> bool:
            if self.smap.peek(session) == inst.name:
                return True  # it was moved back here since: nothing to fence
            if not adapter.can_stop:
                self.events.add("fence_impossible", session=session, instance=inst.name)
                log.error(
                    "%s may still run %s (moved away while it was down) and the %s API"
                    " cannot stop a session without logging it out",
                    inst.name,
                    session,
                    adapter.name,
                )
                return True
            async with gate:
                try:
                    async with asyncio.timeout(self.resolver.probe.timeout * 2):
                        stopped = await adapter.stop(inst.http, inst.config, session)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    stopped = False
            if stopped:
                self.events.add(
                    "fenced", session=session, instance=inst.name, owner=self.smap.peek(session)
                )
                log.warning("fenced %s off %s (it runs elsewhere now)", session, inst.name)
            return stopped

        order = sorted(sessions)
        results = await asyncio.gather(*(stop(s) for s in order))
        for session, done in zip(order, results, strict=True):
            if done:
                sessions.discard(session)
        if sessions:
            return False
        self.moved_off.pop(inst.name, None)
        return True

    async def _owner_state(self, inst: Instance, session: str) -> ProbeState:
        return await self.resolver.probe.state(self.live.snap.adapter, inst, session)

    async def _restore(
        self, session: str, exclude: frozenset[str], failed_name: str | None, started: float
    ) -> Instance | None:
        snap = self.live.snap
        cfg = snap.config.failover
        try:
            async with self.locks.hold(session, cfg.lock_ttl):
                moved = await self._moved_by_other(session, exclude, failed_name)
                if moved is not None:
                    return moved
                # Within the session's selector when an instance in it has
                # room; outside it (soft) or nowhere (strict) otherwise, which
                # the placer records (router.placement).
                choice = await self.placer.choice_of(session)
                target = self.placer.place(exclude, choice, action="failover", session=session)
                if target is None:
                    log.warning("no healthy instance with capacity to restore %s", session)
                    return None
                with self.placer.reserved(target):
                    known = await with_notes(self.smap.store, session, None)
                    info = await start_and_wait(
                        snap.adapter,
                        target,
                        session,
                        known,
                        cfg.ready_timeout,
                        events=self.events,
                    )
                if info is None:
                    return await self._settle_failed_start(session, target, started)
                await self.adopt(session, target, started, info.status)
                return target
        except LockBusy:
            return await self._await_other_replica(session, exclude, failed_name)
        except StoreUnavailable:
            # No cross-replica lock: starting a session twice (two browsers
            # on one phone) is worse than a 503, so do not restore blind.
            log.warning("cannot lock %s (store unavailable): not restoring", session)
            return None

    async def adopt(
        self, session: str, inst: Instance, started: float, status: SessionStatus
    ) -> None:
        """The copy the router started on ``inst`` is the session's: mapped,
        and requests held until it is READY (router.readiness). ``started``:
        when the recovery or move began; ``status``: what ``inst`` reports."""
        await self.resolver.record(session, inst)
        self.readiness.track(session, inst, started=started, status=status)

    async def _settle_failed_start(
        self, session: str, target: Instance, started: float
    ) -> Instance | None:
        """A start that did not settle in time must not leave an unmapped copy:
        map it if it runs after all, else stop it."""
        snap = self.live.snap
        state = await self._owner_state(target, session)
        if state is ProbeState.RUNNING:
            await self.adopt(session, target, started, SessionStatus.STARTING)
            return target
        if state is not ProbeState.UNREACHABLE:
            try:
                async with asyncio.timeout(self.resolver.probe.timeout):
                    await snap.adapter.stop(target.http, target.config, session)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning(
                    "could not stop the unsettled copy of %s on %s: %r", session, target.name, exc
                )
        return None

    async def _moved_by_other(
        self, session: str, exclude: frozenset[str], failed_name: str | None
    ) -> Instance | None:
        """Another replica may have recovered the session while we waited for the lock."""
        try:
            # The store, not the cache: under the lock, the cache may still name
            # the failed owner if another replica's change has not reached us yet.
            owner = await self.smap.store.get(session)
        except StoreUnavailable:
            return None
        if owner is None or owner in exclude or owner == failed_name:
            return None
        inst = self.live.snap.fleet.get(owner)
        return inst if inst is not None and inst.healthy else None

    async def _await_other_replica(
        self, session: str, exclude: frozenset[str], failed_name: str | None
    ) -> Instance | None:
        deadline = time.monotonic() + self.live.snap.config.failover.ready_timeout
        while time.monotonic() < deadline:
            moved = await self._moved_by_other(session, exclude, failed_name)
            if moved is not None:
                return moved
            await asyncio.sleep(0.05)
        return None

    def _event(
        self,
        session: str,
        failed: str | None,
        target: str | None,
        reason: str,
        outcome: str,
        started: float,
    ) -> None:
        took = time.monotonic() - started
        FAILOVERS.labels(reason, outcome).inc()
        if outcome in ("found_elsewhere", "owner_alive"):
            # Ready as found; a restored copy is timed when it is ready
            # (router.readiness).
            RESTORE_DURATION.observe(took)
        self.events.add(
            "failover",
            session=session,
            source=failed,
            target=target,
            reason=reason,
            outcome=outcome,
            seconds=round(took, 3),
        )
        log.warning(
            "failover of %s from %s (%s): %s%s in %.2fs",
            session,
            failed,
            reason,
            outcome,
            f" on {target}" if target else "",
            took,
        )
