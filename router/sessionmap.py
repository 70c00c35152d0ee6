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
written: ``load()`` / ``resync()`` warm it, later misses fill it, and another
replica's changes reach it through ``apply`` (the redis change feed, see
``router.store.sync``), off the hot path.

Remote changes and local writes of the same session can cross: replica A's
own write and replica B's published change for one session travel on two
different connections, so A cannot tell from arrival order which one redis
applied last. ``apply`` therefore trusts a remote owner only for sessions
this process has not written in the last ``conflict_window`` seconds; for
one it is writing (or just wrote) with a different owner, it drops the
cache entry, and the next lookup reads the store, which knows the order.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator, KeysView, Mapping
from types import MappingProxyType
from typing import NamedTuple

from router.singleflight import SingleFlight
from router.store.base import SessionStore, StoreUnavailable
from router.store.memory import MemoryStore

__all__ = ["Resync", "SessionMap", "StoreUnavailable"]


class Resync(NamedTuple):
    """What ``SessionMap.resync`` did."""

    scanned: int  # pairs read from the store
    changed: int  # cache entries added or given a new owner
    dropped: int  # cache entries the store no longer has, removed
    kept: bool  # keep_missing: cached sessions the store lacks were kept


class SessionMap:
    def __init__(self, store: SessionStore, *, conflict_window: float = 1.0) -> None:
        self.store = store
        self.conflict_window = conflict_window
        self._shared = isinstance(store, MemoryStore)
        self._cache: dict[str, str] = store.data if isinstance(store, MemoryStore) else {}
        self._counts: dict[str, int] = {}
        self._counts_view: Mapping[str, int] = MappingProxyType(self._counts)
        if self._shared:
            # The store may already hold entries (written before this map).
            self._counts.update(Counter(self._cache.values()))
        # Store reads in flight, one per session; sessions that changed while
        # theirs was in flight (the answer goes to its waiters, not the cache).
        self._reads: SingleFlight[str, str | None] = SingleFlight("store-read")
        self._stale: set[str] = set()
        # One set per running load(): sessions changed while it scans.
        self._loads: list[set[str]] = []
        # Bumped by invalidate_all(): a load() running stops filling.
        self._generation = 0
        # Local writes in flight per session, and sessions a remote change
        # crossed while being written.
        self._writing: dict[str, int] = {}
        self._conflicts: set[str] = set()
        # Sessions written recently: two generations of sets, rotated every
        # conflict_window (no per-session timestamps: a bulk write of a
        # million sessions costs two set entries each, briefly).
        self._recent: set[str] = set()
        self._recent_prev: set[str] = set()
        self._recent_since = 0.0  # when the current generation started
        self._recent_last = 0.0  # the latest write recorded
        # Plain counters, read by metrics later.
        self.hits = 0  # cached()/lookup() answered from the cache
        self.misses = 0  # cached()/lookup() found nothing in the cache
        self.store_hits = 0  # a store read found the session
        self.store_misses = 0  # a store read did not
        self.store_errors = 0  # a store read raised StoreUnavailable
        self.remote_applied = 0  # remote changes applied to the cache (apply)
        self.remote_conflicts = 0  # remote changes that crossed a local write: entry dropped

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
        if not self._reads.running(session):
            self._stale.discard(session)
        return await self._reads.run(session, lambda: self._read(session))

    async def _read(self, session: str) -> str | None:
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
            if session not in self._stale and session not in self._cache:
                self._put(session, owner)
            return owner
        finally:
            self._stale.discard(session)

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
        self._begin_write(session)
        try:
            await self.store.set(session, instance)
        finally:
            self._touch(session)
            if self._end_write(session, time.monotonic()):
                self._drop(session)
            else:
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
            self._begin_write(session)
        try:
            await self.store.set_many(interned)
        finally:
            now = time.monotonic()
            for session, instance in interned.items():
                self._touch(session)
                if self._end_write(session, now):
                    self._drop(session)
                else:
                    self._put(session, instance)

    async def forget(self, session: str) -> None:
        """Unmap ``session`` (deleted upstream). The cache entry goes even if the store fails."""
        if self._shared:
            old = self._cache.get(session)
            await self.store.delete(session)  # the same dict, no await inside
            self._count_move(old, None)
            return
        self._begin_write(session)
        try:
            await self.store.delete(session)
        finally:
            self._touch(session)
            self._end_write(session, time.monotonic())
            self._drop(session)

    # -- cache control ------------------------------------------------------

    def apply(self, changes: Mapping[str, str | None]) -> int:
        """Another replica changed these sessions (owner, or ``None`` = forgotten).

        Called by the change-feed subscriber, in the order redis applied the
        changes. Updates the cache in place (no store round trip) and
        returns how many entries changed. A session this process is writing,
        or wrote within ``conflict_window`` with a different owner, is
        dropped instead (the next lookup asks the store, see the module
        docstring). A no-op with ``MemoryStore`` (one process, one dict).
        """
        if self._shared:
            return 0
        cache = self._cache
        self.expire_recent()
        recent, older = self._recent, self._recent_prev
        intern = sys.intern
        changed = 0
        for session, owner in changes.items():
            current = cache.get(session)
            if session in self._writing:
                self._conflicts.add(session)
                self.remote_conflicts += 1
            elif session in recent or session in older:
                if current == owner:
                    continue  # the same answer: nothing crossed
                self.remote_conflicts += 1
                owner = None  # drop: the store knows which write came last
            self._touch(session)
            if owner is None:
                if current is not None:
                    self._drop(session)
                    changed += 1
            elif current != owner:
                self._put(session, intern(owner))
                changed += 1
        self.remote_applied += changed
        return changed

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
        self._stale.update(self._reads.keys())
        self._cache.clear()
        self._counts.clear()

    async def resync(self, *, keep_missing: bool = False) -> Resync:
        """Bring the cache in line with the store without emptying it first.

        For after a gap in the change feed (a redis outage, a dropped
        subscriber): every stored pair whose owner differs from the cache is
        taken, and cached sessions the store no longer has are dropped, so
        the hot path keeps its hits and ``counts()`` stays whole meanwhile.
        Sessions changed while it runs (local writes, ``apply``) keep their
        fresher entry. A scan that fails part-way drops nothing
        (``StoreUnavailable`` propagates, entries updated so far stay).

        ``keep_missing``: the store lost its data (redis restarted without
        persistence, flushed): a session it lacks is not a session gone, and
        dropping them all would turn every request into a probe of every
        instance. Stored pairs are still taken; nothing is dropped.

        Costs one set of the scanned session ids while it runs.
        """
        if self._shared:
            size = await self.load()
            return Resync(size, 0, 0, False)
        cache = self._cache
        # An empty cache has nothing to drop: no set needed.
        track = bool(cache) and not keep_missing
        seen: set[str] = set()
        generation = self._generation
        touched: set[str] = set()
        self._loads.append(touched)
        intern = sys.intern
        scanned = changed = dropped = 0
        complete = False
        try:
            async for session, instance in self.store.scan():
                if generation != self._generation:
                    break  # invalidate_all() ran: lookups will fill lazily
                scanned += 1
                if track:
                    seen.add(session)
                if session in touched:
                    continue
                if cache.get(session) != instance:
                    self._put(session, intern(instance))
                    changed += 1
            else:
                complete = True
            if complete and track:
                gone = [s for s in cache if s not in seen and s not in touched]
                for session in gone:
                    self._drop(session)
                dropped = len(gone)
        finally:
            self._loads.remove(touched)
        return Resync(scanned, changed, dropped, keep_missing)

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

    def entries(self) -> Iterator[tuple[str, str]]:
        """Every cached (session, owner), over a snapshot of the keys: the
        consumer may await, and the cache change, between two pairs."""
        cache = self._cache
        for session in list(cache):
            owner = cache.get(session)
            if owner is not None:
                yield session, owner

    def ids(self) -> KeysView[str]:
        """Every cached session id, as a live view: iterate it without awaiting.
        ``list(smap.ids())`` is a snapshot (a million ids take ~30 ms)."""
        return self._cache.keys()

    def peek(self, session: str) -> str | None:
        """``cached()`` without counting a hit or a miss (admin reads, not requests)."""
        return self._cache.get(session)

    def sessions_on(self, instance: str) -> list[str]:
        """Sessions cached on ``instance``. O(n): admin and failover only."""
        return [session for session, owner in self._cache.items() if owner == instance]

    def __len__(self) -> int:
        return len(self._cache)

    def expire_recent(self, now: float | None = None) -> None:
        """Forget local writes older than ``conflict_window`` (called by ``apply``
        and by the change-feed task when idle, so the sets do not linger)."""
        if not (self._recent or self._recent_prev):
            return
        if now is None:
            now = time.monotonic()
        window = self.conflict_window
        if now - self._recent_last >= window:
            self._recent = set()
            self._recent_prev = set()
        elif now - self._recent_since >= window:
            # Everything in the older generation was written > window ago.
            self._recent_prev = self._recent
            self._recent = set()
            self._recent_since = now

    # -- internals --------------------------------------------------------------

    def _begin_write(self, session: str) -> None:
        self._writing[session] = self._writing.get(session, 0) + 1
        self._touch(session)

    def _end_write(self, session: str, now: float) -> bool:
        """A local write of ``session`` ended; True if a remote change crossed it."""
        left = self._writing[session] - 1
        conflict = session in self._conflicts
        if left:
            self._writing[session] = left
        else:
            del self._writing[session]
            self._conflicts.discard(session)
        if now - self._recent_since >= self.conflict_window:
            self.expire_recent(now)
        if not self._recent:
            self._recent_since = now
        self._recent.add(session)
        self._recent_last = now
        return conflict

    def _touch(self, session: str) -> None:
        """``session`` changes now: reads in flight must not cache their answer."""
        if self._reads.running(session):
            self._stale.add(session)
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
