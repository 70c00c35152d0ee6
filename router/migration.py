"""Moving sessions between instances: drain, move, rebalance.

One move (``Migration.migrate``) never lets a session run on two instances
at once, and never logs it out:

1. hold the session's lock (``SessionLocks``, the one failover takes, so a
   move and a recovery of the same session exclude each other, across
   replicas with the redis locks);
2. probe the session on its instance (its state there feeds ``start``:
   Blazz's workspace, WAHA's config);
3. stop it there (``adapter.stop``, which keeps the login) and probe again
   until the instance confirms it no longer runs it;
4. start it on the target (``router.restore.start_and_wait``) with a
   placement reservation held, and wait until it reports in;
5. switch the map entry (``SessionMap.assign``) and record an event.

If the start fails, the target's copy is stopped (or, if it turns out to be
running after all, kept and mapped) and the session is started back on its
old instance. Requests that arrive mid-move meet a stopped session on the
old owner: the adapter calls that "session not here", the proxy's failover
finds the lock held and waits for the map to change, then replays.

Every move runs as its own task, shielded from its caller: an admin client
that disconnects, or a drain being cancelled, never leaves a session stopped
half-way.

``drain(name)`` marks the instance DRAINING (placement skips it) and moves
all its sessions to the least-loaded placeable instances, at most
``DiscoveryConfig.migrate_concurrency`` at a time, in the background
(``DrainJob``). ``undrain`` / ``maintenance`` only set the admin state
(and stop a running drain from starting further moves). ``rebalance`` is
opt-in: while the load spread of the placeable instances exceeds
``rebalance_threshold``, it moves sessions from the most to the least
loaded, a bounded number per round.

Labels (``router.placement``): a drained session goes to an instance
matching its selector when one has room, else outside it (its MoveResult's
``detail`` says so) or, for a strict selector, nowhere (``no_capacity``).
An operator's move to an instance outside a strict selector is refused
(409 ``target_outside_selector``). Rebalancing moves sessions only between
instances with the same labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from router.adapters.base import SessionInfo
from router.discovery import pick_owner
from router.errors import RouterError
from router.events import EventLog
from router.failover import Failover
from router.instances import AdminState, Instance
from router.labels import Selector
from router.locks import LockBusy, SessionLocks
from router.placement import Placer, labels_of, load_ratio
from router.probe import RUNNING
from router.resolver import Resolver
from router.restore import start_and_wait, with_notes
from router.sessionmap import SessionMap
from router.snapshot import Live
from router.store.base import StoreUnavailable

log = logging.getLogger(__name__)

# Drain retries a session whose lock is busy (a failover in flight) this often.
_BUSY_RETRIES = 5
_BUSY_WAIT = 0.2
# How long to poll the old instance for "stopped" after it accepted the stop.
_STOP_CONFIRM = 5.0
# Failures kept in a drain job's report.
_REPORT_FAILURES = 100


class MoveError(RouterError):
    """A move request that cannot even start (unknown session, bad target, ...)."""


@dataclass(slots=True)
class MoveResult:
    """The outcome of one move.

    ``outcome``: ``moved``, ``already_there``, ``found_elsewhere`` (the map
    was stale and the session runs on another instance, which is now mapped),
    or ``failed``. A failure has an ``error``: ``busy`` (locked by a failover
    or another move), ``moved_meanwhile``, ``no_capacity``,
    ``source_unreachable``, ``not_running`` (the source does not run it and no
    instance does), ``stop_refused``, ``stop_failed``, ``start_failed`` (started
    back on the source), ``rollback_failed`` (it now runs nowhere: the next
    request recovers it), ``store_unavailable``.
    """

    session: str
    source: str | None
    target: str | None
    outcome: str
    error: str | None = None
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "source": self.source,
            "target": self.target,
            "ok": self.ok,
            "outcome": self.outcome,
            "error": self.error,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }


@dataclass(slots=True)
class DrainJob:
    """A drain in the background; ``wait`` for it, ``as_dict`` to report it."""

    instance: str
    started: float = field(default_factory=time.time)
    state: str = "running"  # running | done | cancelled
    total: int = 0
    moved: int = 0
    skipped: int = 0  # gone from the instance by other means (failover, reconcile)
    failures: list[MoveResult] = field(default_factory=list)
    failed: int = 0
    finished: float | None = None
    cancel_requested: bool = False
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self, within: float | None = None) -> bool:
        """True once the drain has finished (waiting at most ``within`` seconds)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._done.wait()
        return self.done

    def as_dict(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.time()
        return {
            "instance": self.instance,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "moved": self.moved,
            "skipped": self.skipped,
            "failed": self.failed,
            "remaining": max(0, self.total - self.moved - self.skipped - self.failed),
            "failures": [f.as_dict() for f in self.failures[:_REPORT_FAILURES]],
            "started": self.started,
            "finished": self.finished,
            "seconds": round(end - self.started, 3),
        }


class Migration:
    """Drain, move and rebalance for one router process; see the module doc."""

    def __init__(
        self,
        live: Live,
        smap: SessionMap,
        resolver: Resolver,
        locks: SessionLocks,
        placer: Placer,
        failover: Failover,
        events: EventLog,
        *,
        pins: set[str],
    ) -> None:
        self.live = live
        self.smap = smap
        self.resolver = resolver
        self.locks = locks
        self.placer = placer
        # Moves and recoveries exclude each other; a moved copy is watched
        # until ready by the failover's readiness, like a restored one.
        self.failover = failover
        self.events = events
        # Sessions an operator pinned (POST /admin/sessions/{s}/pin): never rebalanced.
        self.pins = pins
        self._active: set[str] = set()
        self._tasks: set[asyncio.Task[MoveResult]] = set()
        # The last drain of each instance (running or finished).
        self.jobs: dict[str, DrainJob] = {}

    def active(self, session: str) -> bool:
        """True while a move of ``session`` is in flight (discovery leaves it alone)."""
        return session in self._active

    # -- admin state ------------------------------------------------------------

    def _instance(self, name: str) -> Instance:
        inst = self.live.snap.fleet.get(name)
        if inst is None:
            raise MoveError(404, "unknown_instance", f"no instance named {name!r}")
        return inst

    def set_state(self, name: str, state: AdminState) -> Instance:
        """Set an instance's admin state (no sessions move); stops a running drain."""
        inst = self._instance(name)
        if state is not AdminState.DRAINING:
            job = self.jobs.get(name)
            if job is not None and not job.done:
                job.cancel_requested = True
        if inst.admin is not state:
            old = inst.admin
            inst.admin = state
            self.events.add("admin_state", instance=name, old=old.value, new=state.value)
            log.warning("instance %s: %s -> %s", name, old.value, state.value)
        return inst

    def undrain(self, name: str) -> Instance:
        """Back to ACTIVE; a drain in progress starts no further moves."""
        return self.set_state(name, AdminState.ACTIVE)

    def maintenance(self, name: str) -> Instance:
        """MAINTENANCE: no new sessions, existing ones stay and are routed as before."""
        return self.set_state(name, AdminState.MAINTENANCE)

    # -- drain --------------------------------------------------------------------

    async def drain(self, name: str) -> DrainJob:
        """Mark ``name`` DRAINING and move its sessions away, in the background.

        Returns the job at once (the running one if a drain is in progress).
        """
        inst = self._instance(name)
        job = self.jobs.get(name)
        if job is not None and not job.done:
            return job
        self.set_state(name, AdminState.DRAINING)
        job = DrainJob(name)
        self.jobs[name] = job
        self.events.add("drain", instance=name, action="started")
        job.task = asyncio.create_task(self._drain(job, inst), name=f"drain:{name}")
        return job

    async def _drain(self, job: DrainJob, inst: Instance) -> None:
        try:
            await self._drain_loop(job, inst)
        except Exception:
            log.exception("drain of %s failed", inst.name)
        finally:
            job.state = "cancelled" if job.cancel_requested else "done"
            job.finished = time.time()
            job._done.set()
            self.events.add(
                "drain",
                instance=inst.name,
                action=job.state,
                moved=job.moved,
                failed=job.failed,
                skipped=job.skipped,
                seconds=round(job.finished - job.started, 3),
            )
            log.warning(
                "drain of %s %s: %d moved, %d failed, %d gone by other means",
                inst.name,
                job.state,
                job.moved,
                job.failed,
                job.skipped,
            )

    async def _drain_loop(self, job: DrainJob, inst: Instance) -> None:
        attempted: set[str] = set()
        while not job.cancel_requested:
            # Re-read: sessions mapped here meanwhile (found by reconcile) go too.
            pending = deque(s for s in self.smap.sessions_on(inst.name) if s not in attempted)
            if not pending:
                return
            attempted.update(pending)
            job.total += len(pending)
            workers = max(1, min(self.live.snap.config.discovery.migrate_concurrency, len(pending)))

            async def worker(queue: deque[str] = pending) -> None:
                while queue and not job.cancel_requested:
                    await self._drain_one(job, inst, queue.popleft())

            await asyncio.gather(*(worker() for _ in range(workers)))

    async def _drain_one(self, job: DrainJob, inst: Instance, session: str) -> None:
        for attempt in range(_BUSY_RETRIES + 1):
            if self.smap.peek(session) != inst.name:
                job.skipped += 1
                return
            result = await self.migrate(session, inst, reason="drain")
            if result.ok:
                job.moved += 1
                return
            if result.error == "moved_meanwhile":
                job.skipped += 1
                return
            if result.error != "busy" or attempt == _BUSY_RETRIES or job.cancel_requested:
                break
            await asyncio.sleep(_BUSY_WAIT * (attempt + 1))
        job.failed += 1
        job.failures.append(result)

    # -- one session -----------------------------------------------------------------

    async def move(self, session: str, to: str) -> MoveResult:
        """Move ``session`` to the instance named ``to``.

        ``MoveError`` when the request itself is wrong (unknown session or
        instance, target not healthy / not active / full); a ``MoveResult``
        (possibly failed) otherwise.
        """
        snap = self.live.snap
        target = self._instance(to)
        source = await self.resolver.owner(session, snap.fleet, snap.adapter)
        if source is None:
            raise MoveError(404, "unknown_session", f"session {session!r} runs on no instance")
        if source is target:
            return MoveResult(session, source.name, target.name, "already_there")
        if not target.healthy:
            raise MoveError(409, "target_unhealthy", f"instance {to!r} is not healthy")
        if target.admin is not AdminState.ACTIVE:
            raise MoveError(
                409, "target_not_active", f"instance {to!r} is {target.admin.value}, not active"
            )
        counts = self.placer.counts()
        if counts.get(target.name, 0) >= target.config.max_sessions:
            raise MoveError(409, "target_full", f"instance {to!r} is at its max_sessions")
        choice = await self.placer.choice_of(session)
        if not choice.selector.matches(labels_of(target)):
            if choice.strict:
                raise MoveError(
                    409,
                    "target_outside_selector",
                    f"instance {to!r} does not match the session's strict selector "
                    f"{choice.selector}",
                )
            # An operator's explicit choice; recorded like any placement outside.
            self.placer.note_outside(choice, session, "move", target)
        return await self.migrate(session, source, target, reason="move")

    async def migrate(
        self,
        session: str,
        source: Instance,
        target: Instance | None = None,
        *,
        reason: str = "move",
    ) -> MoveResult:
        """Move ``session`` from ``source`` to ``target`` (default: least loaded).

        Runs as its own task: cancelling the caller does not interrupt it.
        """
        task = asyncio.create_task(
            self._migrate(session, source, target, reason), name=f"move:{session}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _migrate(
        self, session: str, source: Instance, target: Instance | None, reason: str
    ) -> MoveResult:
        started = time.monotonic()
        if session in self._active:
            return self._done(
                MoveResult(session, source.name, None, "failed", "busy", "a move is in flight"),
                started,
                reason,
            )
        self._active.add(session)
        try:
            result = await self._locked_move(session, source, target, reason)
        except LockBusy:
            result = MoveResult(
                session, source.name, None, "failed", "busy", "locked by a failover or a move"
            )
        except StoreUnavailable:
            result = MoveResult(
                session, source.name, None, "failed", "store_unavailable", "cannot take the lock"
            )
        finally:
            self._active.discard(session)
        return self._done(result, started, reason)

    def _done(self, result: MoveResult, started: float, reason: str) -> MoveResult:
        result.seconds = time.monotonic() - started
        self.events.add("move", reason=reason, **result.as_dict())
        if result.ok:
            log.info(
                "%s of %s: %s -> %s (%s) in %.2fs",
                reason,
                result.session,
                result.source,
                result.target,
                result.outcome,
                result.seconds,
            )
        else:
            log.warning(
                "%s of %s from %s failed: %s %s",
                reason,
                result.session,
                result.source,
                result.error,
                result.detail,
            )
        return result

    async def _locked_move(
        self, session: str, source: Instance, target: Instance | None, reason: str
    ) -> MoveResult:
        snap = self.live.snap
        async with self.locks.hold(session, snap.config.failover.lock_ttl):
            owner = self.smap.peek(session)
            if owner is not None and owner != source.name:
                return MoveResult(
                    session, source.name, owner, "failed", "moved_meanwhile", f"now on {owner}"
                )
            outside: Selector | None = None
            if target is None:
                # Within the session's selector when possible (router.placement
                # records a placement outside it, or a strict refusal).
                choice = await self.placer.choice_of(session)
                placed = self.placer.place_for(
                    choice, frozenset({source.name}), action=reason, session=session
                )
                target = placed.instance
                if target is None:
                    return MoveResult(
                        session,
                        source.name,
                        None,
                        "failed",
                        "no_capacity",
                        f"no healthy active instance matching {choice.selector} has room "
                        "and the selector is strict"
                        if placed.refused
                        else "no healthy active instance has room",
                    )
                if placed.outside:
                    outside = choice.selector
            with self.placer.reserved(target):
                result = await self._stop_start(session, source, target)
            if outside is not None and result.outcome == "moved":
                result.detail = f"outside its selector {outside}: no instance matching it had room"
            return result

    async def _stop_start(self, session: str, source: Instance, target: Instance) -> MoveResult:
        snap = self.live.snap
        adapter = snap.adapter
        started = time.monotonic()

        def fail(error: str, detail: str = "") -> MoveResult:
            return MoveResult(session, source.name, target.name, "failed", error, detail)

        try:
            info = await adapter.probe(source.http, source.config, session)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return fail("source_unreachable", repr(exc))
        if info is None:
            return await self._not_on_source(session, source, target)

        try:
            stopped = await adapter.stop(source.http, source.config, session)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Unknown whether it stopped: starting elsewhere could make two.
            return fail("stop_failed", repr(exc))
        if not stopped:
            return fail("stop_refused", f"{source.name} refused to stop it (or cannot keep auth)")
        if not await self._confirm_stopped(source, session):
            return fail("stop_failed", f"{source.name} still runs it after the stop")

        known = await with_notes(self.smap.store, session, info) or info
        # Moved once the target runs it; requests then wait for it to be READY
        # (router.readiness). A copy that only waits for a QR scan (Blazz
        # offline) moves too: waiting for READY would roll every such move back.
        state = await start_and_wait(
            adapter,
            target,
            session,
            known,
            snap.config.failover.ready_timeout,
            events=self.events,
        )
        if state is not None:
            await self.failover.adopt(session, target, started, state.status)
            return MoveResult(session, source.name, target.name, "moved")
        return await self._roll_back(session, source, target, known, started)

    async def _not_on_source(self, session: str, source: Instance, target: Instance) -> MoveResult:
        """The source does not run the session: the map was stale, or the source
        cannot answer. Map it where it does run, if anywhere; start nothing."""
        snap = self.live.snap
        others = [i for i in snap.fleet.healthy() if i is not source]
        answers = await asyncio.gather(*(self._probe(i, session) for i in others))
        running = [
            (inst, info)
            for inst, info in zip(others, answers, strict=True)
            if info is not None and info.status in RUNNING
        ]
        if running:
            order = {inst.name: i for i, inst in enumerate(snap.fleet)}
            found, _ = pick_owner(running, None, order)
            await self.resolver.record(session, found)
            return MoveResult(session, source.name, found.name, "found_elsewhere")
        return MoveResult(
            session,
            source.name,
            target.name,
            "failed",
            "not_running",
            f"{source.name} does not report it running, nor does any other instance",
        )

    async def _probe(self, inst: Instance, session: str) -> SessionInfo | None:
        return await self.resolver.probe.info(self.live.snap.adapter, inst, session)

    async def _confirm_stopped(self, inst: Instance, session: str) -> bool:
        deadline = time.monotonic() + _STOP_CONFIRM
        delay = 0.02
        while True:
            try:
                info = await self.live.snap.adapter.probe(inst.http, inst.config, session)
            except (aiohttp.ClientError, TimeoutError, OSError):
                return False
            if info is None or info.status not in RUNNING:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay)  # the instance has no event to await
            delay = min(delay * 2, 0.5)

    async def _roll_back(
        self, session: str, source: Instance, target: Instance, info: SessionInfo, started: float
    ) -> MoveResult:
        snap = self.live.snap
        adapter = snap.adapter
        # The target may hold a half-started copy: it must go before the old
        # instance starts the session again.
        try:
            cleared = await adapter.stop(target.http, target.config, session)
        except (aiohttp.ClientError, TimeoutError, OSError):
            cleared = False
        if not cleared:
            try:
                there = await adapter.probe(target.http, target.config, session)
            except (aiohttp.ClientError, TimeoutError, OSError):
                there = None  # unreachable: a crashed target holds no copy
            if there is not None and there.status in RUNNING:
                # It did start, late: keep it there rather than make two.
                await self.failover.adopt(session, target, started, there.status)
                return MoveResult(session, source.name, target.name, "moved", detail="late start")
        back = await start_and_wait(
            adapter,
            source,
            session,
            info,
            snap.config.failover.ready_timeout,
            events=self.events,
        )
        if back is not None:
            await self.failover.adopt(session, source, started, back.status)
            return MoveResult(
                session,
                source.name,
                target.name,
                "failed",
                "start_failed",
                f"{target.name} did not start it; running on {source.name} again",
            )
        return MoveResult(
            session,
            source.name,
            target.name,
            "failed",
            "rollback_failed",
            f"started on neither {target.name} nor {source.name}",
        )

    # -- rebalance --------------------------------------------------------------------

    async def rebalance(self, max_moves: int | None = None) -> list[MoveResult]:
        """Move sessions from the most to the least loaded placeable instance while
        the spread of load ratios exceeds ``rebalance_threshold``.

        At most ``max_moves`` (default ``migrate_concurrency``) per call, run
        ``migrate_concurrency`` at a time. Returns the moves made. Sessions an
        operator pinned (``runtime.pins``) are never picked.
        """
        snap = self.live.snap
        cfg = snap.config.discovery
        limit = max_moves if max_moves is not None else max(1, cfg.migrate_concurrency)
        if limit <= 0:
            return []
        # Only between instances with the same labels: a selector matches all
        # of such a pool or none of it, so no move takes a session out of its
        # selector, and pools of different sizes are not "imbalanced".
        pools: dict[tuple[tuple[str, str], ...], list[Instance]] = {}
        for inst in snap.fleet:
            if inst.placeable:
                pools.setdefault(tuple(sorted(labels_of(inst).items())), []).append(inst)
        counts = dict(self.placer.counts())
        plan: list[tuple[Instance, Instance]] = []
        for insts in pools.values():
            if len(insts) >= 2:
                plan += _plan(insts, counts, limit - len(plan), cfg.rebalance_threshold)
        if not plan:
            return []

        by_source: dict[str, deque[str]] = {}
        for hi, _ in plan:
            if hi.name not in by_source:
                by_source[hi.name] = deque(
                    s
                    for s in reversed(self.smap.sessions_on(hi.name))
                    if not self.active(s) and not self.failover.recovering(s) and s not in self.pins
                )
        moves: list[tuple[str, Instance, Instance]] = []
        for hi, lo in plan:
            queue = by_source[hi.name]
            if queue:
                moves.append((queue.popleft(), hi, lo))
        self.events.add("rebalance", action="started", moves=len(moves))
        log.info("rebalance: moving %d sessions", len(moves))
        gate = asyncio.Semaphore(max(1, cfg.migrate_concurrency))

        async def one(session: str, hi: Instance, lo: Instance) -> MoveResult:
            async with gate:
                return await self.migrate(session, hi, lo, reason="rebalance")

        return list(await asyncio.gather(*(one(*m) for m in moves)))

    # -- shutdown ---------------------------------------------------------------------

    async def close(self, within: float = 5.0) -> None:
        """Stop drains from starting new moves; give moves in flight ``within`` seconds."""
        for job in self.jobs.values():
            job.cancel_requested = True
        pending: list[asyncio.Task[Any]] = [
            j.task for j in self.jobs.values() if j.task is not None and not j.done
        ]
        pending += self._tasks
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=within)
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _plan(
    insts: list[Instance], counts: dict[str, int], limit: int, threshold: float
) -> list[tuple[Instance, Instance]]:
    """Up to ``limit`` (from, to) moves among ``insts`` that narrow the
    spread of load ratios while it exceeds ``threshold`` (``counts`` is
    updated as if they were made)."""
    plan: list[tuple[Instance, Instance]] = []
    for _ in range(limit):
        ratios = {i.name: load_ratio(i, counts.get(i.name, 0)) for i in insts}
        hi = max(insts, key=lambda i: ratios[i.name])
        lo = min(insts, key=lambda i: ratios[i.name])
        gap = ratios[hi.name] - ratios[lo.name]
        if gap <= threshold:
            break
        n_hi, n_lo = counts.get(hi.name, 0), counts.get(lo.name, 0)
        if n_hi == 0 or n_lo + 1 > lo.config.max_sessions:
            break
        if abs(load_ratio(hi, n_hi - 1) - load_ratio(lo, n_lo + 1)) >= gap:
            break  # one session is too coarse to narrow the gap
        counts[hi.name], counts[lo.name] = n_hi - 1, n_lo + 1
        plan.append((hi, lo))
    return plan
