"""Asking one instance about one session: the one place that does it.

Every part of the router that needs "does this session run there?" (the
resolver, failover, discovery, migration, readiness, the admin API) asks
through here, with one timeout and one reading of the answer. The timeout is
``timeouts.connect + health.timeout`` (``Probe.timeout``, set at start and on
reload): long enough for a slow but alive instance, short enough not to
hold a failover.
"""

from __future__ import annotations

import asyncio
import enum
import logging

import aiohttp

from router.adapters.base import Adapter, SessionInfo, SessionStatus
from router.config import RouterConfig
from router.instances import Instance

log = logging.getLogger(__name__)

# A copy in one of these states runs on its instance.
RUNNING = frozenset({SessionStatus.READY, SessionStatus.STARTING, SessionStatus.NEEDS_AUTH})
# Which copy wins when a session answers on several instances (lower first).
PREFERENCE = {
    SessionStatus.READY: 0,
    SessionStatus.STARTING: 1,
    SessionStatus.NEEDS_AUTH: 2,
    SessionStatus.FAILED: 3,
    SessionStatus.STOPPED: 4,
}


class ProbeState(enum.Enum):
    RUNNING = "running"  # it runs there (starting, ready or asking for a QR)
    ABSENT = "absent"  # the instance answered: not there, or stopped / failed
    UNREACHABLE = "unreachable"  # no connection: it cannot be running there
    UNKNOWN = "unknown"  # connected, but no answer: it may well run there


class Probe:
    __slots__ = ("timeout",)

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout

    def configure(self, config: RouterConfig) -> None:
        """The timeout ``config`` gives (at start and on every reload)."""
        self.timeout = config.timeouts.connect + config.health.timeout

    async def info(self, adapter: Adapter, inst: Instance, session: str) -> SessionInfo | None:
        """``session`` as ``inst`` reports it; None when absent or unanswered."""
        try:
            async with asyncio.timeout(self.timeout):
                return await adapter.probe(inst.http, inst.config, session)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("probe of %s on %s failed: %r", session, inst.name, exc)
            return None

    async def state(self, adapter: Adapter, inst: Instance, session: str) -> ProbeState:
        """Whether ``session`` runs on ``inst`` (see ``ProbeState``)."""
        try:
            async with asyncio.timeout(self.timeout):
                info = await adapter.probe(inst.http, inst.config, session)
        except aiohttp.ClientConnectorError:
            return ProbeState.UNREACHABLE
        except (aiohttp.ClientError, OSError, TimeoutError):
            return ProbeState.UNKNOWN
        if info is not None and info.status in RUNNING:
            return ProbeState.RUNNING
        return ProbeState.ABSENT
