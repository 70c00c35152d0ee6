"""The ``EventQueue`` contract, against both backends (SQLite file, private redis-server)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from router.webhooks.queue import Claim, Event, EventQueue, QueueUnavailable
from router.webhooks.queue_redis import GROUP, RedisQueue, _fields
from router.webhooks.queue_sqlite import SqliteQueue

QueueFactory = Callable[..., Awaitable[EventQueue]]


def ev(n: int, session: str = "s1", target: str = "app", received: float | None = None) -> Event:
    return Event(
        id=f"evt_{session}_{n}",
        target=target,
        lane=f"{target}|{session}",
        instance="wa-1",
        dialect="blazz",
        type="message",
        session=session,
        received=time.time() if received is None else received,
        body=f'{{"event":"message","n":{n}}}'.encode(),
        instance_url="http://localhost:3001",
    )


@pytest.fixture(params=["sqlite", "redis"])
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    opened: list[EventQueue] = []
    backend = request.param
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    prefix = request.getfixturevalue("redis_prefix") if backend == "redis" else ""

    async def make(consumer: str = "c1", lease: float = 5.0, name: str = "q.db") -> EventQueue:
        q: EventQueue
        if backend == "sqlite":
            q = SqliteQueue(str(tmp_path / name))
        else:
            q = RedisQueue(
                redis_url, key_prefix=prefix, consumer=consumer, lease=lease, sort_interval=0.2
            )
        await q.open()
        opened.append(q)
        return q

    make.backend = backend  # type: ignore[attr-defined]
    yield make
    for q in opened:
        await q.close()


async def claim_events(
    q: EventQueue, n: int, *, max_lanes: int = 100, per_lane: int = 100, within: float = 5.0
) -> list[Claim]:
    """Claim until the claims hold ``n`` events (redis sorts new events in the background)."""
    deadline = time.monotonic() + within
    claims: list[Claim] = []
    while sum(len(c.events) for c in claims) < n:
        assert time.monotonic() < deadline, f"claimed {claims!r}, wanted {n} events"
        got = await q.claim(max_lanes, per_lane)
        claims.extend(got)
        if not got:
            await asyncio.sleep(0.01)
    return claims


async def test_append_claim_ack_in_lane_order(make_queue: QueueFactory) -> None:
    q = await make_queue()
    await q.append([ev(i, "s1") for i in range(5)])
    await q.append([ev(i, "s2") for i in range(3)])
    claims = await claim_events(q, 8)
    by_lane = {c.lane: [p.event.id for p in c.events] for c in claims}
    assert by_lane == {
        "app|s1": [f"evt_s1_{i}" for i in range(5)],
        "app|s2": [f"evt_s2_{i}" for i in range(3)],
    }
    first = claims[0].events[0]
    assert first.event.body.startswith(b'{"event"') and first.rounds == 0
    assert first.event.instance_url == "http://localhost:3001"
    stats = await q.stats()
    assert stats.pending == 8 and stats.oldest_received is not None
    c1 = next(c for c in claims if c.lane == "app|s1")
    c2 = next(c for c in claims if c.lane == "app|s2")
    await q.ack(c1, c1.events[:2])  # several heads at once
    await q.ack(c1, c1.events[:1])  # a repeated ack is a no-op
    assert await q.release(c1, ack=c1.events[2:]) is False  # acked with the release: empty
    assert await q.release(c2, ack=c2.events[:1]) is True  # two left
    assert (await q.stats()).pending == 2
    (c2,) = await claim_events(q, 2)
    assert [p.event.id for p in c2.events] == ["evt_s2_1", "evt_s2_2"]
    assert await q.release(c2, ack=c2.events) is False
    stats = await q.stats()
    assert (stats.pending, stats.oldest_received) == (0, None)
    assert await q.claim(10, 10) == []
    assert await q.next_due() is None


async def test_a_claimed_lane_is_invisible_until_released(make_queue: QueueFactory) -> None:
    q = await make_queue()
    await q.append([ev(1, "s1"), ev(2, "s1")])
    (c,) = await claim_events(q, 2)
    await q.append([ev(3, "s1")])
    await asyncio.sleep(0.05)  # let redis sort it (nothing may become claimable anyway)
    assert await q.claim(10, 10) == []
    await q.ack(c, [c.events[0]])
    await q.release(c)  # e2 was not delivered: the lane is due again, e2 first
    (c2,) = await claim_events(q, 2)
    assert [p.event.id for p in c2.events] == ["evt_s1_2", "evt_s1_3"]


async def test_nack_holds_only_that_lane_until_next_at(make_queue: QueueFactory) -> None:
    q = await make_queue()
    await q.append([ev(1, "s1"), ev(2, "s1"), ev(1, "s2")])
    claims = await claim_events(q, 3)
    c1 = next(c for c in claims if c.lane == "app|s1")
    c2 = next(c for c in claims if c.lane == "app|s2")
    retry_at = time.time() + 0.4
    await q.nack(c1, c1.events[0], next_at=retry_at, rounds=1, error="HTTP 503: down")
    await q.release(c2)
    due = await q.next_due()
    assert due is not None and due <= time.time()  # s2 is due now
    (again,) = await claim_events(q, 1)
    assert again.lane == "app|s2"
    await q.ack(again, [again.events[0]])
    await q.release(again)
    assert await q.claim(10, 10) == []  # s1 waits for its retry time
    due = await q.next_due()
    assert due is not None and abs(due - retry_at) < 0.01
    await asyncio.sleep(max(0.0, retry_at - time.time()) + 0.01)
    (back,) = await claim_events(q, 2)
    assert [p.event.id for p in back.events] == ["evt_s1_1", "evt_s1_2"]
    assert (back.events[0].rounds, back.events[0].last_error) == (1, "HTTP 503: down")
    assert back.events[1].rounds == 0


async def test_dead_letters_list_get_replay_purge(make_queue: QueueFactory) -> None:
    q = await make_queue()
    await q.append([ev(1, "s1"), ev(2, "s1"), ev(1, "s2", target="other")])
    claims = await claim_events(q, 3)
    c1 = next(c for c in claims if c.lane == "app|s1")
    await q.dead_letter(c1, c1.events[0], reason="rejected: HTTP 422", rounds=1)
    # The lane goes on with the next event.
    await q.ack(c1, [c1.events[1]])
    await q.release(c1)
    c2 = next(c for c in claims if c.lane == "other|s2")
    await q.dead_letter(c2, c2.events[0], reason="max_age: too old", rounds=7)
    await q.release(c2)

    dead = await q.list_dead()
    assert [(d.event.id, d.reason, d.rounds) for d in dead] == [
        ("evt_s1_1", "rejected: HTTP 422", 1),
        ("evt_s2_1", "max_age: too old", 7),
    ]
    assert [d.event.id for d in await q.list_dead(target="other")] == ["evt_s2_1"]
    assert [d.event.id for d in await q.list_dead(after=dead[0].id)] == ["evt_s2_1"]
    assert [d.event.id for d in await q.list_dead(limit=1)] == ["evt_s1_1"]
    one = await q.get_dead(dead[0].id)
    assert one is not None and one.event.body == ev(1).body and one.event.session == "s1"
    assert await q.get_dead("nope") is None and await q.get_dead("999999-0") is None
    stats = await q.stats()
    assert (stats.pending, stats.dead_letters) == (0, 2)

    before = time.time()
    assert await q.replay_dead(dead[0].id) is True
    assert await q.replay_dead(dead[0].id) is False
    (c,) = await claim_events(q, 1)
    replayed = c.events[0]
    assert replayed.event.id == "evt_s1_1" and replayed.rounds == 0
    assert replayed.event.received >= before  # the age starts again
    await q.ack(c, [replayed])
    await q.release(c)

    assert await q.purge_dead(ids=["nope"]) == 0
    assert await q.purge_dead(target="app") == 0
    assert await q.purge_dead(target="other", before=time.time() + 1) == 1
    assert (await q.stats()).dead_letters == 0


async def test_replay_all_and_purge_all(make_queue: QueueFactory) -> None:
    q = await make_queue()
    await q.append([ev(i, f"s{i}") for i in range(4)])
    for c in await claim_events(q, 4):
        await q.dead_letter(c, c.events[0], reason="rejected", rounds=1)
        await q.release(c)
    assert (await q.stats()).dead_letters == 4
    assert await q.replay_all(target="elsewhere") == 0
    assert await q.replay_all() == 4
    for c in await claim_events(q, 4):
        await q.dead_letter(c, c.events[0], reason="rejected again", rounds=2)
        await q.release(c)
    assert await q.purge_dead() == 4
    assert await q.list_dead() == []


async def test_survives_reopen(make_queue: QueueFactory) -> None:
    q = await make_queue()
    await q.append([ev(i, "s1") for i in range(3)])
    (c,) = await claim_events(q, 3)
    await q.ack(c, [c.events[0]])
    # Closed with a claim held (a crash): the new life can claim the lane at once.
    await q.close()
    q2 = await make_queue()
    (c2,) = await claim_events(q2, 2, within=2.0)
    assert [p.event.id for p in c2.events] == ["evt_s1_1", "evt_s1_2"]


async def test_append_after_close_is_refused(make_queue: QueueFactory) -> None:
    q = await make_queue()
    await q.close()
    with pytest.raises(QueueUnavailable):
        await q.append([ev(1)])


async def test_sqlite_group_commit_and_exclusive_file(tmp_path: Path) -> None:
    q = SqliteQueue(str(tmp_path / "deep" / "dir" / "q.db"))
    await q.open()
    try:
        await asyncio.gather(*(q.append([ev(i, f"s{i % 7}")]) for i in range(300)))
        assert (await q.stats()).pending == 300
        # 300 concurrent appends shared far fewer commits (each an fsync).
        assert q.commits < 100
        other = SqliteQueue(str(tmp_path / "deep" / "dir" / "q.db"))
        with pytest.raises(QueueUnavailable, match="in use by another router"):
            await other.open()
    finally:
        await q.close()


async def test_redis_two_consumers_never_hold_one_lane(redis_url: str, redis_prefix: str) -> None:
    q1 = RedisQueue(redis_url, key_prefix=redis_prefix, consumer="a", lease=5.0)
    q2 = RedisQueue(redis_url, key_prefix=redis_prefix, consumer="b", lease=5.0)
    await q1.open()
    await q2.open()
    try:
        await q1.append([ev(1, f"s{i}") for i in range(20)])
        await q2.append([ev(2, f"s{i}") for i in range(20)])
        deadline = time.monotonic() + 5
        while q1.sorted + q2.sorted < 40:  # both replicas sort; wait until all are in lanes
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        got1: list[Claim] = []
        got2: list[Claim] = []
        while len(got1) + len(got2) < 20:
            assert time.monotonic() < deadline
            a, b = await asyncio.gather(q1.claim(3, 10), q2.claim(3, 10))
            got1 += a
            got2 += b
            if not a and not b:
                await asyncio.sleep(0.01)
        lanes1 = {c.lane for c in got1}
        lanes2 = {c.lane for c in got2}
        assert not lanes1 & lanes2
        assert lanes1 | lanes2 == {f"app|s{i}" for i in range(20)}
        assert got1 and got2
        for c in got1 + got2:
            assert [p.event.id for p in c.events] == [f"evt_{c.lane[4:]}_1", f"evt_{c.lane[4:]}_2"]
    finally:
        await q1.close()
        await q2.close()


async def test_redis_expired_lease_hands_the_lane_over(redis_url: str, redis_prefix: str) -> None:
    q1 = RedisQueue(redis_url, key_prefix=redis_prefix, consumer="a", lease=0.3)
    q2 = RedisQueue(redis_url, key_prefix=redis_prefix, consumer="b", lease=5.0)
    await q1.open()
    await q2.open()
    try:
        await q1.append([ev(1), ev(2)])
        (c1,) = await claim_events(q1, 2)
        assert await q2.claim(10, 10) == []  # held by q1
        # q1 hangs past its lease: q2 gets the lane, from its head.
        (c2,) = await claim_events(q2, 2, within=3.0)
        assert [p.event.id for p in c2.events] == ["evt_s1_1", "evt_s1_2"]
        assert await q1.renew(c1) is False  # q1 learns it lost the lane
        await q2.ack(c2, [c2.events[0]])
        await q1.ack(c1, [c1.events[0]])  # a late duplicate ack is harmless
        await q1.release(c1)  # and a stale release does not free q2's lane
        assert await q1.claim(10, 10) == []
        await q2.ack(c2, [c2.events[1]])
        await q2.release(c2)
        assert (await q2.stats()).pending == 0
    finally:
        await q1.close()
        await q2.close()


async def test_redis_restart_with_same_name_releases_its_lanes(
    redis_url: str, redis_prefix: str
) -> None:
    q1 = RedisQueue(redis_url, key_prefix=redis_prefix, consumer="router-1", lease=60.0)
    await q1.open()
    await q1.append([ev(1)])
    await claim_events(q1, 1)
    await q1.close()  # "killed" holding a 60 s lease
    q1b = RedisQueue(redis_url, key_prefix=redis_prefix, consumer="router-1", lease=60.0)
    await q1b.open()
    try:
        (c,) = await claim_events(q1b, 1, within=1.0)
        assert c.events[0].event.id == "evt_s1_1"
    finally:
        await q1b.close()


async def test_redis_events_stored_but_never_sorted_are_picked_up(
    redis_url: str, redis_prefix: str
) -> None:
    """A replica died between XADD and sorting: another replica's periodic sort places them."""
    q = RedisQueue(redis_url, key_prefix=redis_prefix, consumer="alive", sort_interval=0.05)
    await q.open()
    try:
        e = ev(1)
        await q.client.xadd(q.k_in, _fields(e))  # type: ignore[arg-type]
        (c,) = await claim_events(q, 1, within=5.0)
        assert c.events[0].event.id == "evt_s1_1"
        pending = await q.client.xpending(q.k_in, GROUP)
        assert pending["pending"] == 0  # read and acknowledged in one step
    finally:
        await q.close()


async def test_redis_concurrent_sorters_keep_each_lane_in_stream_order(
    redis_url: str, redis_prefix: str
) -> None:
    qs = [
        RedisQueue(redis_url, key_prefix=redis_prefix, consumer=f"r{i}", sort_interval=0.01)
        for i in range(3)
    ]
    for q in qs:
        await q.open()
    try:
        # Three replicas ingest into the same two lanes at once, and all sort.
        await asyncio.gather(*(qs[i % 3].append([ev(i, f"s{i % 2}")]) for i in range(300)))
        ids: Any = await qs[0].client.xrange(qs[0].k_in, "-", "+")
        stream_order: dict[str, list[str]] = {}
        for _eid, f in ids:
            event_id = json.loads(f[b"m"])[0]
            stream_order.setdefault(f[b"lane"].decode(), []).append(event_id)
        claims = await claim_events(qs[1], 300, per_lane=300)
        got = {c.lane: [p.event.id for p in c.events] for c in claims}
        assert got == stream_order
    finally:
        for q in qs:
            await q.close()


# -- ingest bounds: de-duplication and bytes per target (issue 11) -------------------


def sized(n: int, size: int, target: str = "app", session: str = "s1", eid: str = "") -> Event:
    """An event whose body is exactly ``size`` bytes."""
    body = f'{{"event":"message","n":{n},"pad":"'.encode()
    body += b"x" * (size - len(body) - 2) + b'"}'
    assert len(body) == size
    return Event(
        id=eid or f"evt_{session}_{n}",
        target=target,
        lane=f"{target}|{session}",
        instance="wa-1",
        dialect="blazz",
        type="message",
        session=session,
        received=time.time(),
        body=body,
    )


async def wait_bytes(q: EventQueue, want: dict[str, int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (got := (await q.stats()).bytes_by_target) != want:
        assert time.monotonic() < deadline, f"bytes by target {got}, wanted {want}"
        await asyncio.sleep(0.01)


async def test_append_skips_an_id_its_target_stored_within_the_window(
    make_queue: QueueFactory,
) -> None:
    """A replay or a retry of an event already queued (or delivered) is stored
    once per target; the window counts from the first acceptance."""
    q = await make_queue()
    first = await q.append([ev(1, target="app"), ev(1, target="other")], dedup_window=0.5)
    assert (first.stored, first.duplicate, first.full) == (("app", "other"), (), ())
    again = await q.append([ev(1, target="app"), ev(1, target="other")], dedup_window=0.5)
    assert (again.stored, again.duplicate) == ((), ("app", "other"))
    # Per target: a new target (or one that did not have it) takes its copy.
    assert (await q.append([ev(1, target="third")], dedup_window=0.5)).stored == ("third",)
    # Delivered since: still a duplicate within the window.
    claims = await claim_events(q, 3)
    for c in claims:
        await q.release(c, ack=c.events)
    assert (await q.stats()).pending == 0
    assert (await q.append([ev(1)], dedup_window=0.5)).duplicate == ("app",)
    # Without a window nothing is checked; after it the id is forgotten.
    assert (await q.append([ev(2)])).stored == ("app",)
    assert (await q.append([ev(2)])).stored == ("app",)
    await asyncio.sleep(0.6)
    assert (await q.append([ev(1)], dedup_window=0.5)).stored == ("app",)
    assert (await q.stats()).pending == 3


async def test_concurrent_appends_of_one_event_store_it_once(make_queue: QueueFactory) -> None:
    q = await make_queue()
    results = await asyncio.gather(*(q.append([ev(7)], dedup_window=60) for _ in range(20)))
    assert sum(len(r.stored) for r in results) == 1
    assert sum(len(r.duplicate) for r in results) == 19
    assert (await q.stats()).pending == 1


async def test_bytes_per_target_are_bounded_and_counted_exactly(make_queue: QueueFactory) -> None:
    q = await make_queue()
    r = await q.append([sized(1, 1000), sized(1, 1000, target="other")], max_bytes=2500)
    assert r.stored == ("app", "other")
    assert (await q.append([sized(2, 1000)], max_bytes=2500)).stored == ("app",)
    # 3000 > 2500: refused for "app" only, and nothing of it is stored.
    r = await q.append([sized(3, 1000), sized(3, 1000, target="other")], max_bytes=2500)
    assert (r.stored, r.full) == (("other",), ("app",))
    # Concurrent appends never overshoot the bound together.
    rs = await asyncio.gather(
        *(q.append([sized(10 + i, 100, session="s2")], max_bytes=2500) for i in range(9))
    )
    assert sum(len(x.stored) for x in rs) == 5
    await wait_bytes(q, {"app": 2500, "other": 2000})
    assert (await q.stats()).pending == 9

    # Every way out of the queue gives the bytes back: ack, release, dead letter.
    claims = await claim_events(q, 9)
    await q.release(next(c for c in claims if c.lane == "app|s2"))
    c_app = next(c for c in claims if c.lane == "app|s1")
    await q.ack(c_app, [c_app.events[0]])
    await q.dead_letter(c_app, c_app.events[1], reason="rejected", rounds=1)
    await q.release(c_app)
    await wait_bytes(q, {"app": 500, "other": 2000})
    c_other = next(c for c in claims if c.lane == "other|s1")
    await q.release(c_other, ack=c_other.events)
    await wait_bytes(q, {"app": 500})
    # A replayed dead letter counts again; room again for a new event.
    (dead,) = [d for d in await q.list_dead() if d.event.target == "app"]
    assert await q.replay_dead(dead.id)
    await wait_bytes(q, {"app": 1500})
    assert (await q.append([sized(20, 1000)], max_bytes=2500)).stored == ("app",)
    assert (await q.append([sized(21, 100)], max_bytes=2500)).full == ("app",)


async def test_byte_counts_survive_a_reopen(make_queue: QueueFactory) -> None:
    q = await make_queue(name="bytes.db")
    await q.append([sized(1, 700), sized(2, 300, target="other")])
    await q.close()
    q2 = await make_queue(name="bytes.db")
    await wait_bytes(q2, {"app": 700, "other": 300})
    assert (await q2.append([sized(3, 400)], max_bytes=1000)).full == ("app",)


async def test_sqlite_file_from_before_byte_counts_is_migrated(tmp_path: Path) -> None:
    """A queue file written by the previous version (no ``size`` column) opens,
    and its pending events are counted."""
    import sqlite3

    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, target TEXT NOT NULL,
            lane TEXT NOT NULL, instance TEXT NOT NULL, dialect TEXT NOT NULL,
            type TEXT NOT NULL, session TEXT, received REAL NOT NULL, instance_url TEXT,
            rounds INTEGER NOT NULL DEFAULT 0, last_error TEXT, body BLOB NOT NULL);
        CREATE TABLE lanes (lane TEXT PRIMARY KEY, next_at REAL NOT NULL) WITHOUT ROWID;
        INSERT INTO events (id, target, lane, instance, dialect, type, received, body)
            VALUES ('e1', 'app', 'app|s', 'wa-1', 'blazz', 'message', 1, x'00112233');
        INSERT INTO lanes VALUES ('app|s', 1);
        """
    )
    conn.close()
    q = SqliteQueue(path)
    await q.open()
    try:
        assert (await q.stats()).bytes_by_target == {"app": 4}
        (c,) = await claim_events(q, 1)
        await q.release(c, ack=c.events)
        assert (await q.stats()).bytes_by_target == {}
    finally:
        await q.close()
