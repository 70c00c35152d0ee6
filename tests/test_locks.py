"""Restore locks: ``LocalLocks`` and ``RedisLocks`` on a real private redis-server.

Each ``RedisLocks`` here has a client (a connection pool) of its own, as two
router replicas would; a crashed holder is a real process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from router.locks import LocalLocks, LockBusy, SessionLocks
from router.store.base import StoreUnavailable
from router.store.redis import RedisStore
from router.store.redis_locks import RedisLocks
from tests.support.redis_server import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[1]
# Store timeouts are 1 s; a down or hung redis must fail the lock within this.
FAIL_BOUND = 2.5

MakeLocks = Callable[..., Awaitable[RedisLocks]]


@pytest.fixture
async def make_locks(redis_url: str, redis_prefix: str) -> AsyncIterator[MakeLocks]:
    """``await make_locks(**kwargs)``: one more replica's ``RedisLocks`` (own store, own pool)."""
    made: list[tuple[RedisLocks, RedisStore]] = []

    async def make(**kwargs: bool) -> RedisLocks:
        store = RedisStore(redis_url, key_prefix=redis_prefix)
        locks = RedisLocks.for_store(store, **kwargs)
        made.append((locks, store))
        return locks

    yield make
    for locks, store in made:
        await locks.close()
        await store.close()


async def owner_token(locks: RedisLocks, session: str) -> str | None:
    value = await locks._redis.get(locks.key(session))
    return None if value is None else str(value)


# -- LocalLocks ------------------------------------------------------------------


async def test_local_locks() -> None:
    locks: SessionLocks = LocalLocks()
    async with locks.hold("s1", 1.0):
        with pytest.raises(LockBusy):
            async with locks.hold("s1", 1.0):
                pass
        async with locks.hold("s2", 1.0):
            pass
    async with locks.hold("s1", 1.0):
        pass


# -- RedisLocks ------------------------------------------------------------------


async def test_mutual_exclusion_between_replicas(make_locks: MakeLocks, redis_prefix: str) -> None:
    a, b = await make_locks(), await make_locks()
    async with a.hold("s1", 5.0):
        assert a.key("s1") == f"{redis_prefix}lock:s1"
        token = await owner_token(a, "s1")
        assert token is not None and len(token) == 32  # a random token, not a constant
        ttl_ms = await a._redis.pttl(a.key("s1"))
        assert 4000 < ttl_ms <= 5000
        started = time.monotonic()
        with pytest.raises(LockBusy):
            async with b.hold("s1", 5.0):
                pytest.fail("two holders at once")
        assert time.monotonic() - started < 0.5  # busy at once, no waiting
        async with b.hold("s2", 5.0):  # another session is independent
            pass
        # A second holder in the same process is refused too.
        with pytest.raises(LockBusy):
            async with a.hold("s1", 5.0):
                pass
        assert a.held() == ["s1"]
    assert await owner_token(a, "s1") is None  # released: the key is gone
    assert a.held() == []
    async with b.hold("s1", 5.0):
        assert await owner_token(b, "s1") is not None
    assert (a.acquired, a.busy, b.acquired, b.busy) == (1, 1, 2, 1)


async def test_many_contenders_one_winner(make_locks: MakeLocks) -> None:
    replicas = [await make_locks() for _ in range(4)]
    inside = 0
    most = 0
    winners = 0

    async def contend(locks: RedisLocks) -> None:
        nonlocal inside, most, winners
        try:
            async with locks.hold("hot", 5.0):
                inside += 1
                winners += 1
                most = max(most, inside)
                await asyncio.sleep(0.2)
                inside -= 1
        except LockBusy:
            pass

    await asyncio.gather(*(contend(replicas[i % 4]) for i in range(40)))
    assert (winners, most) == (1, 1)


async def test_an_expired_holder_cannot_release_the_next_holders_lock(
    make_locks: MakeLocks,
) -> None:
    slow = await make_locks(renew=False)
    other = await make_locks()
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def stale_holder() -> None:
        async with slow.hold("s1", 0.2):
            entered.set()
            await leave.wait()

    task = asyncio.create_task(stale_holder())
    await entered.wait()
    await asyncio.sleep(0.35)  # the stale holder's key expired
    async with other.hold("s1", 5.0):
        theirs = await owner_token(other, "s1")
        leave.set()
        await task  # the stale holder releases *while* `other` holds the lock
        assert await owner_token(other, "s1") == theirs  # untouched
        with pytest.raises(LockBusy):
            async with slow.hold("s1", 5.0):
                pass
    assert slow.lost == 1
    assert await owner_token(other, "s1") is None


async def test_renewal_keeps_a_long_restore_locked(make_locks: MakeLocks) -> None:
    a, b = await make_locks(), await make_locks()
    async with a.hold("s1", 0.5):
        deadline = time.monotonic() + 1.2  # more than two ttls
        while time.monotonic() < deadline:
            with pytest.raises(LockBusy):
                async with b.hold("s1", 0.5):
                    pass
            await asyncio.sleep(0.1)
        assert 0 < await a._redis.pttl(a.key("s1")) <= 500
    assert a.lost == 0
    async with b.hold("s1", 0.5):
        pass


_CRASH_HOLDER = """
import asyncio, sys
from router.store.redis import RedisStore
from router.store.redis_locks import RedisLocks

async def main() -> None:
    store = RedisStore(sys.argv[1], key_prefix=sys.argv[2])
    locks = RedisLocks.for_store(store)
    async with locks.hold("s1", float(sys.argv[3])):
        print("held", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_crashed_holders_lock_expires_after_its_ttl(
    make_locks: MakeLocks, redis_url: str, redis_prefix: str
) -> None:
    ttl = 0.6
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASH_HOLDER,
        redis_url,
        redis_prefix,
        str(ttl),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.strip() == b"held"
        await asyncio.sleep(ttl)  # the live holder renews past its ttl
        survivor = await make_locks()
        with pytest.raises(LockBusy):
            async with survivor.hold("s1", 5.0):
                pass
        proc.send_signal(signal.SIGKILL)  # crash: no release, no more renewals
        await proc.wait()
        crashed_at = time.monotonic()
        while True:
            try:
                async with survivor.hold("s1", 5.0):
                    break
            except LockBusy:
                assert time.monotonic() - crashed_at < ttl + 2.0, "lock never expired"
                await asyncio.sleep(0.02)
        waited = time.monotonic() - crashed_at
        # Free about one ttl after the crash (a renewal may have just run), not
        # never; the slack is for a loaded machine.
        assert waited <= ttl + 0.6
        print(
            f"\n[restore lock] free {waited * 1000:.0f} ms after its holder's SIGKILL (ttl 600 ms)"
        )
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("how", ["stop", "kill", "pause"])
async def test_redis_unavailable_raises_store_unavailable(
    make_locks: MakeLocks, redis_server: RedisServer, how: str
) -> None:
    locks = await make_locks()
    async with locks.hold("warm", 1.0):  # a pooled connection exists
        pass
    getattr(redis_server, how)()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            async with locks.hold("s1", 0.5):
                pytest.fail("entered without a lock")
        assert time.monotonic() - started < FAIL_BOUND
        assert info.value.__cause__ is None
        assert "s1" in str(info.value)
        assert locks.held() == []  # nothing left behind locally
        assert locks.errors == 1
    finally:
        redis_server.ensure_running()
    # Usable again as soon as redis is. A hung redis may still execute the
    # SET that timed out when it resumes: that orphan key blocks the session
    # for at most its ttl (never two holders), then the lock is free again.
    deadline = time.monotonic() + 0.5 + 1.0
    while True:
        try:
            async with locks.hold("s1", 5.0):
                break
        except LockBusy:
            assert how == "pause" and time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_redis_lost_while_holding_only_logs(
    make_locks: MakeLocks, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    locks = await make_locks()
    async with locks.hold("s1", 0.3):
        redis_server.kill()
        await asyncio.sleep(0.25)  # a renewal fails meanwhile
    # Neither the failed renewal nor the failed release raised into the holder.
    assert locks.errors >= 2
    assert "cannot release the restore lock of s1" in caplog.text
    assert locks.held() == []


async def test_a_cancelled_holder_still_releases(make_locks: MakeLocks) -> None:
    a, b = await make_locks(), await make_locks()
    entered = asyncio.Event()

    async def holder() -> None:
        async with a.hold("s1", 30.0):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(holder())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Released at once, not after the 30 s ttl.
    async with b.hold("s1", 5.0):
        pass
    assert a.held() == []


async def test_close_stops_renewals(make_locks: MakeLocks) -> None:
    a = await make_locks()
    async with a.hold("s1", 0.3):
        assert len(a._renewals) == 1
        await a.close()
        assert len(a._renewals) == 0
    async with a.hold("s2", 0.3):
        assert len(a._renewals) == 0  # closed: no new renewals either


async def test_bad_ttl(make_locks: MakeLocks) -> None:
    a = await make_locks()
    with pytest.raises(ValueError):
        async with a.hold("s1", 0):
            pass
