"""The embedded queue: one SQLite file, for a router without redis.

Durability. The file is in WAL mode and every change is committed before
the caller's await returns, so ingest answers 200 only after the event is in
the file. ``synchronous`` is ``FULL`` by default: each commit fsyncs the WAL,
so an acknowledged event survives a power loss or kernel crash, not only a
process crash (``NORMAL``, configurable, survives a SIGKILL of the router but
may lose the last commits on power loss, in exchange for fewer fsyncs).

Only appends (and operator actions: replay, purge) wait for that fsync.
Bookkeeping (claims, acks, nacks, dead-lettering) commits without one when
no append shares its batch (``synchronous=NORMAL`` for that commit): a
power cut may undo it, which means an event is delivered again, never
lost; the next durable commit flushes it anyway.

Group commit. One thread owns the connection. Callers queue operations;
the thread runs everything queued so far in one transaction (each operation
in its own SAVEPOINT, so one failure does not undo the others) and commits
once: under load, hundreds of appends share one fsync. An operation's
future resolves only after that commit returned.

Ordering. Tables:

* ``events``: one row per (event, target), ``seq`` = arrival order;
  indexed by ``(lane, seq)``;
* ``lanes``: one row per lane with pending events and its ``next_at`` (when
  its head may be attempted: arrival time, or after a failure the backoff);
* ``dead``: dead letters;
* ``target_bytes``: bytes of queued bodies per target, kept by triggers on
  ``events`` (so every insert and delete counts, whatever the path), and
  recounted from ``events`` at open;
* ``dedup``: (target, event id) -> until when a new copy of that id is a
  duplicate for that target (``dedup_window``); swept as it expires.

A lane's head is its lowest ``seq``. ``claim`` picks due lanes by
``next_at`` and returns their heads; claims are held in memory (one process
owns the file), so a crash leaves no stale claim behind: after a restart
every lane is claimable at once. Two processes on one file would deliver
twice, so ``open`` takes an exclusive ``flock`` on ``<file>.lock``
(released by the kernel when the process dies, even by SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from router.webhooks.queue import (
    Appended,
    BacklogStats,
    Claim,
    DeadLetter,
    Event,
    EventQueue,
    Pending,
    QueueUnavailable,
)

__all__ = ["SqliteQueue"]

_T = TypeVar("_T")
_Op = Callable[[sqlite3.Connection], Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    target TEXT NOT NULL,
    lane TEXT NOT NULL,
    instance TEXT NOT NULL,
    dialect TEXT NOT NULL,
    type TEXT NOT NULL,
    session TEXT,
    received REAL NOT NULL,
    instance_url TEXT,
    rounds INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    -- length(body), before it: read without touching the body's overflow pages
    size INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_lane ON events (lane, seq);
CREATE TABLE IF NOT EXISTS lanes (
    lane TEXT PRIMARY KEY,
    next_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lanes_due ON lanes (next_at);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    target TEXT NOT NULL,
    lane TEXT NOT NULL,
    instance TEXT NOT NULL,
    dialect TEXT NOT NULL,
    type TEXT NOT NULL,
    session TEXT,
    received REAL NOT NULL,
    instance_url TEXT,
    rounds INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS target_bytes (
    target TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup (
    target TEXT NOT NULL,
    id TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (target, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_until ON dedup (until);
"""

# After the ``size`` column exists (a file from before it gets it in ``_connect``).
_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS events_bytes_in AFTER INSERT ON events BEGIN
    INSERT INTO target_bytes (target, bytes) VALUES (new.target, new.size)
    ON CONFLICT (target) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS events_bytes_out AFTER DELETE ON events BEGIN
    UPDATE target_bytes SET bytes = bytes - old.size WHERE target = old.target;
END;
"""
# Seconds between sweeps of expired ``dedup`` rows (in an append's commit).
DEDUP_SWEEP = 10.0

_EVENT_COLS = "id, target, lane, instance, dialect, type, session, received, instance_url, body"
_INSERT_EVENT = f"INSERT INTO events ({_EVENT_COLS}, size) VALUES (?,?,?,?,?,?,?,?,?,?,?)"


def _event_row(e: Event) -> tuple[Any, ...]:
    """The ``_INSERT_EVENT`` values: the ``_EVENT_COLS`` columns, then ``size``."""
    return (
        e.id,
        e.target,
        e.lane,
        e.instance,
        e.dialect,
        e.type,
        e.session,
        e.received,
        e.instance_url,
        e.body,
        len(e.body),
    )


def _event(row: Sequence[Any]) -> Event:
    """``row`` = the ``_EVENT_COLS`` columns, in order."""
    return Event(
        id=row[0],
        target=row[1],
        lane=row[2],
        instance=row[3],
        dialect=row[4],
        type=row[5],
        session=row[6],
        received=row[7],
        instance_url=row[8],
        body=bytes(row[9]),
    )


class SqliteQueue(EventQueue):
    backend = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "full",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        self.path = path
        self.synchronous = synchronous
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Reads use their own connections and threads (WAL: readers never
        # wait for the writer or its fsync): one for the delivery path
        # (claims), one for what may scan (stats, dead-letter listing).
        self._readers: dict[str, ThreadPoolExecutor] = {}
        self._reader_conns: dict[str, sqlite3.Connection] = {}
        # (operation, its future, must it be on disk before the future resolves?)
        self._ops: list[tuple[_Op, asyncio.Future[Any], bool]] = []
        self._sync_level = synchronous.upper()
        self._current_level = self._sync_level
        self._kick = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # lane -> token of the claim held on it (in memory: one process owns the file).
        self._claimed: dict[str, str] = {}
        self._tokens = itertools.count(1)
        self.commits = 0  # transactions committed (group commit effectiveness)
        self._dedup_swept = 0.0  # clock time of the last sweep of expired dedup rows

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        self._prepare()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhooks-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            self._executor.shutdown(wait=False)
            raise QueueUnavailable(f"cannot open webhook queue {self.path}: {exc}") from None
        self._closing = False
        self._readers = {
            kind: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"webhooks-sqlite-{kind}")
            for kind in ("claim", "scan")
        }
        self._writer = asyncio.create_task(self._write_loop(), name="webhooks-sqlite-writer")

    def _prepare(self) -> None:
        """Create the directory and take the lock (quick, local: done in the loop)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise QueueUnavailable(
                f"cannot create {directory} for the webhook queue: {exc.strerror}"
            ) from None
        self._lock()

    def _lock(self) -> None:
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueUnavailable(
                f"webhook queue {self.path} is in use by another router process"
                " (each router needs its own sqlite_path, or use a redis store to share one)"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        if "size" not in columns:  # a file from before byte accounting
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ALTER TABLE events ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            conn.execute("UPDATE events SET size = length(body)")
            conn.execute("COMMIT")
        conn.executescript(_TRIGGERS)
        # Recount: exact whatever happened to the file while closed.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM target_bytes")
        conn.execute(
            "INSERT INTO target_bytes (target, bytes)"
            " SELECT target, SUM(size) FROM events GROUP BY target"
        )
        conn.execute("COMMIT")
        return conn

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._kick.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        readers, self._readers = self._readers, {}
        for kind, reader in readers.items():
            rconn = self._reader_conns.pop(kind, None)
            if rconn is not None:
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.get_running_loop().run_in_executor(reader, rconn.close)
            reader.shutdown(wait=True)
        if self._executor is not None:
            conn = self._conn
            if conn is not None:
                loop = asyncio.get_running_loop()
                with contextlib.suppress(sqlite3.Error):
                    await loop.run_in_executor(self._executor, conn.close)
            self._executor.shutdown(wait=True)
            self._executor = None
        self._conn = None
        self._claimed.clear()
        self._unlock()

    # -- the writer (group commit) --------------------------------------------

    async def _run(self, op: Callable[[sqlite3.Connection], _T], *, durable: bool = False) -> _T:
        """Run ``op`` in the next group commit.

        ``durable``: the commit must reach the disk at the configured
        ``synchronous`` level before this returns (appends). Bookkeeping
        (claims, acks, nacks) is not: losing it to a power cut means an
        event is delivered again, never lost; a batch of only such
        operations commits with ``synchronous=NORMAL`` (no fsync), and the
        next durable commit carries it to the disk.
        """
        if self._writer is None or self._closing:
            raise QueueUnavailable("webhook queue is closed")
        fut: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._ops.append((op, fut, durable))
        self._kick.set()
        return await fut

    async def _read(self, op: Callable[[sqlite3.Connection], _T], kind: str = "scan") -> _T:
        reader = self._readers.get(kind)
        if reader is None or self._closing:
            raise QueueUnavailable("webhook queue is closed")

        def run() -> _T:
            conn = self._reader_conns.get(kind)
            if conn is None:
                conn = sqlite3.connect(self.path, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=5000")
                self._reader_conns[kind] = conn
            return op(conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(reader, run)
        except sqlite3.Error as exc:
            raise QueueUnavailable(f"webhook queue: {exc}") from None

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            ops, self._ops = self._ops, []
            # Bookkeeping first, in its own fsync-free commit, so a claim or
            # an ack never waits for the appends' fsync; then the appends.
            # (Concurrent callers' operations have no order among them; one
            # caller's operations are sequential, it awaits each.)
            for group in ([o for o in ops if not o[2]], [o for o in ops if o[2]]):
                if not group:
                    continue
                assert self._executor is not None
                try:
                    results = await loop.run_in_executor(self._executor, self._batch, group)
                except Exception as exc:  # the executor itself failed: never leave a waiter
                    results = [QueueUnavailable(f"webhook queue: {exc}")] * len(group)
                for (_, fut, _durable), res in zip(group, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
            if self._closing and not self._ops:
                return

    def _batch(self, ops: list[tuple[_Op, asyncio.Future[Any], bool]]) -> list[Any]:
        """In the writer thread: one transaction for every queued operation."""
        conn = self._conn
        if conn is None:
            return [QueueUnavailable("webhook queue is closed")] * len(ops)
        results: list[Any] = []
        level = self._sync_level if any(d for _, _, d in ops) else "NORMAL"
        try:
            if level != self._current_level:
                conn.execute(f"PRAGMA synchronous={level}")
                self._current_level = level
            conn.execute("BEGIN IMMEDIATE")
            for op, _, _ in ops:
                conn.execute("SAVEPOINT op")
                try:
                    results.append(op(conn))
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO op")
                    results.append(QueueUnavailable(f"webhook queue: {exc}"))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    results.append(exc)
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = QueueUnavailable(f"webhook queue commit failed: {exc}")
            return [err] * len(ops)
        return results

    # -- queue operations -----------------------------------------------------

    async def append(
        self, events: Sequence[Event], *, dedup_window: float = 0.0, max_bytes: int = 0
    ) -> Appended:
        if not events:
            return Appended()
        rows = [_event_row(e) for e in events]
        now = self._clock()

        def op(conn: sqlite3.Connection) -> Appended:
            stored: list[str] = []
            duplicate: list[str] = []
            full: list[str] = []
            for e, row in zip(events, rows, strict=True):
                if (
                    dedup_window > 0
                    and conn.execute(
                        "SELECT 1 FROM dedup WHERE target = ? AND id = ? AND until > ?",
                        (e.target, e.id, now),
                    ).fetchone()
                ):
                    duplicate.append(e.target)
                    continue
                if max_bytes > 0:
                    got = conn.execute(
                        "SELECT bytes FROM target_bytes WHERE target = ?", (e.target,)
                    ).fetchone()
                    if (got[0] if got else 0) + len(e.body) > max_bytes:
                        full.append(e.target)
                        continue
                conn.execute(_INSERT_EVENT, row)
                conn.execute(
                    "INSERT OR IGNORE INTO lanes (lane, next_at) VALUES (?, ?)",
                    (e.lane, e.received),
                )
                if dedup_window > 0:
                    conn.execute(
                        "INSERT OR REPLACE INTO dedup (target, id, until) VALUES (?, ?, ?)",
                        (e.target, e.id, now + dedup_window),
                    )
                stored.append(e.target)
            if dedup_window > 0 and now - self._dedup_swept >= DEDUP_SWEEP:
                self._dedup_swept = now
                conn.execute("DELETE FROM dedup WHERE until <= ?", (now,))
            return Appended(tuple(stored), tuple(duplicate), tuple(full))

        result = await self._run(op, durable=True)
        if result.stored:
            self._notify()
        return result

    async def claim(self, max_lanes: int, per_lane: int) -> list[Claim]:
        if max_lanes <= 0:
            return []
        now = self._clock()
        skip = frozenset(self._claimed)
        limit = max_lanes + len(skip)

        empty: list[str] = []

        def op(conn: sqlite3.Connection) -> list[tuple[str, list[Pending]]]:
            due = conn.execute(
                "SELECT lane FROM lanes WHERE next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)
            ).fetchall()
            out: list[tuple[str, list[Pending]]] = []
            for (lane,) in due:
                if lane in skip:
                    continue
                rows = conn.execute(
                    f"SELECT seq, rounds, last_error, {_EVENT_COLS} FROM events"
                    " WHERE lane = ? ORDER BY seq LIMIT ?",
                    (lane, per_lane),
                ).fetchall()
                if not rows:
                    empty.append(lane)  # left by a crash between ack and release
                    continue
                out.append((lane, [Pending(str(r[0]), _event(r[3:]), r[1], r[2]) for r in rows]))
                if len(out) >= max_lanes:
                    break
            return out

        # Read-only, on the claim reader: a claim never waits for a commit.
        # Lanes held here are skipped; the rest only change in the writer,
        # whose commits this read sees whole.
        found = await self._read(op, "claim")
        if empty:
            await self._drop_if_empty(empty)
        claims: list[Claim] = []
        mono = time.monotonic()
        for lane, items in found:
            if lane in self._claimed:  # claimed meanwhile by a concurrent claim()
                continue
            token = str(next(self._tokens))
            self._claimed[lane] = token
            claims.append(Claim(lane, token, items, mono))
        return claims

    async def _drop_if_empty(self, lanes: list[str]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            for lane in lanes:
                if (
                    lane not in self._claimed
                    and not conn.execute(
                        "SELECT 1 FROM events WHERE lane = ? LIMIT 1", (lane,)
                    ).fetchone()
                ):
                    conn.execute("DELETE FROM lanes WHERE lane = ?", (lane,))

        await self._run(op)

    def _holds(self, claim: Claim) -> bool:
        return self._claimed.get(claim.lane) == claim.token

    async def renew(self, claim: Claim) -> bool:
        claim.renewed_at = time.monotonic()
        return self._holds(claim)

    async def ack(self, claim: Claim, items: Sequence[Pending]) -> None:
        if not items:
            return
        seqs = [(int(i.ref),) for i in items]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM events WHERE seq = ?", seqs)

        await self._run(op)

    async def nack(
        self, claim: Claim, item: Pending, *, next_at: float, rounds: int, error: str
    ) -> None:
        seq = int(item.ref)
        lane = claim.lane

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE events SET rounds = ?, last_error = ? WHERE seq = ?",
                (rounds, error[:500], seq),
            )
            conn.execute(
                "INSERT INTO lanes (lane, next_at) VALUES (?, ?)"
                " ON CONFLICT (lane) DO UPDATE SET next_at = excluded.next_at",
                (lane, next_at),
            )

        try:
            await self._run(op)
        finally:
            if self._holds(claim):
                del self._claimed[lane]

    async def dead_letter(self, claim: Claim, item: Pending, *, reason: str, rounds: int) -> None:
        seq = int(item.ref)
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                f"INSERT INTO dead ({_EVENT_COLS}, rounds, reason, dead_at)"
                f" SELECT {_EVENT_COLS}, ?, ?, ? FROM events WHERE seq = ?",
                (rounds, reason[:1000], now, seq),
            )
            if cur.rowcount:
                conn.execute("DELETE FROM events WHERE seq = ?", (seq,))

        await self._run(op)

    async def release(self, claim: Claim, ack: Sequence[Pending] = ()) -> bool:
        lane = claim.lane
        seqs = [(int(i.ref),) for i in ack]
        if not self._holds(claim):
            if seqs:
                await self.ack(claim, ack)
            return False
        now = self._clock()

        def op(conn: sqlite3.Connection) -> bool:
            if seqs:
                conn.executemany("DELETE FROM events WHERE seq = ?", seqs)
            if conn.execute("SELECT 1 FROM events WHERE lane = ? LIMIT 1", (lane,)).fetchone():
                conn.execute(
                    "INSERT INTO lanes (lane, next_at) VALUES (?, ?)"
                    " ON CONFLICT (lane) DO UPDATE SET next_at = MIN(next_at, excluded.next_at)",
                    (lane, now),
                )
                return True
            conn.execute("DELETE FROM lanes WHERE lane = ?", (lane,))
            return False

        try:
            return await self._run(op)
        finally:
            if self._holds(claim):
                del self._claimed[lane]

    async def next_due(self) -> float | None:
        skip = frozenset(self._claimed)
        limit = len(skip) + 1

        def op(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            rows = conn.execute(
                "SELECT lane, next_at FROM lanes ORDER BY next_at LIMIT ?", (limit,)
            ).fetchall()
            return [(str(r[0]), float(r[1])) for r in rows]

        for lane, at in await self._read(op, "claim"):
            if lane not in skip:
                return at
        return None

    async def stats(self) -> BacklogStats:
        def op(conn: sqlite3.Connection) -> BacklogStats:
            (pending,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
            # Lowest seq = accepted first (replays get a new seq and a new age).
            first = conn.execute("SELECT received FROM events ORDER BY seq LIMIT 1").fetchone()
            (dead,) = conn.execute("SELECT COUNT(*) FROM dead").fetchone()
            (lanes,) = conn.execute("SELECT COUNT(*) FROM lanes").fetchone()
            by_target = conn.execute(
                "SELECT target, bytes FROM target_bytes WHERE bytes > 0"
            ).fetchall()
            return BacklogStats(
                pending=int(pending),
                oldest_received=float(first[0]) if first and first[0] is not None else None,
                dead_letters=int(dead),
                lanes=int(lanes),
                extra={"commits": self.commits},
                bytes_by_target={str(t): int(b) for t, b in by_target},
            )

        return await self._read(op)

    # -- dead letters ---------------------------------------------------------

    _DEAD_COLS = f"seq, rounds, reason, dead_at, {_EVENT_COLS}"

    @staticmethod
    def _dead(row: Sequence[Any]) -> DeadLetter:
        return DeadLetter(
            id=str(row[0]), rounds=row[1], reason=row[2], dead_at=row[3], event=_event(row[4:])
        )

    async def list_dead(
        self, *, limit: int = 100, after: str | None = None, target: str | None = None
    ) -> list[DeadLetter]:
        start = _seq(after) if after is not None else 0
        if start is None:
            return []
        sql = f"SELECT {self._DEAD_COLS} FROM dead WHERE seq > ?"
        args: list[Any] = [start]
        if target is not None:
            sql += " AND target = ?"
            args.append(target)
        sql += " ORDER BY seq LIMIT ?"
        args.append(max(1, limit))

        def op(conn: sqlite3.Connection) -> list[DeadLetter]:
            return [self._dead(r) for r in conn.execute(sql, args).fetchall()]

        return await self._read(op)

    async def get_dead(self, dead_id: str) -> DeadLetter | None:
        seq = _seq(dead_id)
        if seq is None:
            return None

        def op(conn: sqlite3.Connection) -> DeadLetter | None:
            row = conn.execute(
                f"SELECT {self._DEAD_COLS} FROM dead WHERE seq = ?", (seq,)
            ).fetchone()
            return self._dead(row) if row else None

        return await self._read(op)

    async def replay_dead(self, dead_id: str) -> bool:
        seq = _seq(dead_id)
        if seq is None:
            return False
        now = self._clock()

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(f"SELECT {_EVENT_COLS} FROM dead WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return False
            ev = _event(row)
            conn.execute(_INSERT_EVENT, (*_event_row(ev)[:7], now, *_event_row(ev)[8:]))
            conn.execute(
                "INSERT OR IGNORE INTO lanes (lane, next_at) VALUES (?, ?)", (ev.lane, now)
            )
            conn.execute("DELETE FROM dead WHERE seq = ?", (seq,))
            return True

        ok = await self._run(op, durable=True)
        if ok:
            self._notify()
        return ok

    async def purge_dead(
        self,
        *,
        ids: Sequence[str] | None = None,
        target: str | None = None,
        before: float | None = None,
    ) -> int:
        if ids is not None:
            seqs = [s for s in (_seq(i) for i in ids) if s is not None]

            def op_ids(conn: sqlite3.Connection) -> int:
                cur = conn.executemany("DELETE FROM dead WHERE seq = ?", [(s,) for s in seqs])
                return int(cur.rowcount)

            return await self._run(op_ids, durable=True)
        sql = "DELETE FROM dead WHERE 1=1"
        args: list[Any] = []
        if target is not None:
            sql += " AND target = ?"
            args.append(target)
        if before is not None:
            sql += " AND dead_at < ?"
            args.append(before)

        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute(sql, args).rowcount)

        return await self._run(op, durable=True)


def _seq(value: str) -> int | None:
    return int(value) if value.isdigit() and len(value) < 19 else None
