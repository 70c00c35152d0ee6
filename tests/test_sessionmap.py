"""``SessionMap``: the cache in front of the store, over both backends.

Besides the contract: a known session costs zero store round trips (proved
on redis with INFO commandstats and by stopping redis), counts stay equal to
``Counter(cached values)`` under any sequence of changes, and a store read in
flight while an entry changes never caches a stale owner.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from router.sessionmap import SessionMap
from router.store import MemoryStore, SessionStore, StoreUnavailable
from router.store.redis import RedisStore
from tests.support.redis_server import RedisServer
from tests.support.stores import instance_name, session_id


async def replica(store: SessionStore) -> SessionStore:
    """A second handle on the same data, as another router replica would have."""
    if isinstance(store, RedisStore):
        key_prefix = store.key.removesuffix("sessions")
        url = f"redis://{store.where.split('://', 1)[1]}"
        return RedisStore(url, key_prefix=key_prefix)
    return store


def assert_counts_consistent(smap: SessionMap) -> None:
    assert dict(smap.counts()) == dict(Counter(_cache(smap).values()))


def _cache(smap: SessionMap) -> Mapping[str, str]:
    return smap._cache


async def hget_calls(store: RedisStore) -> int:
    stats = await store.client.info("commandstats")
    entry = stats.get("cmdstat_hget")
    return int(entry["calls"]) if entry else 0


# -- basics, both backends ------------------------------------------------------


async def test_assign_then_cached(store: SessionStore) -> None:
    smap = SessionMap(store)
    assert smap.cached("s1") is None
    await smap.assign("s1", "wa-1")
    assert smap.cached("s1") == "wa-1"
    assert await smap.lookup("s1") == "wa-1"
    assert await store.get("s1") == "wa-1"  # written through
    assert (smap.hits, smap.misses) == (2, 1)
    assert (smap.store_hits, smap.store_misses) == (0, 0)
    assert len(smap) == 1


async def test_lookup_reads_the_store_on_a_miss(store: SessionStore) -> None:
    other = await replica(store)
    await other.set("s1", "wa-1")  # written by someone else
    smap = SessionMap(store)
    assert await smap.lookup("s1") == "wa-1"
    assert smap.cached("s1") == "wa-1"  # now cached
    assert dict(smap.counts()) == {"wa-1": 1}
    if isinstance(store, RedisStore):
        assert (smap.hits, smap.misses, smap.store_hits) == (1, 1, 1)
        await other.close()


async def test_unknown_session_is_not_negatively_cached(store: SessionStore) -> None:
    smap = SessionMap(store)
    assert await smap.lookup("nobody") is None
    assert await smap.lookup("nobody") is None
    assert smap.store_misses == 2
    assert smap.misses == 2
    assert len(smap) == 0
    # fetch() after cached() counts the cache miss once.
    assert smap.cached("nobody") is None
    assert await smap.fetch("nobody") is None
    assert smap.misses == 3


async def test_counts_bookkeeping(store: SessionStore) -> None:
    smap = SessionMap(store)
    await smap.assign("a", "wa-1")
    await smap.assign("b", "wa-1")
    await smap.assign("c", "wa-2")
    assert dict(smap.counts()) == {"wa-1": 2, "wa-2": 1}

    await smap.assign("a", "wa-2")  # move
    assert dict(smap.counts()) == {"wa-1": 1, "wa-2": 2}
    assert smap.cached("a") == "wa-2"
    assert await store.get("a") == "wa-2"

    await smap.assign("a", "wa-2")  # same owner again: no change
    assert dict(smap.counts()) == {"wa-1": 1, "wa-2": 2}

    await smap.forget("b")
    assert dict(smap.counts()) == {"wa-2": 2}  # an instance with none is absent
    await smap.forget("never-mapped")
    assert smap.cached("b") is None and await store.get("b") is None

    await smap.assign_many({"a": "wa-3", "d": "wa-3", "e": "wa-1"})
    assert dict(smap.counts()) == {"wa-1": 1, "wa-2": 1, "wa-3": 2}
    assert sorted(smap.sessions_on("wa-3")) == ["a", "d"]
    assert smap.sessions_on("wa-9") == []
    assert len(smap) == 4
    assert_counts_consistent(smap)

    view = smap.counts()
    await smap.assign("f", "wa-4")
    assert view["wa-4"] == 1  # a live view, not a copy
    with pytest.raises(TypeError):
        view["wa-4"] = 5  # type: ignore[index]


async def test_counts_stay_consistent_under_random_changes(store: SessionStore) -> None:
    rng = random.Random(7)
    smap = SessionMap(store)
    sessions = [f"s{i}" for i in range(60)]
    instances = ["wa-1", "wa-2", "wa-3", "wa-4"]
    for _ in range(600):
        op = rng.random()
        session = rng.choice(sessions)
        if op < 0.5:
            await smap.assign(session, rng.choice(instances))
        elif op < 0.6:
            await smap.assign_many({s: rng.choice(instances) for s in rng.sample(sessions, 5)})
        elif op < 0.75:
            await smap.forget(session)
        elif op < 0.85:
            smap.invalidate(session)
        else:
            await smap.lookup(session)
        assert_counts_consistent(smap)
    # After all that, the cache agrees with the store for every cached entry.
    for session, owner in list(_cache(smap).items()):
        assert await store.get(session) == owner


async def test_load_warms_the_cache(store: SessionStore) -> None:
    mapping = {session_id(i): instance_name(i) for i in range(10_000)}
    await store.set_many(mapping)
    smap = SessionMap(store)
    assert await smap.load() == 10_000
    assert len(smap) == 10_000
    assert dict(smap.counts()) == dict(Counter(mapping.values()))
    assert dict(smap.counts()) == {f"wa-{i}": 2_000 for i in range(5)}
    # Every cached instance name is one shared string object per instance.
    assert len({id(v) for v in _cache(smap).values()}) == 5
    calls = await hget_calls(store) if isinstance(store, RedisStore) else 0
    for session, owner in mapping.items():
        assert smap.cached(session) == owner
        assert await smap.lookup(session) == owner
    assert smap.hits == 20_000 and smap.misses == 0
    assert smap.store_hits == smap.store_misses == 0
    if isinstance(store, RedisStore):
        assert await hget_calls(store) == calls  # zero round trips for 20,000 reads
    assert len(smap.sessions_on("wa-3")) == 2_000


async def test_memory_backend_keeps_one_copy() -> None:
    store = MemoryStore()
    await store.set("pre", "wa-1")  # written before the map existed
    smap = SessionMap(store)
    assert _cache(smap) is store.data  # the cache is the store's dict
    assert dict(smap.counts()) == {"wa-1": 1}
    await smap.assign("s1", "wa-2")
    assert store.data == {"pre": "wa-1", "s1": "wa-2"}
    # invalidate has nothing to drop: the dict is the truth.
    smap.invalidate("s1")
    smap.invalidate_all()
    assert smap.cached("s1") == "wa-2"
    assert await smap.load() == 2
    assert dict(smap.counts()) == {"wa-1": 1, "wa-2": 1}


# -- redis: zero round trips, failures, replicas ---------------------------------


async def test_known_session_needs_no_store_round_trip(
    redis_server: RedisServer, rstore: RedisStore
) -> None:
    smap = SessionMap(rstore)
    await smap.assign("known", "wa-1")
    calls = await hget_calls(rstore)
    for _ in range(1_000):
        assert smap.cached("known") == "wa-1"
        assert await smap.lookup("known") == "wa-1"
    assert await hget_calls(rstore) == calls

    redis_server.stop()
    # Still served from the cache with redis gone...
    assert smap.cached("known") == "wa-1"
    assert await smap.lookup("known") == "wa-1"
    # ...while an unknown session reports the store down for the caller to decide.
    with pytest.raises(StoreUnavailable):
        await smap.lookup("unknown")
    assert smap.store_errors == 1
    assert smap.cached("unknown") is None

    redis_server.start()  # empty
    assert await smap.lookup("unknown") is None
    assert await smap.lookup("known") == "wa-1"  # the cache outlives a store restart


async def test_assign_while_redis_is_down(redis_server: RedisServer, rstore: RedisStore) -> None:
    smap = SessionMap(rstore)
    await smap.assign("s1", "wa-1")
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        await smap.assign("s1", "wa-2")
    # The caller told us where it runs: no stale owner served.
    assert smap.cached("s1") == "wa-2"
    assert dict(smap.counts()) == {"wa-2": 1}
    with pytest.raises(StoreUnavailable):
        await smap.forget("s1")
    assert smap.cached("s1") is None
    assert dict(smap.counts()) == {}
    with pytest.raises(StoreUnavailable):
        await smap.load()


async def test_invalidate_picks_up_another_replicas_change(rstore: RedisStore) -> None:
    other_store = await replica(rstore)
    try:
        mine, theirs = SessionMap(rstore), SessionMap(other_store)
        await theirs.assign("s1", "wa-1")
        assert await mine.lookup("s1") == "wa-1"

        await theirs.assign("s1", "wa-2")  # the other replica moves it
        assert mine.cached("s1") == "wa-1"  # stale until told (pub/sub, later)
        mine.invalidate("s1")
        assert mine.cached("s1") is None
        assert dict(mine.counts()) == {}
        assert await mine.lookup("s1") == "wa-2"
        assert dict(mine.counts()) == {"wa-2": 1}

        await theirs.assign_many({f"x{i}": "wa-3" for i in range(10)})
        await mine.load()
        assert len(mine) == 11
        mine.invalidate_all()
        assert len(mine) == 0 and dict(mine.counts()) == {}
        assert await mine.lookup("x3") == "wa-3"
        assert dict(mine.counts()) == {"wa-3": 1}
    finally:
        await other_store.close()


# -- races: reads in flight while an entry changes --------------------------------


class GatedStore(SessionStore):
    """A dict-backed store whose reads wait for ``gate`` (to stage races)."""

    def __init__(self, data: dict[str, str] | None = None) -> None:
        self.data = dict(data or {})
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()
        self.gets = 0
        self.fail: Exception | None = None

    async def get(self, session: str) -> str | None:
        self.gets += 1
        value = self.data.get(session)  # read *before* waiting: the answer may go stale
        self.reading.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return value

    async def set(self, session: str, instance: str) -> None:
        self.data[session] = instance

    async def set_many(self, mapping: Mapping[str, str]) -> None:
        self.data.update(mapping)

    async def delete(self, session: str) -> None:
        self.data.pop(session, None)

    async def scan(self) -> AsyncIterator[tuple[str, str]]:
        for i, (session, instance) in enumerate(list(self.data.items())):
            yield session, instance
            if i == 0:
                self.reading.set()
                await self.gate.wait()

    async def ping(self) -> bool:
        return True

    async def get_note(self, session: str) -> dict[str, Any] | None:
        return None

    async def set_note(self, session: str, note: Mapping[str, Any]) -> None:
        pass

    async def delete_note(self, session: str) -> None:
        pass


async def _start_read(store: GatedStore, smap: SessionMap, session: str) -> asyncio.Task[object]:
    task: asyncio.Task[object] = asyncio.create_task(smap.lookup(session))
    await store.reading.wait()
    return task


async def test_read_in_flight_does_not_cache_over_an_assign() -> None:
    store = GatedStore({"s1": "wa-1"})
    smap = SessionMap(store)
    read = await _start_read(store, smap, "s1")
    await smap.assign("s1", "wa-2")
    store.gate.set()
    assert await read == "wa-1"  # it read before the move
    assert smap.cached("s1") == "wa-2"  # but the cache keeps the newer owner
    assert dict(smap.counts()) == {"wa-2": 1}


@pytest.mark.parametrize("change", ["forget", "invalidate", "invalidate_all"])
async def test_read_in_flight_does_not_resurrect(change: str) -> None:
    store = GatedStore({"s1": "wa-1"})
    smap = SessionMap(store)
    read = await _start_read(store, smap, "s1")
    if change == "forget":
        await smap.forget("s1")
    else:
        getattr(smap, change)(*(["s1"] if change == "invalidate" else []))
    store.gate.set()
    assert await read == "wa-1"
    assert smap.cached("s1") is None
    assert dict(smap.counts()) == {}


async def test_concurrent_misses_share_one_store_read() -> None:
    store = GatedStore({"s1": "wa-1"})
    smap = SessionMap(store)
    reads = [asyncio.create_task(smap.lookup("s1")) for _ in range(20)]
    await store.reading.wait()
    reads[0].cancel()  # one waiter giving up must not cancel the others' read
    store.gate.set()
    results = await asyncio.gather(*reads[1:])
    assert results == ["wa-1"] * 19
    assert store.gets == 1
    assert smap.store_hits == 1
    assert smap.cached("s1") == "wa-1"


async def test_store_error_reaches_every_waiter() -> None:
    store = GatedStore({"s1": "wa-1"})
    store.fail = StoreUnavailable("down")
    smap = SessionMap(store)
    reads = [asyncio.create_task(smap.lookup("s1")) for _ in range(5)]
    store.gate.set()
    results = await asyncio.gather(*reads, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert store.gets == 1 and smap.store_errors == 1
    # The next lookup tries the store again.
    store.fail = None
    assert await smap.lookup("s1") == "wa-1"


async def test_load_never_overwrites_a_fresher_entry() -> None:
    store = GatedStore({"a": "wa-1", "b": "wa-1", "c": "wa-1"})
    smap = SessionMap(store)
    load = asyncio.create_task(smap.load())
    await store.reading.wait()  # "a" already yielded, "b" and "c" read but not yet
    await smap.assign("b", "wa-2")
    await smap.forget("c")
    store.gate.set()
    assert await load == 2
    assert smap.cached("a") == "wa-1"
    assert smap.cached("b") == "wa-2"
    assert smap.cached("c") is None
    assert dict(smap.counts()) == {"wa-1": 1, "wa-2": 1}


async def test_invalidate_all_stops_a_running_load() -> None:
    store = GatedStore({"a": "wa-1", "b": "wa-1", "c": "wa-1"})
    smap = SessionMap(store)
    load = asyncio.create_task(smap.load())
    await store.reading.wait()
    smap.invalidate_all()
    store.gate.set()
    assert await load == 0
    assert len(smap) == 0 and dict(smap.counts()) == {}
    assert await smap.lookup("b") == "wa-1"  # filled lazily instead
