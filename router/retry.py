"""When a request may be sent again, and how often the fleet can afford it.

The replay table of ``shared/design.md``, as code:

| what happened                                   | idempotent | POST/PATCH | Idempotency-Key |
|-------------------------------------------------|------------|------------|-----------------|
| connection never established (refused, DNS, ...)| replay     | replay     | replay          |
| stale pooled connection, request never written  | replay     | replay     | replay          |
| adapter: "session not here"                     | recover    | recover    | recover         |
| reset / timeout after the request was written   | replay     | **no**     | stored result   |
| upstream 5xx with a body                        | pass       | pass       | pass            |

A duplicated WhatsApp message is worse than an error, so everything that
cannot prove non-delivery is answered, not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from router.transport.base import IDEMPOTENT_METHODS


def may_replay(method: str, *, request_sent: bool) -> bool:
    """May a request that failed at the transport level be sent again?

    After the bytes left, only a method the client declared repeatable is
    safe. An Idempotency-Key does not make a resend safe (the upstream may
    have acted): it only lets the router answer the *client's* repeats."""
    return not request_sent or method in IDEMPOTENT_METHODS


class RetryBudget:
    """Replays in flight may be at most ``ratio`` of the requests in flight
    (never fewer than ``min_retries``), as Envoy's retry budgets.

    A replay waits (bounded) for a slot instead of failing at once: when an
    instance dies, every request for its sessions wants one replay at the
    same moment, and queueing them for milliseconds beats answering errors.
    What the budget prevents is a storm multiplying load on a struggling fleet.
    """

    __slots__ = ("_active", "_retrying", "_waiters", "min_retries", "ratio")

    def __init__(self, ratio: float = 0.2, min_retries: int = 3) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self._active = 0
        self._retrying = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def request(self) -> Replays:
        """One request in flight (it widens the budget) and the replay slot it
        may hold, given back however the request ends: ``with budget.request()
        as replays``. A class, not a generator: it runs on every request."""
        return Replays(self)

    def _allowed(self) -> int:
        return max(self.min_retries, int(self._active * self.ratio))

    def try_acquire(self) -> bool:
        if self._retrying >= self._allowed():
            return False
        self._retrying += 1
        return True

    async def acquire(self, wait: float) -> bool:
        """A replay slot within ``wait`` seconds, or False."""
        if not self._waiters and self.try_acquire():
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        acquired = False
        try:
            async with asyncio.timeout(wait):
                while True:
                    await fut
                    if self.try_acquire():
                        acquired = True
                        return True
                    fut = asyncio.get_running_loop().create_future()
                    self._waiters.appendleft(fut)
        except TimeoutError:
            return False
        finally:
            if not fut.done():
                fut.cancel()
            elif not acquired and not fut.cancelled():
                # Woken as we gave up: pass the wake-up on, or a free slot
                # would go unnoticed by the others waiting.
                self._wake_next()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def release(self) -> None:
        self._retrying -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    @property
    def retrying(self) -> int:
        return self._retrying


class Replays:
    """One request's use of the budget: at most one slot, held while a replay
    is in flight (not while recovery runs)."""

    __slots__ = ("_budget", "_held")

    def __init__(self, budget: RetryBudget) -> None:
        self._budget = budget
        self._held = False

    def __enter__(self) -> Replays:
        self._budget._active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()
        self._budget._active -= 1

    async def take(self, wait: float) -> bool:
        """A slot for the next attempt, within ``wait`` seconds."""
        self.done()
        self._held = await self._budget.acquire(wait)
        return self._held

    def done(self) -> None:
        """The attempt that held a slot is over (answered or failed)."""
        if self._held:
            self._held = False
            self._budget.release()
