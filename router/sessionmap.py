"""``SessionMap``: the in-process cache of session -> instance in front of a store.

The proxy's hot path is ``cached(session)``: one dict ``get`` and an int
increment, no store round trip, no lock, no await. Only a cache miss goes
to the store (``fetch``), and only a store miss goes on to ask the
instances (the caller's job: "never guess").

Invariants:

* ``counts()`` is always ``Counter(cached values)``: it is kept up to date
  incrementally by every change of the cache (O(1) each), never recomputed
  on a request. Placement reads it.
* Every change goes through the map (``assign``, ``assign_many``,
  ``forget``, ``invalidate*``); it replaces or drops the cache entry, so no
  stale owner is served after it returns. A store read that was in flight
  while an entry changed does not put its (possibly older) answer in the
  cache.
* With ``MemoryStore`` the cache *is* the store's dict (one copy of a
  million mappings, not two); writes still go through the store API. The
  dict is then authoritative: a cache miss is a store miss, and
  ``invalidate`` has nothing to drop.
* Instance names are interned, so a million values share a handful of
  string objects.

With a shared store (redis) the cache holds what this process has read or
written: ``load()`` warms it at start, later misses fill it, and another
replica's changes reach it through ``invalidate`` (pub/sub, later).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType

from router.store.base import SessionStore, StoreUnavailable
from router.store.memory import MemoryStore

__all__ = ["SessionMap", "StoreUnavailable"]


class _Fetch:
    """One store read in flight for one session, shared by every waiter."""

    __slots__ = ("stale", "task")

    def __init__(self) -> None:
        # Set when the entry changes while the read is in flight: the answer
        # is still returned to the waiters but never cached.
        self.stale = False
        self.task: asyncio.Future[str | None] | None = None


def _consume(task: asyncio.Future[str | None]) -> None:
    # Every waiter may have been cancelled; don't let asyncio log
    # "exception was never retrieved" for a StoreUnavailable nobody awaits.
    if not task.cancelled():
        task.exception()


class SessionMap:
    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self._shared = isinstance(store, MemoryStore)
        self._cache: dict[str, str] = store.data if isinstance(store, MemoryStore) else {}
        self._counts: dict[str, int] = {}
        self._counts_view: Mapping[str, int] = MappingProxyType(self._counts)
        if self._shared:
            # The store may already hold entries (written before this map).
            self._counts.update(Counter(self._cache.values()))
        self._fetches: dict[str, _Fetch] = {}
        # One set per running load(): sessions changed while it scans.
        self._loads: list[set[str]] = []
        # Bumped by invalidate_all(): a load() running stops filling.
        self._generation = 0
        # Plain counters, read by metrics later.
        self.hits = 0  # cached()/lookup() answered from the cache
        self.misses = 0  # cached()/lookup() found nothing in the cache
        self.store_hits = 0  # a store read found the session
        self.store_misses = 0  # a store read did not
        self.store_errors = 0  # a store read raised StoreUnavailable

    # -- the hot path --------------------------------------------------

    def cached(self, session: str) -> str | None:
        """The owner if this process knows it, else ``None``. Never touches the store."""
        owner = self._cache.get(session)
        if owner is None:
            self.misses += 1
        else:
            self.hits += 1
        return owner

    # -- reads that may go to the store --------------------------------

    async def lookup(self, session: str) -> str | None:
        """Cache, then store on a miss (filling the cache).

        ``None`` means the store does not know the session either (ask the
        instances). ``StoreUnavailable`` propagates: the caller decides.
        Counts a cache hit or miss like ``cached()``; after ``cached()``
        returned ``None``, call ``fetch()`` instead so the miss is not
        counted twice.
        """
        owner = self._cache.get(session)
        if owner is not None:
            self.hits += 1
            return owner
        self.misses += 1
        return await self.fetch(session)

    async def fetch(self, session: str) -> str | None:
        """The store part of ``lookup``: concurrent reads of one session share one call."""
        owner = self._cache.get(session)
        if owner is not None:
            return owner
        if self._shared:
            # The cache is the store's own dict: nothing more to ask.
            self.store_misses += 1
            return None
        fetch = self._fetches.get(session)
        if fetch is None:
            fetch = _Fetch()
            task = asyncio.ensure_future(self._read(session, fetch))
            task.add_done_callback(_consume)
            fetch.task = task
            self._fetches[session] = fetch
        assert fetch.task is not None
        # A waiter cancelled must not cancel the read the others wait for.
        return await asyncio.shield(fetch.task)

    async def _read(self, session: str, fetch: _Fetch) -> str | None:
        try:
            try:
                owner = await self.store.get(session)
            except StoreUnavailable:
                self.store_errors += 1
                raise
            if owner is None:
                self.store_misses += 1
                return None
            self.store_hits += 1
            owner = sys.intern(owner)
            if not fetch.stale and session not in self._cache:
                self._put(session, owner)
            return owner
        finally:
            if self._fetches.get(session) is fetch:
                del self._fetches[session]

    # -- writes ----------------------------------------------------------

    async def assign(self, session: str, instance: str) -> None:
        """Map ``session`` to ``instance``: write to the store, then the cache.

        If the store write raises ``StoreUnavailable`` the cache is updated
        all the same (the caller is telling us where the session runs, the
        instances being the source of truth) and the error is re-raised, so
        the caller knows the store lags; this process never serves the old
        owner either way.
        """
        instance = sys.intern(instance)
        if self._shared:
            old = self._cache.get(session)
            await self.store.set(session, instance)  # the same dict, no await inside
            self._count_move(old, instance)
            return
        self._touch(session)
        try:
            await self.store.set(session, instance)
        finally:
            self._touch(session)
            self._put(session, instance)

    async def assign_many(self, mapping: Mapping[str, str]) -> None:
        """``assign`` for many sessions, one batched store write (discovery, failover)."""
        intern = sys.intern
        if self._shared:
            cache = self._cache
            for session, instance in mapping.items():
                self._count_move(cache.get(session), instance)
            await self.store.set_many(mapping)  # the same dict, no await inside
            return
        interned = {session: intern(instance) for session, instance in mapping.items()}
        for session in interned:
            self._touch(session)
        try:
            await self.store.set_many(interned)
        finally:
            for session, instance in interned.items():
                self._touch(session)
                self._put(session, instance)

    async def forget(self, session: str) -> None:
        """Unmap ``session`` (deleted upstream). The cache entry goes even if the store fails."""
        if self._shared:
            old = self._cache.get(session)
            await self.store.delete(session)  # the same dict, no await inside
            self._count_move(old, None)
            return
        self._touch(session)
        try:
            await self.store.delete(session)
        finally:
            self._touch(session)
            self._drop(session)

    # -- cache control ------------------------------------------------------

    def invalidate(self, session: str) -> None:
        """Drop one cache entry (another replica changed it); the next lookup reads the store.

        A no-op with ``MemoryStore``, whose dict is the cache and the store.
        """
        if self._shared:
            return
        self._touch(session)
        self._drop(session)

    def invalidate_all(self) -> None:
        """Drop the whole cache (e.g. after losing the invalidation feed). No-op for memory."""
        if self._shared:
            return
        self._generation += 1
        for fetch in self._fetches.values():
            fetch.stale = True
        self._cache.clear()
        self._counts.clear()

    async def load(self) -> int:
        """Warm the cache from the store (``scan``) at start; returns the cache size.

        Fills only entries the cache lacks, and skips sessions changed while
        it runs, so it never overwrites a fresher answer. With
        ``MemoryStore`` it only recounts ``counts()`` from the shared dict.
        ``StoreUnavailable`` propagates (the cache keeps what was read).
        """
        if self._shared:
            self._counts.clear()
            self._counts.update(Counter(self._cache.values()))
            return len(self._cache)
        generation = self._generation
        touched: set[str] = set()
        self._loads.append(touched)
        intern = sys.intern
        cache = self._cache
        try:
            async for session, instance in self.store.scan():
                if generation != self._generation:
                    break  # invalidate_all() ran: lookups will fill lazily
                if session in touched or session in cache:
                    continue
                self._put(session, intern(instance))
        finally:
            self._loads.remove(touched)
        return len(cache)

    # -- views ---------------------------------------------------------------

    def counts(self) -> Mapping[str, int]:
        """Sessions per instance (a live read-only view; instances with none are absent)."""
        return self._counts_view

    def sessions_on(self, instance: str) -> list[str]:
        """Sessions cached on ``instance``. O(n): admin and failover only."""
        return [session for session, owner in self._cache.items() if owner == instance]

    def __len__(self) -> int:
        return len(self._cache)

    # -- internals --------------------------------------------------------------

    def _touch(self, session: str) -> None:
        """``session`` changes now: reads in flight must not cache their answer."""
        fetch = self._fetches.get(session)
        if fetch is not None:
            fetch.stale = True
        for touched in self._loads:
            touched.add(session)

    def _put(self, session: str, instance: str) -> None:
        old = self._cache.get(session)
        self._cache[session] = instance
        self._count_move(old, instance)

    def _drop(self, session: str) -> None:
        self._count_move(self._cache.pop(session, None), None)

    def _count_move(self, old: str | None, new: str | None) -> None:
        if old == new:
            return
        counts = self._counts
        if old is not None:
            left = counts.get(old, 0) - 1
            if left > 0:
                counts[old] = left
            else:
                counts.pop(old, None)
        if new is not None:
            counts[new] = counts.get(new, 0) + 1
