"""Start a session on a chosen instance and wait (bounded) until it reports in.

Used by failover (restore after a crash), migration (drain, move) and
rebalancing. The caller holds the session's lock.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from router.adapters.base import Adapter, SessionInfo, SessionStatus
from router.instances import Instance

log = logging.getLogger(__name__)

# A session that reached one of these runs on the instance: stop waiting.
_SETTLED = frozenset({SessionStatus.READY, SessionStatus.NEEDS_AUTH})
_POLL = 0.05


async def start_and_wait(
    adapter: Adapter,
    inst: Instance,
    session: str,
    info: SessionInfo | None,
    ready_timeout: float,
) -> SessionInfo | None:
    """The session's state on ``inst`` once settled, or None if it failed or timed out."""
    deadline = time.monotonic() + ready_timeout
    try:
        async with asyncio.timeout(ready_timeout):
            if not await adapter.start(inst.http, inst.config, session, info):
                log.warning("instance %s refused to start session %s", inst.name, session)
                return None
            delay = _POLL
            while True:
                state = await adapter.probe(inst.http, inst.config, session)
                if state is not None and state.status in _SETTLED:
                    return state
                if state is not None and state.status is SessionStatus.FAILED:
                    return None
                # Starting takes seconds; poll gently, within the deadline.
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, 0.5)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("restoring %s on %s failed: %r", session, inst.name, exc)
        return None
