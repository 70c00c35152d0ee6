"""A session the router restored or moved is not ready until its instance says so.

Every restore passes through a "not yet connected" phase (Blazz reports
``qr_scanning`` while it opens the stored login, WAHA ``STARTING``), during
which a send is refused with the upstream's own "not connected" error. The
router started that copy, so the client must never see that error: requests
for a session being started wait here (bounded by ``failover.wait``) and go
out once the instance reports it READY.

``track`` starts one watcher per session: it polls the new owner (gently,
with backoff) until READY, NEEDS_AUTH (the upstream asked for a QR: the
stored login is gone), FAILED / gone, or the watch limit; webhooks can say
"QR asked" sooner (``auth_needed``). ``wait`` is what a request calls.
Until a session is tracked, nothing here costs more than a dict lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from router.adapters.base import Adapter, SessionStatus
from router.events import EventLog
from router.instances import Instance
from router.metrics import RESTORE_DURATION

log = logging.getLogger(__name__)

_POLL_FIRST = 0.05
_POLL_MAX = 0.5


class Ready(enum.Enum):
    READY = "ready"
    NEEDS_AUTH = "needs_auth"  # the upstream asked for a new QR
    GONE = "gone"  # failed, or no longer there
    TIMEOUT = "timeout"  # not ready within the wait


@dataclass(slots=True)
class _Watch:
    instance: str
    started: float
    done: asyncio.Future[Ready]
    task: asyncio.Task[None] | None = field(default=None)


class Readiness:
    def __init__(
        self,
        get_adapter: Callable[[], Adapter],
        events: EventLog,
        *,
        limit: float = 300.0,
        probe_timeout: float = 2.0,
    ) -> None:
        self._get_adapter = get_adapter
        self.events = events
        # How long a watcher polls before it lets requests through anyway
        # (the upstream then answers for itself).
        self.limit = limit
        self.probe_timeout = probe_timeout
        self._watches: dict[str, _Watch] = {}

    def pending(self, session: str) -> bool:
        return session in self._watches

    def track(self, session: str, inst: Instance, *, started: float, status: SessionStatus) -> None:
        """``session`` was just started on ``inst`` by the router (``status``:
        what the instance reported first). ``started``: when recovery began."""
        old = self._watches.pop(session, None)
        if old is not None:
            self._finish(old, Ready.GONE)
        if status is SessionStatus.READY:
            RESTORE_DURATION.observe(time.monotonic() - started)
            return
        loop = asyncio.get_running_loop()
        watch = _Watch(inst.name, started, loop.create_future())
        self._watches[session] = watch
        if status is SessionStatus.NEEDS_AUTH:
            self._finish_session(session, Ready.NEEDS_AUTH)
            return
        watch.task = asyncio.create_task(self._watch(session, inst, watch), name=f"ready:{session}")

    def auth_needed(self, session: str, instance: str) -> None:
        """An event from ``instance`` says ``session`` asks for a QR (webhook)."""
        watch = self._watches.get(session)
        if watch is not None and watch.instance == instance:
            self._finish_session(session, Ready.NEEDS_AUTH)

    def forget(self, session: str) -> None:
        watch = self._watches.pop(session, None)
        if watch is not None:
            self._finish(watch, Ready.GONE)

    async def wait(self, session: str, within: float) -> Ready:
        """Until ``session`` is ready to serve (READY also when not tracked)."""
        watch = self._watches.get(session)
        if watch is None:
            return Ready.READY
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
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(self.probe_timeout):
                    info = await self._get_adapter().probe(inst.http, inst.config, session)
            except (aiohttp.ClientError, OSError, TimeoutError):
                info = None
            if info is None:
                outcome = Ready.GONE
                break
            if info.status is SessionStatus.READY:
                outcome = Ready.READY
                break
            if info.status is SessionStatus.NEEDS_AUTH:
                outcome = Ready.NEEDS_AUTH
                break
            if info.status in (SessionStatus.FAILED, SessionStatus.STOPPED):
                outcome = Ready.GONE
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX)
        if self._watches.get(session) is watch:
            self._finish_session(session, outcome)

    def _finish_session(self, session: str, outcome: Ready) -> None:
        watch = self._watches.pop(session, None)
        if watch is None:
            return
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
        self._finish(watch, outcome)

    @staticmethod
    def _finish(watch: _Watch, outcome: Ready) -> None:
        if not watch.done.done():
            watch.done.set_result(outcome)
        task = watch.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(Exception):
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
