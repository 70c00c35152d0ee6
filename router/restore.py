"""Start a session on a chosen instance and wait (bounded) until it reports in.

Used by failover (restore after a crash), migration (drain, move) and
rebalancing. The caller holds the session's lock. The new copy is mapped as
soon as the instance runs it (``probe.RUNNING``: starting, ready or asking
for a QR); ``router.readiness`` holds requests until it is READY.

A start answered "held elsewhere" (``HeldElsewhere``: a browser of a crashed
instance still holds the session's profile in the shared storage) is tried
again with backoff until the deadline: that lock goes when the browser dies.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from router.adapters.base import Adapter, HeldElsewhere, SessionInfo, SessionStatus
from router.events import EventLog
from router.instances import Instance
from router.metrics import RESTORE_HELD
from router.probe import RUNNING
from router.store.base import SessionStore, StoreUnavailable

log = logging.getLogger(__name__)

_POLL = 0.05
# First wait after "held elsewhere"; doubles up to _HELD_MAX.
_HELD_FIRST = 0.25
_HELD_MAX = 4.0


async def with_notes(
    store: SessionStore, session: str, info: SessionInfo | None
) -> SessionInfo | None:
    """``info`` completed with what the session's create said (store notes):
    the upstream's own listings may lack it (Blazz: ``account_id``)."""
    try:
        notes = await store.get_note(session)
    except StoreUnavailable:
        notes = None
    if not notes:
        return info
    if info is None:
        return SessionInfo(session, SessionStatus.STARTING, dict(notes))
    return SessionInfo(info.session, info.status, {**notes, **info.extra})


async def start_and_wait(
    adapter: Adapter,
    inst: Instance,
    session: str,
    info: SessionInfo | None,
    ready_timeout: float,
    *,
    events: EventLog | None = None,
) -> SessionInfo | None:
    """The session's state on ``inst`` once it runs there, or None if it failed or timed out."""
    deadline = time.monotonic() + ready_timeout
    try:
        async with asyncio.timeout(ready_timeout):
            await _start(adapter, inst, session, info, deadline, events)
            delay = _POLL
            while True:
                state = await adapter.probe(inst.http, inst.config, session)
                if state is not None and state.status in RUNNING:
                    return state
                if state is not None and state.status is SessionStatus.FAILED:
                    return None
                # Starting takes seconds; poll gently, within the deadline.
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, 0.5)
    except _Refused:
        return None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("restoring %s on %s failed: %r", session, inst.name, exc)
        return None


class _Refused(Exception):
    pass


async def _start(
    adapter: Adapter,
    inst: Instance,
    session: str,
    info: SessionInfo | None,
    deadline: float,
    events: EventLog | None,
) -> None:
    wait = _HELD_FIRST
    while True:
        try:
            if await adapter.start(inst.http, inst.config, session, info):
                return
            log.warning("instance %s refused to start session %s", inst.name, session)
            raise _Refused
        except HeldElsewhere as exc:
            RESTORE_HELD.labels(inst.name).inc()
            if events is not None:
                events.add("restore_held", session=session, instance=inst.name, detail=exc.detail)
            left = deadline - time.monotonic()
            log.warning(
                "session %s is held elsewhere (%s); trying again on %s in %.2fs",
                session,
                exc.detail,
                inst.name,
                min(wait, max(left, 0.0)),
            )
            # The deadline (asyncio.timeout around us) ends the wait.
            await asyncio.sleep(wait)
            wait = min(wait * 2, _HELD_MAX)
