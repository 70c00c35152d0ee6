"""A session the router restored or moved is not ready until its instance says so.

Every restore passes through a "not yet connected" phase (Blazz reports
``qr_scanning`` while it opens the stored login, WAHA ``STARTING``), during
which a send is refused with the upstream's own "not connected" error. The
router started that copy, so the client must never see that error: requests
that need a logged-in session (``adapter.needs_ready``) wait here (bounded by
``failover.wait``) and go out once the instance reports it READY.

``track`` starts one watcher per session. It polls the new owner (gently,
with backoff) until READY (done), FAILED or gone (done: the request then finds
out where the session is), or NEEDS_AUTH: the stored login is gone and the
upstream asks for a QR scan (a probe says so, or a QR webhook:
``auth_needed``). A copy that needs a scan answers such requests with
``session_needs_auth`` at once, for as long as it needs one: the watcher
keeps looking every few seconds until it is READY, or no longer the
session's copy. A copy still starting after ``limit`` seconds is let go.
Until a session is tracked, nothing here costs more than a dict lookup.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from router.adapters.base import SessionInfo, SessionStatus
from router.events import EventLog
from router.instances import Instance
from router.metrics import RESTORE_DURATION
from router.probe import Probe
from router.snapshot import Live

log = logging.getLogger(__name__)

_POLL_FIRST = 0.05
_POLL_MAX = 0.5
_POLL_NEEDS_AUTH = 5.0  # a QR scan takes a person: look now and then
_QR_KEPT = 60.0


class Ready(enum.Enum):
    READY = "ready"
    NEEDS_AUTH = "needs_auth"  # the upstream asks for a new QR scan
    GONE = "gone"  # failed, or no longer there
    TIMEOUT = "timeout"  # not ready within the wait


@dataclass(slots=True)
class _Watch:
    instance: str
    started: float
    done: asyncio.Future[Ready]
    needs_auth: bool = False
    task: asyncio.Task[None] | None = field(default=None)


class Readiness:
    def __init__(
        self,
        live: Live,
        probe: Probe,
        events: EventLog,
        *,
        owner_of: Callable[[str], str | None],
        limit: float = 300.0,
    ) -> None:
        self.live = live
        self.probe = probe
        self.events = events
        # Where the map says the session runs (a copy that is no longer the
        # session's owner is not watched any more).
        self._owner_of = owner_of
        # How long a starting copy is waited for before requests go through
        # anyway (the upstream then answers for itself).
        self.limit = limit
        self._watches: dict[str, _Watch] = {}
        # QR requests seen before the session was tracked (a webhook can beat
        # the create's answer): session -> (instance, when).
        self._recent_qr: dict[str, tuple[str, float]] = {}

    def pending(self, session: str) -> bool:
        return session in self._watches

    def track(self, session: str, inst: Instance, *, started: float, status: SessionStatus) -> None:
        """``session`` was just started on ``inst`` by the router (``status``:
        what the instance reported first). ``started``: when recovery began."""
        self.forget(session)
        if status is SessionStatus.READY:
            RESTORE_DURATION.observe(time.monotonic() - started)
            return
        loop = asyncio.get_running_loop()
        watch = _Watch(inst.name, started, loop.create_future())
        self._watches[session] = watch
        qr = self._recent_qr.pop(session, None)
        if status is SessionStatus.NEEDS_AUTH or (
            qr is not None and qr[0] == inst.name and qr[1] >= started
        ):
            self._needs_auth(session, watch)
        watch.task = asyncio.create_task(self._watch(session, inst, watch), name=f"ready:{session}")

    def auth_needed(self, session: str, instance: str) -> None:
        """An event from ``instance`` says ``session`` asks for a QR (webhook)."""
        watch = self._watches.get(session)
        if watch is not None and watch.instance == instance:
            self._needs_auth(session, watch)
            return
        # Not tracked yet, or tracked on another instance: an older copy's
        # watch, which the create about to be answered replaces (the webhook
        # can beat that answer). Kept for ``track``, which takes it only from
        # the copy it tracks and only if it came after recovery began.
        now = time.monotonic()
        if len(self._recent_qr) > 10_000:  # bounded: keep only the last minute
            self._recent_qr = {s: v for s, v in self._recent_qr.items() if now - v[1] < _QR_KEPT}
        self._recent_qr[session] = (instance, now)

    def forget(self, session: str) -> None:
        watch = self._watches.pop(session, None)
        if watch is not None:
            self._resolve(watch, Ready.GONE)
            if watch.task is not None and watch.task is not asyncio.current_task():
                watch.task.cancel()

    async def wait(self, session: str, within: float) -> Ready:
        """Until ``session`` is ready to serve (READY also when not tracked)."""
        watch = self._watches.get(session)
        if watch is None:
            return Ready.READY
        if watch.needs_auth:
            return Ready.NEEDS_AUTH
        try:
            return await asyncio.wait_for(asyncio.shield(watch.done), within)
        except TimeoutError:
            return Ready.TIMEOUT

    async def close(self) -> None:
        for session in list(self._watches):
            self.forget(session)

    # -- the watcher -------------------------------------------------------------------

    async def _watch(self, session: str, inst: Instance, watch: _Watch) -> None:
        delay = _POLL_FIRST
        deadline = watch.started + self.limit
        outcome = Ready.TIMEOUT
        while watch.needs_auth or time.monotonic() < deadline:
            await asyncio.sleep(_POLL_NEEDS_AUTH if watch.needs_auth else delay)
            delay = min(delay * 1.5, _POLL_MAX)
            if self._owner_of(session) != inst.name:
                outcome = Ready.GONE  # moved, removed or forgotten since
                break
            info = await self._probe(inst, session)
            if info is None or info.status in (SessionStatus.FAILED, SessionStatus.STOPPED):
                outcome = Ready.GONE
                break
            if info.status is SessionStatus.READY:
                outcome = Ready.READY
                break
            if info.status is SessionStatus.NEEDS_AUTH:
                self._needs_auth(session, watch)
        if self._watches.get(session) is watch:
            del self._watches[session]
            self._done(session, watch, outcome)

    async def _probe(self, inst: Instance, session: str) -> SessionInfo | None:
        return await self.probe.info(self.live.snap.adapter, inst, session)

    def _needs_auth(self, session: str, watch: _Watch) -> None:
        if watch.needs_auth:
            return
        watch.needs_auth = True
        self.events.add("needs_auth", session=session, instance=watch.instance)
        log.warning(
            "session %s restored on %s asks for a new QR scan after %.1fs",
            session,
            watch.instance,
            time.monotonic() - watch.started,
        )
        self._resolve(watch, Ready.NEEDS_AUTH)

    def _done(self, session: str, watch: _Watch, outcome: Ready) -> None:
        took = time.monotonic() - watch.started
        if outcome is Ready.READY:
            RESTORE_DURATION.observe(took)
        else:
            self.events.add(
                "not_ready", session=session, instance=watch.instance, outcome=outcome.value
            )
            log.warning(
                "session %s restored on %s is %s after %.1fs",
                session,
                watch.instance,
                outcome.value,
                took,
            )
        self._resolve(watch, outcome)

    @staticmethod
    def _resolve(watch: _Watch, outcome: Ready) -> None:
        if not watch.done.done():
            watch.done.set_result(outcome)
