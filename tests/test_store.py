"""The ``SessionStore`` contract, run against both backends, plus redis failure behaviour.

The redis backend runs against a private redis-server (tests/support/redis_server.py),
each test under its own key prefix.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from router.config import StoreConfig
from router.store import MemoryStore, SessionStore, StoreUnavailable, build_store
from router.store.redis import RedisStore
from tests.support.redis_server import RedisServer
from tests.support.stores import instance_name, session_id

# The configured op timeout is 1 s; a down or hung redis must answer within
# this (one timeout, plus slack for a slow CI machine), never hang.
FAIL_BOUND = 2.5


async def collect(store: SessionStore) -> dict[str, str]:
    return {session: instance async for session, instance in store.scan()}


# -- the contract, both backends -------------------------------------------


async def test_get_set_delete(store: SessionStore) -> None:
    assert await store.get("s1") is None
    await store.set("s1", "wa-1")
    assert await store.get("s1") == "wa-1"
    await store.set("s1", "wa-2")
    assert await store.get("s1") == "wa-2"
    await store.delete("s1")
    assert await store.get("s1") is None
    await store.delete("s1")  # deleting an unknown session is not an error
    assert await store.ping() is True


async def test_set_many_and_scan_10k(store: SessionStore) -> None:
    mapping = {session_id(i): instance_name(i) for i in range(10_000)}
    assert len(mapping) == 10_000
    await store.set_many(mapping)
    assert await collect(store) == mapping
    assert await store.get(session_id(1234)) == instance_name(1234)

    # Overwrite a slice, delete another, and scan again.
    moved = {session_id(i): "wa-new" for i in range(0, 10_000, 7)}
    await store.set_many(moved)
    for i in range(1, 10_000, 11):
        await store.delete(session_id(i))
    expected = {**mapping, **moved}
    for i in range(1, 10_000, 11):
        expected.pop(session_id(i))
    assert await collect(store) == expected


async def test_set_many_empty_is_a_no_op(store: SessionStore) -> None:
    await store.set_many({})
    assert await collect(store) == {}


async def test_scan_tolerates_changes_while_iterating(store: SessionStore) -> None:
    await store.set_many({f"s{i}": "wa-1" for i in range(500)})
    seen = 0
    async for session, _ in store.scan():
        seen += 1
        await store.delete(session)
        await store.set(f"new-{session}", "wa-2")
    assert seen >= 500  # every original pair at least once
    assert all(k.startswith("new-") for k in await collect(store))


async def test_instance_names_are_shared_strings() -> None:
    mem = MemoryStore()
    await mem.set("a", "".join(["wa-", "1"]))
    await mem.set_many({"b": "".join(["wa-", "1"])})
    assert mem.data["a"] is mem.data["b"]


# -- build_store --------------------------------------------------------------


async def test_build_store() -> None:
    assert isinstance(build_store(StoreConfig()), MemoryStore)
    # No I/O at build time: an unreachable URL builds fine.
    built = build_store(StoreConfig(url="redis://127.0.0.1:1/0", key_prefix="x:"))
    assert isinstance(built, RedisStore)
    assert built.key == "x:sessions"
    await built.close()
    with pytest.raises(ValueError, match="memory"):
        build_store(StoreConfig(url="http://127.0.0.1:6379"))


# -- redis specifics ------------------------------------------------------------


async def test_key_prefix_isolates(redis_url: str, rstore: RedisStore) -> None:
    other = RedisStore(redis_url, key_prefix=rstore.key + "-other:")
    try:
        await rstore.set("s1", "wa-1")
        assert await other.get("s1") is None
        assert await collect(other) == {}
        assert await rstore.count() == 1
    finally:
        await other.close()


async def test_every_redis_error_becomes_store_unavailable(rstore: RedisStore) -> None:
    # A redis-side error (WRONGTYPE), not a connection one.
    await rstore.client.set(rstore.key, "not a hash")
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await rstore.get("s1")
    with pytest.raises(StoreUnavailable):
        await rstore.set_many({"a": "wa-1"})
    with pytest.raises(StoreUnavailable):
        _ = [pair async for pair in rstore.scan()]


async def test_error_message_hides_password(redis_server: RedisServer, redis_url: str) -> None:
    # No such user on this server: AUTH fails, and the message must not echo the password.
    store = RedisStore(f"redis://nobody:s3cret-pw@127.0.0.1:{redis_server.port}/0")
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get("s1")
        assert "s3cret-pw" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__
    finally:
        await store.close()


async def _assert_unavailable_fast(store: RedisStore) -> None:
    ops = {
        "get": store.get("s1"),
        "set": store.set("s1", "wa-1"),
        "set_many": store.set_many({"s1": "wa-1", "s2": "wa-2"}),
        "delete": store.delete("s1"),
    }
    for name, op in ops.items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await op
        elapsed = time.monotonic() - started
        assert elapsed < FAIL_BOUND, f"{name} took {elapsed:.2f}s"
        assert info.value.__cause__ is None, "the redis traceback must not be chained"
    with pytest.raises(StoreUnavailable):
        _ = [pair async for pair in store.scan()]
    assert await store.ping() is False


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_redis_down_then_restarted(
    redis_server: RedisServer, rstore: RedisStore, how: str
) -> None:
    await rstore.set("s1", "wa-1")
    getattr(redis_server, how)()
    await _assert_unavailable_fast(rstore)

    redis_server.start()  # same port, empty
    # The same store object works again on the very next call.
    assert await rstore.get("s1") is None
    await rstore.set("s1", "wa-2")
    assert await rstore.get("s1") == "wa-2"
    assert await rstore.ping() is True
    await rstore.set_many({"s2": "wa-3", "s3": "wa-3"})
    assert await collect(rstore) == {"s1": "wa-2", "s2": "wa-3", "s3": "wa-3"}


async def test_restart_with_a_warm_pool(redis_server: RedisServer, rstore: RedisStore) -> None:
    # Several pooled connections, all dead after the restart: each next call
    # must succeed at once (stale connection dropped, command retried).
    await asyncio.gather(*(rstore.set(f"s{i}", "wa-1") for i in range(20)))
    redis_server.stop()
    redis_server.start()
    results = await asyncio.gather(*(rstore.get(f"s{i}") for i in range(20)))
    assert results == [None] * 20
    await asyncio.gather(*(rstore.set(f"s{i}", "wa-2") for i in range(20)))
    assert await rstore.count() == 20


async def test_hung_redis_times_out(redis_server: RedisServer, rstore: RedisStore) -> None:
    await rstore.set("s1", "wa-1")
    redis_server.pause()  # SIGSTOP: connections open, no answer
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            await rstore.get("s1")
        assert time.monotonic() - started < FAIL_BOUND
        # Many at once: pooled and brand-new connections alike are bounded.
        started = time.monotonic()
        results = await asyncio.gather(
            *(rstore.get(f"s{i}") for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert time.monotonic() - started < FAIL_BOUND
    finally:
        redis_server.resume()
    assert await rstore.get("s1") == "wa-1"


async def test_notes_round_trip_and_delete(store: SessionStore) -> None:
    assert await store.get_note("s1") is None
    await store.set_note("s1", {"workspace_id": 7, "account_id": 42})
    assert await store.get_note("s1") == {"workspace_id": 7, "account_id": 42}
    await store.set_note("s1", {"workspace_id": 7})
    assert await store.get_note("s1") == {"workspace_id": 7}
    await store.delete_note("s1")
    assert await store.get_note("s1") is None
    # Notes live beside the map, not in it.
    assert await collect(store) == {}
