"""Cross-replica restore locks in redis: a token per holder, an expiry, renewal.

``RedisLocks.hold(session, ttl)`` is ``SET {prefix}lock:{session} <token> NX
PX ttl``: the one replica whose SET lands holds the lock, every other gets
``LockBusy`` at once (no waiting: the caller waits on the restore instead,
by watching the map). Release is a Lua compare-and-delete, so only the
holder's token can delete the key: a holder whose lock expired under it
cannot release the lock somebody else took since.

Expiry and renewal. ``ttl`` bounds how long a *crashed* holder blocks the
others (the key simply expires). A live holder renews its lock every
``ttl / 3`` (Lua compare-and-PEXPIRE), so a restore that runs longer than
``ttl`` does not lose the lock halfway and let a second replica start the
same session. If renewal finds the token gone (the lock expired while this
process could not reach redis, and someone may hold it now), it logs an
error and counts ``lost``; the caller's restore is already bounded by its own
timeout.

Redis unavailable. Taking the lock raises ``StoreUnavailable`` (bounded by
the store's connect and command timeouts, about a second). The policy we
recommend to the caller (failover), and why:

  **fail closed: do not start the session; answer 503 with Retry-After.**

  Before starting anything the caller may still probe the instances (that
  needs no lock): if the session turns up running somewhere, route to it.
  Only the *start on a new instance* is refused while redis is down.

  The alternative, proceeding with the in-process lock only, trades a
  bounded outage of the sessions whose instance died (they come back when
  redis does, or when an operator acts) for an unbounded risk: every
  replica sees the same dead owner at the same moment, so with redis down
  "two replicas restore the same session at once" is not a rare race but
  the expected outcome, and a WhatsApp session started twice is a real
  incident (two browsers fighting over one phone, possibly a logged-out
  number), while a 503 with Retry-After is a retry the client already
  handles. Releasing or renewing while redis is down only logs: the key
  expires after ``ttl``. (A SET that timed out against a *hung* redis may
  still be executed when it resumes: that orphan key blocks the session for
  at most ``ttl``, and never lets two holders in.)

Within one process a second ``hold`` of a held session is ``LockBusy``
without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NoReturn

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.locks import LockBusy, SessionLocks
from router.store.base import StoreUnavailable

if TYPE_CHECKING:
    from router.store.redis import RedisStore

__all__ = ["LockBusy", "RedisLocks"]

log = logging.getLogger(__name__)

_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

# KEYS[1] = lock key, ARGV[1] = token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS[1] = lock key, ARGV[1] = token, ARGV[2] = ttl in ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class RedisLocks(SessionLocks):
    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "wa-router:",
        where: str = "redis",
        renew: bool = True,
    ) -> None:
        """Locks under ``{key_prefix}lock:{session}`` through ``client`` (not closed here).

        ``renew=False`` lets a lock expire after ``ttl`` even while held
        (tests; callers whose work is strictly shorter than ``ttl``).
        """
        self._redis = client
        self.prefix = f"{key_prefix}lock:"
        self.where = where
        self.renew = renew
        self._release_script = client.register_script(_RELEASE)
        self._renew_script = client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # session -> token, held by this process
        self._renewals: set[asyncio.Task[bool]] = set()
        self._closed = False
        # Plain counters, for metrics.
        self.acquired = 0
        self.busy = 0  # LockBusy raised
        self.errors = 0  # redis unreachable when taking, renewing or releasing
        self.lost = 0  # the lock expired under a live holder (found by renew or release)

    @classmethod
    def for_store(cls, store: RedisStore, **kwargs: bool) -> RedisLocks:
        """Locks sharing ``store``'s client, pool and key prefix."""
        return cls(store.client, key_prefix=store.key_prefix, where=store.where, **kwargs)

    def key(self, session: str) -> str:
        return f"{self.prefix}{session}"

    def held(self) -> list[str]:
        """Sessions this process holds a lock for (admin, tests)."""
        return list(self._held)

    @asynccontextmanager
    async def hold(self, session: str, ttl: float) -> AsyncIterator[None]:
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        if session in self._held:
            self.busy += 1
            raise LockBusy(session)
        token = secrets.token_hex(16)
        key = self.key(session)
        px = max(1, round(ttl * 1000))
        self._held[session] = token
        try:
            await self._acquire(session, key, token, px)
            self.acquired += 1
            renewal: asyncio.Task[bool] | None = None
            if self.renew and not self._closed:
                renewal = asyncio.create_task(self._keep(session, key, token, px))
                self._renewals.add(renewal)
                renewal.add_done_callback(self._renewals.discard)
            try:
                yield
            finally:
                lost = False
                if renewal is not None:
                    if renewal.done() and not renewal.cancelled():
                        lost = renewal.result()
                    renewal.cancel()
                # Shielded: a holder cancelled again while releasing still
                # releases (in the background); failing that, the key expires.
                release = asyncio.ensure_future(self._release(session, key, token, lost))
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(release)
        finally:
            if self._held.get(session) == token:
                del self._held[session]

    async def close(self) -> None:
        """Stop renewing (shutdown). Held locks are released by their holders or expire."""
        self._closed = True
        for task in list(self._renewals):
            task.cancel()
        if self._renewals:
            await asyncio.gather(*self._renewals, return_exceptions=True)

    # -- internals -------------------------------------------------------------

    async def _acquire(self, session: str, key: str, token: str, px: int) -> None:
        try:
            if await self._redis.set(key, token, nx=True, px=px):
                return
            # Busy, or our own SET landed and its reply was lost, and the
            # retry on a fresh connection found the key: ours if the token is.
            if await self._redis.get(key) == token:
                return
        except _ERRORS as exc:
            self.errors += 1
            self._fail("SET NX", session, exc)
        self.busy += 1
        raise LockBusy(session)

    async def _keep(self, session: str, key: str, token: str, px: int) -> bool:
        """Renew until cancelled; returns True if the lock was found lost."""
        every = max(px / 3000, 0.001)
        failing = False
        while True:
            await asyncio.sleep(every)
            try:
                kept = await self._renew_script(keys=[key], args=[token, px])
            except _ERRORS as exc:
                self.errors += 1
                if not failing:
                    log.warning(
                        "cannot renew the restore lock of %s at %s (%s); it expires in %.1fs",
                        session,
                        self.where,
                        type(exc).__name__,
                        px / 1000,
                    )
                failing = True
                continue
            failing = False
            if not kept:
                self.lost += 1
                log.error(
                    "restore lock of %s expired while held (redis unreachable for longer "
                    "than its ttl?): another replica may restore it at the same time",
                    session,
                )
                return True

    async def _release(self, session: str, key: str, token: str, lost: bool) -> None:
        try:
            released = await self._release_script(keys=[key], args=[token])
        except _ERRORS as exc:
            self.errors += 1
            log.warning(
                "cannot release the restore lock of %s at %s (%s); it expires on its own",
                session,
                self.where,
                type(exc).__name__,
            )
            return
        if not released and not lost:
            self.lost += 1
            log.warning("restore lock of %s had expired before its holder released it", session)

    def _fail(self, op: str, session: str, exc: BaseException) -> NoReturn:
        detail = str(exc) or type(exc).__name__
        raise StoreUnavailable(
            f"redis {op} (restore lock of {session}) at {self.where} failed: "
            f"{type(exc).__name__}: {detail}"
        ) from None
