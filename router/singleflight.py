"""One piece of work per key at a time, however many ask for it.

Used where many requests want the same slow answer at once: a store read of
one session (``SessionMap``), the search for an unknown session's owner
(``Resolver``), a session's recovery (``Failover``). The work runs as its own
task: a caller that gives up (a client disconnecting, a bounded wait) never
cancels it for the others, and it finishes even when nobody waits any more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    __slots__ = ("_name", "_tasks")

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def task(self, key: K, start: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The task working on ``key``; ``start()`` makes one if none runs."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            task.set_name(f"{self._name}:{key}")
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return task

    async def run(self, key: K, start: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """Its result (or exception); cancelling the caller leaves the work running."""
        return await asyncio.shield(self.task(key, start))

    def running(self, key: K) -> bool:
        return key in self._tasks

    def keys(self) -> Iterator[K]:
        return iter(list(self._tasks))

    def tasks(self) -> list[asyncio.Task[V]]:
        return list(self._tasks.values())

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        # Every waiter may have gone: a failure nobody awaits is not "never retrieved".
        if not task.cancelled():
            task.exception()
