"""Per-session locks around a restore, so a session is never started twice.

Two requests on one replica already share one recovery (single-flight in
``router.failover``); the lock is what stops two *replicas* from restoring the
same session at once. ``LocalLocks`` serves the embedded single process; the
redis store brings ``router.store.redis_locks.RedisLocks`` (a token and an
expiry per lock, released only by its holder).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager


class LockBusy(Exception):
    """Someone else holds the lock for this session right now."""


class SessionLocks(ABC):
    @abstractmethod
    def hold(self, session: str, ttl: float) -> AbstractAsyncContextManager[None]:
        """``async with locks.hold(s, ttl):`` or raise ``LockBusy`` at once.

        ``ttl`` bounds how long a crashed holder can block others.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalLocks(SessionLocks):
    def __init__(self) -> None:
        self._held: set[str] = set()

    def hold(self, session: str, ttl: float) -> AbstractAsyncContextManager[None]:
        return self._hold(session)

    @asynccontextmanager
    async def _hold(self, session: str) -> AsyncIterator[None]:
        if session in self._held:
            raise LockBusy(session)
        self._held.add(session)
        try:
            yield
        finally:
            self._held.discard(session)
