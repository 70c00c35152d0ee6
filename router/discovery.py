"""Rediscovery and reconciliation: rebuild the session map from the instances.

Design principle 1: the instances are the source of truth, the map is a
cache of it. ``Discovery`` asks every instance which sessions it runs (the
adapter's ``list_sessions``, all instances in parallel) and makes the map
agree:

* at start (``DiscoveryConfig.on_start``), before the server takes its first
  request: every session found is mapped in one bulk write
  (``SessionMap.assign_many``), so the first request for it is a dict hit,
  not a probe of the fleet;
* then every ``DiscoveryConfig.interval`` seconds (``reconcile_now`` runs one
  round on demand, for the admin API and tests).

A round, for every session some instance listed:

* the owner is the best copy: READY > STARTING > NEEDS_AUTH > FAILED >
  STOPPED (as ``router.resolver`` prefers), then the copy the map already
  names, then config order. A changed owner is written (event
  ``owner_change``), except that a mapped owner whose list failed is never
  replaced by a copy that does not even run;
* a session *running* (READY, STARTING or NEEDS_AUTH) on two instances is a
  real incident, two browsers fighting over one phone: event ``duplicate``
  and a warning, once per distinct set of instances; with
  ``stop_duplicates`` every copy but the owner is stopped (``adapter.stop``,
  which keeps the login), under the session's lock.

For every mapped session no instance listed (an *orphan*): event
``orphan``, the session joins ``Discovery.orphans``; seen nowhere in two
consecutive rounds, it is forgotten from the map. A round only counts when
the mapped owner's list succeeded: an instance that is down, hung, or
answers its list with an error says nothing about its sessions, so a
transient failure never drops an entry. (Forgetting is safe anyway: the next
request for the session probes the fleet; the resolver never guesses.)

Sessions that a migration or a failover is moving right now are left alone
for the round (their state is in flux by design), and a change is written
only if the map entry is still what it was when the round started, so a
round never undoes a move that happened while it listed.

``hint(session, instance)`` is for instance webhooks that announce a
session: the instance is probed before it is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from router.adapters.base import ListFailed, SessionInfo, SessionStatus
from router.events import EventLog
from router.instances import Instance
from router.locks import LockBusy, SessionLocks
from router.probe import PREFERENCE, RUNNING
from router.removals import Removals
from router.resolver import Resolver
from router.sessionmap import SessionMap
from router.snapshot import Live
from router.store.base import StoreUnavailable

log = logging.getLogger(__name__)

# Orphans are forgotten after this many consecutive rounds seen nowhere.
FORGET_AFTER = 2
# Report lists longer than this are cut (the counts stay exact).
_REPORT_ITEMS = 100

Copy = tuple[Instance, SessionInfo]


def pick_owner(copies: Iterable[Copy], mapped: str | None, order: Mapping[str, int]) -> Copy:
    """The copy that should own the session: best status, then the mapped one,
    then config order."""
    return min(
        copies,
        key=lambda c: (
            PREFERENCE.get(c[1].status, 9),
            0 if c[0].name == mapped else 1,
            order.get(c[0].name, len(order)),
        ),
    )


@dataclass(slots=True)
class Round:
    """What one discovery / reconcile round saw and did."""

    number: int
    initial: bool
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    listed: dict[str, int] = field(default_factory=dict)  # instance -> sessions it listed
    failed: dict[str, str] = field(default_factory=dict)  # instance -> why its list failed
    assigned: int = 0  # sessions mapped that were not
    changed: list[dict[str, Any]] = field(default_factory=list)  # owner changes
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # mapped, listed nowhere
    forgotten: list[str] = field(default_factory=list)
    skipped: int = 0  # sessions being moved or recovered right now

    @property
    def sessions(self) -> int:
        return sum(self.listed.values())

    def as_dict(self) -> dict[str, Any]:
        def cut(items: list[Any]) -> list[Any]:
            return items[:_REPORT_ITEMS]

        return {
            "round": self.number,
            "initial": self.initial,
            "started": self.started,
            "seconds": round(self.seconds, 4),
            "listed": dict(self.listed),
            "failed": dict(self.failed),
            "assigned": self.assigned,
            "changed": len(self.changed),
            "changes": cut(self.changed),
            "duplicates": cut(self.duplicates),
            "orphans": cut(self.orphans),
            "orphan_count": len(self.orphans),
            "forgotten": cut(self.forgotten),
            "forgotten_count": len(self.forgotten),
            "skipped": self.skipped,
        }


class Discovery:
    """List, map, reconcile. One per router process; see the module doc."""

    def __init__(
        self,
        live: Live,
        smap: SessionMap,
        resolver: Resolver,
        locks: SessionLocks,
        removals: Removals,
        events: EventLog,
        *,
        busy: Callable[[str], bool],
        rebalance: Callable[[], Awaitable[object]],
    ) -> None:
        self.live = live
        self.smap = smap
        self.resolver = resolver
        self.locks = locks
        self.removals = removals
        self.events = events
        # A session a move or a failover has in hand right now: left alone.
        self._busy = busy
        # Run after each periodic round when ``discovery.rebalance`` is on.
        self._rebalance = rebalance
        # Mapped sessions listed nowhere: session -> consecutive rounds.
        self._orphans: dict[str, int] = {}
        # Sessions running on several instances -> those instances (reported once).
        self.duplicates: dict[str, tuple[str, ...]] = {}
        self.rounds = 0
        self.last: Round | None = None
        self._lock = asyncio.Lock()
        self._round_done = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def orphans(self) -> frozenset[str]:
        """Mapped sessions the last rounds found running nowhere."""
        return frozenset(self._orphans)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Run ``reconcile_now`` every ``discovery.interval`` seconds (0: never)."""
        if self._task is None and self.live.snap.config.discovery.interval > 0:
            self._task = asyncio.create_task(self._loop(), name="discovery")

    async def reschedule(self) -> None:
        """Restart the periodic rounds on the interval in force (after a
        reload), between two rounds: a round is never cut short."""
        async with self._lock:
            await self.stop()
        self.start()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            cfg = self.live.snap.config.discovery
            await asyncio.sleep(cfg.interval)
            try:
                await self.reconcile_now()
                if self.live.snap.config.discovery.rebalance:
                    await self._rebalance()
            except Exception:
                log.exception("reconcile round failed")

    async def wait_round(self, after: int | None = None) -> Round:
        """Wait until a round numbered above ``after`` (default: the current one) ends."""
        target = self.rounds if after is None else after
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds > target)
        assert self.last is not None
        return self.last

    # -- rounds -------------------------------------------------------------------

    async def discover(self) -> Round:
        """The start-up round: the same as ``reconcile_now``, logged as discovery."""
        result = await self._round(initial=True)
        self.events.add(
            "discovery",
            sessions=result.sessions,
            assigned=result.assigned,
            instances=len(result.listed),
            failed=sorted(result.failed),
            seconds=round(result.seconds, 4),
        )
        log.info(
            "discovery: %d sessions on %d instances mapped in %.3fs%s",
            result.sessions,
            len(result.listed),
            result.seconds,
            f" ({len(result.failed)} could not list: {', '.join(sorted(result.failed))})"
            if result.failed
            else "",
        )
        return result

    async def reconcile_now(self) -> Round:
        """One reconcile round now (after any round in progress)."""
        return await self._round(initial=False)

    async def _round(self, *, initial: bool) -> Round:
        async with self._lock:
            started = time.monotonic()
            result = Round(number=self.rounds + 1, initial=initial)
            try:
                await self._reconcile(result)
            finally:
                result.seconds = time.monotonic() - started
                self.last = result
                async with self._round_done:
                    self.rounds += 1
                    self._round_done.notify_all()
            return result

    async def _reconcile(self, result: Round) -> None:
        snap = self.live.snap
        instances = list(snap.fleet)
        order = {inst.name: i for i, inst in enumerate(instances)}
        before = dict(self.smap.entries())
        listings = await asyncio.gather(*(self._list(inst) for inst in instances))

        copies: dict[str, list[Copy]] = {}
        for inst, listing in zip(instances, listings, strict=True):
            if isinstance(listing, str):
                result.failed[inst.name] = listing
                continue
            result.listed[inst.name] = len(listing)
            for info in listing:
                copies.setdefault(info.session, []).append((inst, info))

        changes: dict[str, str] = {}
        extra_copies: list[tuple[str, Instance, list[Instance]]] = []
        seen_duplicates: set[str] = set()
        stopped: list[tuple[str, str]] = []
        for session, found in copies.items():
            if self._busy(session):
                result.skipped += 1
                continue
            mapped = before.get(session)
            owner, info = pick_owner(found, mapped, order)
            running = [inst for inst, i in found if i.status in RUNNING]
            if (
                not running
                and snap.adapter.stopped_is_removed
                and mapped is not None
                and any(
                    inst.name == mapped and i.status is SessionStatus.STOPPED for inst, i in found
                )
            ):
                # Stopped where it is mapped, running nowhere: someone stopped it
                # on purpose (router.removals); no failover may start it again.
                stopped.append((session, mapped))
                continue
            if len(running) > 1:
                seen_duplicates.add(session)
                extras = [inst for inst in running if inst is not owner]
                self._report_duplicate(session, running, owner, result)
                extra_copies.append((session, owner, extras))
            if owner.name == mapped:
                continue
            if mapped is not None and mapped in result.failed and info.status not in RUNNING:
                # The mapped owner could not say; a copy that does not even
                # run elsewhere is no reason to move the entry.
                continue
            if mapped is None:
                result.assigned += 1
            else:
                result.changed.append({"session": session, "old": mapped, "new": owner.name})
            changes[session] = owner.name
        for session in list(self.duplicates):
            if session not in seen_duplicates:
                del self.duplicates[session]

        # Orphans: mapped, listed nowhere, and the owner's list is to be trusted.
        forget: list[tuple[str, str]] = []
        for session, owner_name in before.items():
            if session in copies:
                self._orphans.pop(session, None)
                continue
            if owner_name in result.failed or self._busy(session):
                # No verdict this round: the streak starts again.
                self._orphans.pop(session, None)
                continue
            streak = self._orphans.get(session, 0) + 1
            self._orphans[session] = streak
            result.orphans.append(session)
            if streak == 1:
                self.events.add("orphan", session=session, instance=owner_name, action="seen")
                log.warning(
                    "session %s is mapped to %s but no instance runs it", session, owner_name
                )
            if streak >= FORGET_AFTER:
                forget.append((session, owner_name))
        for session in list(self._orphans):
            if session not in before:
                del self._orphans[session]

        await self._apply(changes, before, result)
        await self._forget(forget, result)
        for session, instance in stopped:
            if self.smap.peek(session) == instance:
                await self.removals.mark(session, by="discovery", instance=instance)
        if extra_copies and snap.config.discovery.stop_duplicates:
            await self._stop_extras(extra_copies)

    async def _list(self, inst: Instance) -> list[SessionInfo] | str:
        """The instance's sessions, or why they could not be listed."""
        snap = self.live.snap
        timeouts = snap.config.timeouts
        try:
            async with asyncio.timeout(timeouts.connect + timeouts.read):
                return await snap.adapter.list_sessions(inst.http, inst.config, strict=True)
        except ListFailed as exc:
            detail = exc.detail
        except TimeoutError:
            detail = "timed out"
        except (aiohttp.ClientError, OSError) as exc:
            detail = f"unreachable ({type(exc).__name__})"
        log.warning("cannot list the sessions of %s: %s", inst.name, detail)
        return detail

    def _report_duplicate(
        self, session: str, running: list[Instance], owner: Instance, result: Round
    ) -> None:
        names = tuple(sorted(inst.name for inst in running))
        entry = {"session": session, "instances": list(names), "owner": owner.name}
        result.duplicates.append(entry)
        if self.duplicates.get(session) == names:
            return  # reported already
        self.duplicates[session] = names
        self.events.add("duplicate", action="seen", **entry)
        log.error(
            "session %s runs on %d instances (%s): two clients on one phone; owner %s",
            session,
            len(names),
            ", ".join(names),
            owner.name,
        )

    async def _apply(
        self, changes: dict[str, str], before: Mapping[str, str], result: Round
    ) -> None:
        smap = self.smap
        # Only entries nobody changed while we listed (a move, a failover, a create).
        todo = {s: owner for s, owner in changes.items() if smap.peek(s) == before.get(s)}
        if len(todo) < len(changes):
            result.skipped += len(changes) - len(todo)
        if not todo:
            return
        try:
            await smap.assign_many(todo)
        except StoreUnavailable:
            log.warning("session store unavailable: %d mappings kept in cache only", len(todo))
        for change in result.changed:
            if change["session"] in todo:
                self.events.add("owner_change", cause="reconcile", **change)
                log.warning(
                    "session %s now runs on %s (map said %s)",
                    change["session"],
                    change["new"],
                    change["old"],
                )

    async def _forget(self, forget: list[tuple[str, str]], result: Round) -> None:
        for session, owner in forget:
            if self.smap.peek(session) != owner:
                continue  # changed meanwhile
            try:
                await self.smap.forget(session)
            except StoreUnavailable:
                log.warning("session store unavailable: %s forgotten in cache only", session)
            self._orphans.pop(session, None)
            result.forgotten.append(session)
            self.events.add("orphan", session=session, instance=owner, action="forgotten")
            log.warning("session %s ran nowhere for %d rounds: forgotten", session, FORGET_AFTER)

    async def _stop_extras(self, extra_copies: list[tuple[str, Instance, list[Instance]]]) -> None:
        snap = self.live.snap
        limit = asyncio.Semaphore(max(1, snap.config.discovery.migrate_concurrency))

        async def stop_one(session: str, owner: Instance, extras: list[Instance]) -> None:
            async with limit:
                try:
                    async with self.locks.hold(session, snap.config.failover.lock_ttl):
                        for inst in extras:
                            ok = await self._stop(inst, session)
                            self.events.add(
                                "duplicate",
                                session=session,
                                instance=inst.name,
                                owner=owner.name,
                                action="stopped" if ok else "stop_failed",
                            )
                except (LockBusy, StoreUnavailable):
                    log.info("duplicate %s is locked by a move or failover: next round", session)

        await asyncio.gather(*(stop_one(s, o, e) for s, o, e in extra_copies))

    async def _stop(self, inst: Instance, session: str) -> bool:
        try:
            ok = await self.live.snap.adapter.stop(inst.http, inst.config, session)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("stopping the duplicate of %s on %s failed: %r", session, inst.name, exc)
            return False
        if ok:
            log.warning("stopped the duplicate of %s on %s", session, inst.name)
        else:
            log.warning("%s refused to stop its duplicate of %s", inst.name, session)
        return ok

    # -- hints -----------------------------------------------------------------

    async def hint(self, session: str, instance_name: str) -> bool:
        """An instance announced ``session`` (a webhook): map it there if it runs there.

        The instance is probed first; when the map names another instance
        that still runs the session too, nothing changes (a duplicate: the
        next round reports it). True when the map now points at the instance.
        """
        snap = self.live.snap
        inst = snap.fleet.get(instance_name)
        if inst is None or self._busy(session):
            return False
        info = await self._probe(inst, session)
        if info is None or info.status not in RUNNING:
            return False
        current = self.smap.peek(session)
        if current == inst.name:
            return True
        old = snap.fleet.get(current) if current is not None else None
        if old is not None:
            other = await self._probe(old, session)
            if other is not None and other.status in RUNNING:
                log.warning(
                    "%s announces %s, which still runs on %s: left to reconcile",
                    inst.name,
                    session,
                    old.name,
                )
                return False
        if self.smap.peek(session) != current or self._busy(session):
            return False  # moved while we asked
        await self.resolver.record(session, inst)
        self._orphans.pop(session, None)
        self.events.add("owner_change", cause="hint", session=session, old=current, new=inst.name)
        log.info("session %s mapped to %s (announced by the instance)", session, inst.name)
        return True

    async def _probe(self, inst: Instance, session: str) -> SessionInfo | None:
        return await self.resolver.probe.info(self.live.snap.adapter, inst, session)
