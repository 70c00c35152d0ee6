"""The shared queue: Redis Streams, for routers whose store is redis.

Several replicas share one queue; each event is delivered by one of them.

Keys (``P`` = the store's key prefix + ``wh:``):

* ``P in``: the **stream** every event is ``XADD``-ed to by ingest. An entry
  stays in it until it is delivered or dead-lettered (then ``XDEL``), so
  ``XLEN`` is the backlog and the first entry is the oldest pending event.
* consumer group ``relay`` on ``P in``: its last-delivered id is the shared
  cursor "entries before this are in their lanes". **Sorting** new entries
  into lanes is one Lua script: ``XREADGROUP ... COUNT n STREAMS P in >``,
  then per entry, in stream order, ``RPUSH P lane:<lane> <entry id>``,
  ``ZADD P due NX <now> <lane>`` and ``XACK``. Read, place and acknowledge
  happen in one atomic step, so two replicas sorting at the same time can
  never interleave one lane out of order, and no entry is ever left pending
  in the group by a replica that dies: there is nothing for ``XAUTOCLAIM``
  to recover (a crashed replica's *deliveries* come back through the lane
  lease below). The replica that ingested events sorts them right after the
  ``XADD``; every replica also sorts once a second, which picks up events
  whose ingesting replica died between ``XADD`` and sorting.
* ``P lane:<lane>``: a list of entry ids, in arrival order (the per-session
  order: the stream id order of one session's events).
* ``P due``: sorted set, lane -> the time (ms) its head may be attempted: its
  arrival, a retry time after a failure, or, while a replica holds the lane,
  the end of that replica's **lease**. A claim (Lua, atomic) takes due lanes
  and moves their score to ``now + lease``: that score is the per-session
  "in flight" marker. Nobody else sees the lane until the holder releases it
  (``release``/``nack``) or the lease runs out (the holder died or hung: the
  lane comes back by itself, and its head is delivered again).
* ``P claims``: hash, lane -> token of the current holder; ``release``,
  ``nack`` and ``renew`` act only with the right token, so a replica whose
  lease expired cannot disturb the lane's new holder.
* ``P tries``: hash, entry id -> ``"<failed rounds>|<last error>"``.
* ``P dead``: stream of dead letters (the entry's fields + reason).
* ``P bytes``: hash, target -> bytes of its bodies in ``P in``. The append
  script adds (and refuses beyond ``max_bytes``); ack, dead-letter and
  replay scripts adjust it with the entry they remove or add. Reset when
  ``P in`` is found empty at open.
* ``P dedup:<target>|<event id>``: set by the append script with a TTL of
  ``dedup_window``; while it exists, that id is a duplicate for that target.

Appending is one Lua script per flushed batch: for each event in turn,
dedup check, byte bound, ``XADD``, counters. Scripts run one at a time, so
replicas appending at once never overshoot a bound or store one event twice.

Ordering per session: only the holder of a lane delivers it, strictly head
first, and ``ack`` pops the head only if it is still the head. A failure
stops the lane until its retry time; other lanes go on. A replica whose
lease ran out mid-delivery can deliver the head once more (at-least-once,
same event id), never out of order (``renew`` fails, it stops).

At-least-once: the entry leaves ``P in`` only in ``ack`` (after the target's
2xx) or in ``dead_letter`` (copied to ``P dead`` in the same script).

Durability: ingest answers 200 after ``XADD`` returned, i.e. once Redis has
the event. Whether Redis keeps it through a *Redis* crash is Redis's
persistence setting: run it with ``appendonly yes`` (``appendfsync everysec``
loses at most about a second of events on a Redis crash; ``always`` none).

A restarted replica with the same ``consumer_name`` (default host:port)
releases the lanes its previous life held, at once; other replicas wait for
the lease. Redis Cluster is not supported (lane keys are derived in Lua).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from router.config import redact_url
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

__all__ = ["RedisQueue"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)
GROUP = "relay"
# Entries placed in lanes per sort script call.
SORT_BATCH = 1000
# Every replica sorts at least this often (seconds), whoever ingested.
SORT_INTERVAL = 1.0
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")

# KEYS: in, bytes.  ARGV, per event (13 each): dedup key, target, body size,
# max_bytes, window_ms, then the 4 stream fields and values of ``_fields``.
# Returns one result per event: 1 stored, 0 duplicate, -1 its target is full.
# One call per flush (not one per event): a script call costs more than the
# work inside it; events are still checked and stored one after another.
_APPEND = """
local out = {}
for i = 1, #ARGV, 13 do
  local dedup, target, size = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local cap, window = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local r = 1
  if window > 0 and redis.call('EXISTS', dedup) == 1 then
    r = 0
  elseif cap > 0 and tonumber(redis.call('HGET', KEYS[2], target) or '0') + size > cap then
    r = -1
  else
    redis.call('XADD', KEYS[1], '*', ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8],
               ARGV[i + 9], ARGV[i + 10], ARGV[i + 11], ARGV[i + 12])
    redis.call('HINCRBY', KEYS[2], target, size)
    if window > 0 then redis.call('SET', dedup, '1', 'PX', window) end
  end
  table.insert(out, r)
end
return out
"""

# KEYS: in, bytes.  Forget the byte counts when nothing is queued (a fresh
# count, whatever older versions or an operator did to the stream).
_RESET_BYTES = """
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
return 0
"""

# KEYS: in, due.  ARGV: group, consumer, count, now_ms, lane_prefix.
_SORT = """
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], '>')
if not r then return 0 end
local n = 0
for _, e in ipairs(r[1][2]) do
  local id, f = e[1], e[2]
  for i = 1, #f, 2 do
    if f[i] == 'lane' then
      redis.call('RPUSH', ARGV[5] .. f[i + 1], id)
      redis.call('ZADD', KEYS[2], 'NX', ARGV[4], f[i + 1])
      break
    end
  end
  redis.call('XACK', KEYS[1], ARGV[1], id)
  n = n + 1
end
return n
"""

# KEYS: due, claims, in, tries.
# ARGV: now_ms, lease_until_ms, token, max_lanes, per_lane, lane_prefix.
_CLAIM = """
local lanes = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, lane in ipairs(lanes) do
  local lkey = ARGV[6] .. lane
  local ids = redis.call('LRANGE', lkey, 0, tonumber(ARGV[5]) - 1)
  local items = {}
  for _, id in ipairs(ids) do
    local e = redis.call('XRANGE', KEYS[3], id, id)
    if #e == 1 then
      table.insert(items, {id, e[1][2], redis.call('HGET', KEYS[4], id)})
    else
      redis.call('LREM', lkey, 1, id)
    end
  end
  if #items == 0 then
    if redis.call('LLEN', lkey) == 0 then
      redis.call('ZREM', KEYS[1], lane)
      redis.call('HDEL', KEYS[2], lane)
    end
  else
    redis.call('ZADD', KEYS[1], ARGV[2], lane)
    redis.call('HSET', KEYS[2], lane, ARGV[3])
    table.insert(out, {lane, items})
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {out, first[2] or false}
"""

# Takes ``size`` bytes off ``target`` in the bytes hash (never below zero).
_UNCOUNT = """
local function uncount(key, target, size)
  if size > 0 and redis.call('HINCRBY', key, target, -size) <= 0 then
    redis.call('HDEL', key, target)
  end
end
"""

# Pops the lane's head while it is the next acknowledged id (so a stale,
# duplicate ack is a no-op), deleting the entries and uncounting their bytes.
# ARGV from 6 on: entry id, body size, entry id, body size, ...
_ACK_BODY = (
    _UNCOUNT
    + """
local n = 0
for i = 6, #ARGV, 2 do
  if redis.call('LINDEX', ARGV[1], 0) ~= ARGV[i] then break end
  redis.call('LPOP', ARGV[1])
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    uncount(KEYS[5], ARGV[5], tonumber(ARGV[i + 1]))
  end
  redis.call('HDEL', KEYS[4], ARGV[i])
  n = n + 1
end
"""
)

# KEYS: in, due, claims, tries, bytes.
# ARGV: lane_key, lane, token, at_ms, target, (id, size)...
_ACK = (
    _ACK_BODY
    + """
if redis.call('LLEN', ARGV[1]) == 0 and redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[3] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
end
return n
"""
)

# KEYS: in, due, claims, tries, bytes.
# ARGV: lane_key, lane, token, at_ms, target, (id, size) to ack first...
# Returns 1 if the lane still has events, 0 if not, -1 if the claim was not ours.
_RELEASE = (
    _ACK_BODY
    + """
if redis.call('HGET', KEYS[3], ARGV[2]) ~= ARGV[3] then return -1 end
redis.call('HDEL', KEYS[3], ARGV[2])
if redis.call('LLEN', ARGV[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
return 1
"""
)

# KEYS: due, claims, tries.  ARGV: lane_key, lane, token, at_ms, id, tries_value.
_NACK = """
if redis.call('LINDEX', ARGV[1], 0) == ARGV[5] then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
end
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('LLEN', ARGV[1]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[2])
else
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
end
return 1
"""

# KEYS: due, claims.  ARGV: lane, token, until_ms.
_RENEW = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"""

# KEYS: in, due, claims, tries, dead, bytes.
# ARGV: lane_key, lane, id, token, reason, rounds, dead_at, target.
_DEAD = (
    _UNCOUNT
    + """
if redis.call('LINDEX', ARGV[1], 0) ~= ARGV[3] then return 0 end
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
redis.call('LPOP', ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[3])
if #e == 1 then
  local f = e[1][2]
  local size = 0
  for i = 1, #f, 2 do
    if f[i] == 'b' then size = #f[i + 1] end
  end
  table.insert(f, 'reason'); table.insert(f, ARGV[5])
  table.insert(f, 'rounds'); table.insert(f, ARGV[6])
  table.insert(f, 'dead_at'); table.insert(f, ARGV[7])
  redis.call('XADD', KEYS[5], '*', unpack(f))
  if redis.call('XDEL', KEYS[1], ARGV[3]) == 1 then uncount(KEYS[6], ARGV[8], size) end
end
if redis.call('LLEN', ARGV[1]) == 0 and redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[4] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
end
return 1
"""
)

# KEYS: dead, in, bytes.  ARGV: dead id, now (unix s).
_REPLAY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local f = e[1][2]
local out = {}
local size, target = 0, nil
for i = 1, #f, 2 do
  local k = f[i]
  if k == 'r' then
    table.insert(out, k); table.insert(out, ARGV[2])
  elseif k ~= 'reason' and k ~= 'rounds' and k ~= 'dead_at' then
    table.insert(out, k); table.insert(out, f[i + 1])
  end
  if k == 'b' then size = #f[i + 1] end
  if k == 'm' then target = cjson.decode(f[i + 1])[2] end
end
redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
if target and size > 0 then redis.call('HINCRBY', KEYS[3], target, size) end
return 1
"""


def _fields(e: Event) -> dict[str, bytes | str]:
    """Four stream fields: few fields keep XADD cheap (client-side packing dominates)."""
    meta = json.dumps(
        [e.id, e.target, e.instance, e.dialect, e.type, e.session, e.instance_url],
        separators=(",", ":"),
    )
    # "lane" first: the sort script looks for it; "r" alone: replay resets it.
    return {"lane": e.lane, "m": meta, "r": repr(e.received), "b": e.body}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """A Lua ``{k1, v1, k2, v2}`` reply (field names decoded, values as bytes)."""
    return {_s(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _decode_event(f: dict[str, Any]) -> Event:
    eid, target, instance, dialect, etype, session, iurl = json.loads(f["m"])
    body = f.get("b", b"")
    return Event(
        id=eid,
        target=target,
        lane=_s(f["lane"]),
        instance=instance,
        dialect=dialect,
        type=etype,
        session=session,
        received=float(_s(f["r"])),
        body=body if isinstance(body, bytes) else str(body).encode(),
        instance_url=iurl,
    )


def _acked(items: Sequence[Pending]) -> list[str | int]:
    """Ack script arguments: the lane's target, then each entry id and its body size."""
    out: list[str | int] = [items[0].event.target if items else ""]
    for i in items:
        out += [i.ref, len(i.event.body)]
    return out


def _decode_tries(raw: Any) -> tuple[int, str | None]:
    if not raw:
        return 0, None
    text = _s(raw)
    rounds, _, error = text.partition("|")
    try:
        return int(rounds), error or None
    except ValueError:
        return 0, None


_Append = tuple[Sequence[Event], int, int, "asyncio.Future[Appended]"]


class RedisQueue(EventQueue):
    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "wa-router:",
        consumer: str | None = None,
        lease: float = 60.0,
        clock: Callable[[], float] = time.time,
        client: Redis | None = None,
        sort_interval: float = SORT_INTERVAL,
    ) -> None:
        self.where = redact_url(url)
        p = f"{key_prefix}wh:"
        self.k_in = p + "in"
        self.k_due = p + "due"
        self.k_claims = p + "claims"
        self.k_tries = p + "tries"
        self.k_dead = p + "dead"
        self.k_bytes = p + "bytes"
        self.dedup_prefix = p + "dedup:"
        self.lane_prefix = p + "lane:"
        self.consumer = consumer or f"{os.uname().nodename}:{os.getpid()}"
        # A new nonce per process life: the old life's claims are told apart.
        self._nonce = uuid.uuid4().hex[:8]
        self._seq = 0
        self.lease = lease
        self.sort_interval = sort_interval
        self._clock = clock
        self._redis: Redis = client or Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            socket_keepalive=True,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        r = self._redis
        self._sort = r.register_script(_SORT)
        self._claim = r.register_script(_CLAIM)
        self._ack = r.register_script(_ACK)
        self._release = r.register_script(_RELEASE)
        self._nack = r.register_script(_NACK)
        self._renew = r.register_script(_RENEW)
        self._dead_script = r.register_script(_DEAD)
        self._replay = r.register_script(_REPLAY)
        self._append = r.register_script(_APPEND)
        self._reset_bytes = r.register_script(_RESET_BYTES)
        # (events, dedup window ms, max bytes, the caller's future)
        self._pending: list[_Append] = []
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.sorted = 0  # entries this replica sorted into lanes

    @property
    def client(self) -> Redis:
        return self._redis

    def _fail(self, op: str, exc: BaseException) -> NoReturn:
        detail = str(exc) or type(exc).__name__
        raise QueueUnavailable(
            f"webhook queue: redis {op} at {self.where} failed: {type(exc).__name__}: {detail}"
        ) from None

    async def _call(self, op: str, aw: Awaitable[_T]) -> _T:
        try:
            return await aw
        except _ERRORS as exc:
            self._fail(op, exc)

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._redis.xgroup_create(self.k_in, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                self._fail("XGROUP CREATE", exc)
        except _ERRORS as exc:
            self._fail("XGROUP CREATE", exc)
        await self._call(
            "EVALSHA reset_bytes", self._reset_bytes(keys=[self.k_in, self.k_bytes], args=[])
        )
        await self._release_previous_life()
        self._closing = False
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="webhooks-redis-flush"),
            asyncio.create_task(self._sort_loop(), name="webhooks-redis-sort"),
        ]

    async def _release_previous_life(self) -> None:
        """Lanes this consumer held before a restart are due again now."""
        held: dict[bytes, bytes] = await self._call(
            "HGETALL", cast("Awaitable[Any]", self._redis.hgetall(self.k_claims))
        )
        mine = f"{self.consumer}/".encode()
        now_ms = int(self._clock() * 1000)
        for lane, token in held.items():
            if token.startswith(mine):
                lane_s = _s(lane)
                await self._call(
                    "EVALSHA release",
                    self._release(
                        keys=[self.k_in, self.k_due, self.k_claims, self.k_tries, self.k_bytes],
                        args=[self.lane_prefix + lane_s, lane_s, token, now_ms, ""],
                    ),
                )

    async def close(self) -> None:
        self._closing = True
        self._kick.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            flush = tasks[0]
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(flush), 5.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for *_, fut in self._pending:
            if not fut.done():
                fut.set_exception(QueueUnavailable("webhook queue is closed"))
        self._pending.clear()
        with contextlib.suppress(*_ERRORS):
            await asyncio.wait_for(self._redis.aclose(), 5.0)

    # -- ingest (group commit) -------------------------------------------------

    async def append(
        self, events: Sequence[Event], *, dedup_window: float = 0.0, max_bytes: int = 0
    ) -> Appended:
        if not events:
            return Appended()
        if self._closing or not self._tasks:
            raise QueueUnavailable("webhook queue is closed")
        fut: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        window_ms = max(0, int(dedup_window * 1000))
        self._pending.append((events, window_ms, max(0, max_bytes), fut))
        self._kick.set()
        return await fut

    async def _flush_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            batch, self._pending = self._pending, []
            if batch:
                try:
                    await self._flush(batch)
                except Exception as exc:  # never leave an ingest waiting forever
                    log.exception("webhook queue: storing events failed")
                    err = QueueUnavailable(f"webhook queue: storing failed: {exc}")
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
            if self._closing and not self._pending:
                return

    async def _run_batch(self, batch: list[_Append]) -> list[Any]:
        """One pipeline: the append script for the whole batch, then a sort."""
        args: list[str | bytes | int] = []
        for events, window_ms, max_bytes, _ in batch:
            for e in events:
                fields = _fields(e)
                args += [f"{self.dedup_prefix}{e.target}|{e.id}", e.target, len(e.body)]
                args += [max_bytes, window_ms]
                args += [x for kv in fields.items() for x in kv]
        async with self._redis.pipeline(transaction=False) as pipe:
            # EVALSHA directly: a Script object in a pipeline costs a SCRIPT
            # EXISTS round trip per pipeline (NOSCRIPT is handled in _flush).
            pipe.evalsha(self._append.sha, 2, self.k_in, self.k_bytes, *args)
            # NOSCRIPT here (redis restarted) is handled by sort_new(), which loads it.
            pipe.evalsha(
                self._sort.sha,
                2,
                self.k_in,
                self.k_due,
                GROUP,
                self.consumer,
                SORT_BATCH,
                int(self._clock() * 1000),
                self.lane_prefix,
            )
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results

    async def _flush(self, batch: list[_Append]) -> None:
        """Append the batch and sort it into lanes, in one pipeline (one round trip).

        Each append is resolved by its events' script results: stored means
        stored, whether or not the sort in the same pipeline worked (the
        periodic sort catches up). A failed script fails every append of the
        batch (503: the instances retry; anything it stored before failing
        is then a duplicate).
        """
        try:
            appended, sorted_now = await self._run_batch(batch)
            if isinstance(appended, NoScriptError):
                # Redis lost its scripts (a restart): nothing ran; load and go again.
                await self._redis.script_load(_APPEND)
                appended, sorted_now = await self._run_batch(batch)
        except _ERRORS as exc:
            appended = exc
            sorted_now = None
        if isinstance(appended, BaseException):
            detail = f"{type(appended).__name__}: {appended}"
            err = QueueUnavailable(f"webhook queue: redis append at {self.where} failed: {detail}")
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        i = 0
        for events, _, _, fut in batch:
            mine = appended[i : i + len(events)]
            i += len(events)
            if fut.done():
                continue
            outcome: dict[int, list[str]] = {1: [], 0: [], -1: []}
            for e, r in zip(events, mine, strict=True):
                outcome.setdefault(int(r), []).append(e.target)
            fut.set_result(Appended(tuple(outcome[1]), tuple(outcome[0]), tuple(outcome[-1])))
        if isinstance(sorted_now, int) and sorted_now:
            self.sorted += sorted_now
            self._notify()
            if sorted_now >= SORT_BATCH:
                await self._sort_soon()
        elif isinstance(sorted_now, NoScriptError):
            await self._sort_soon()
        elif isinstance(sorted_now, BaseException):
            log.warning("webhook queue: sorting new events failed: %s", sorted_now)

    # -- sorting into lanes ------------------------------------------------------

    async def sort_new(self) -> int:
        """Place every event not yet in a lane into its lane (atomic per batch)."""
        total = 0
        while True:
            n = int(
                await self._sort(
                    keys=[self.k_in, self.k_due],
                    args=[
                        GROUP,
                        self.consumer,
                        SORT_BATCH,
                        int(self._clock() * 1000),
                        self.lane_prefix,
                    ],
                )
            )
            total += n
            if n < SORT_BATCH:
                break
        if total:
            self.sorted += total
            self._notify()
        return total

    async def _sort_soon(self) -> None:
        try:
            await self.sort_new()
        except _ERRORS as exc:
            # The periodic sort retries; the events are stored already.
            log.warning("webhook queue: sorting new events failed: %s", exc)

    async def _sort_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.sort_interval)
            try:
                await self.sort_new()
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                if "NOGROUP" in str(exc):
                    # The stream or group vanished (redis restarted empty): recreate.
                    with contextlib.suppress(*_ERRORS):
                        await self._redis.xgroup_create(self.k_in, GROUP, id="0", mkstream=True)
                log.warning("webhook queue: sorting new events failed: %s", exc)

    # -- delivery ------------------------------------------------------------------

    def _token(self) -> str:
        self._seq += 1
        return f"{self.consumer}/{self._nonce}/{self._seq}"

    async def claim(self, max_lanes: int, per_lane: int) -> list[Claim]:
        claims, _ = await self.claim_due(max_lanes, per_lane)
        return claims

    async def claim_due(self, max_lanes: int, per_lane: int) -> tuple[list[Claim], float | None]:
        if max_lanes <= 0:
            return [], await self.next_due()
        now_ms = int(self._clock() * 1000)
        token = self._token()
        raw = await self._call(
            "EVALSHA claim",
            self._claim(
                keys=[self.k_due, self.k_claims, self.k_in, self.k_tries],
                args=[
                    now_ms,
                    now_ms + int(self.lease * 1000),
                    token,
                    max_lanes,
                    per_lane,
                    self.lane_prefix,
                ],
            ),
        )
        mono = time.monotonic()
        claims: list[Claim] = []
        lanes_raw, first_due = raw
        for lane_raw, items in lanes_raw:
            pending: list[Pending] = []
            for eid, flat, tries in items:
                rounds, error = _decode_tries(tries)
                pending.append(Pending(_s(eid), _decode_event(_pairs(flat)), rounds, error))
            claims.append(Claim(_s(lane_raw), token, pending, mono))
        due = float(_s(first_due)) / 1000.0 if first_due else None
        return claims, due

    async def renew(self, claim: Claim) -> bool:
        until = int((self._clock() + self.lease) * 1000)
        ok = await self._call(
            "EVALSHA renew",
            self._renew(keys=[self.k_due, self.k_claims], args=[claim.lane, claim.token, until]),
        )
        claim.renewed_at = time.monotonic()
        return bool(ok)

    async def ack(self, claim: Claim, items: Sequence[Pending]) -> None:
        if not items:
            return
        await self._call(
            "EVALSHA ack",
            self._ack(
                keys=[self.k_in, self.k_due, self.k_claims, self.k_tries, self.k_bytes],
                args=[
                    self.lane_prefix + claim.lane,
                    claim.lane,
                    claim.token,
                    0,
                    *_acked(items),
                ],
            ),
        )

    async def nack(
        self, claim: Claim, item: Pending, *, next_at: float, rounds: int, error: str
    ) -> None:
        await self._call(
            "EVALSHA nack",
            self._nack(
                keys=[self.k_due, self.k_claims, self.k_tries],
                args=[
                    self.lane_prefix + claim.lane,
                    claim.lane,
                    claim.token,
                    int(next_at * 1000),
                    item.ref,
                    f"{rounds}|{error[:500]}",
                ],
            ),
        )

    async def dead_letter(self, claim: Claim, item: Pending, *, reason: str, rounds: int) -> None:
        await self._call(
            "EVALSHA dead_letter",
            self._dead_script(
                keys=[
                    self.k_in,
                    self.k_due,
                    self.k_claims,
                    self.k_tries,
                    self.k_dead,
                    self.k_bytes,
                ],
                args=[
                    self.lane_prefix + claim.lane,
                    claim.lane,
                    item.ref,
                    claim.token,
                    reason[:1000],
                    rounds,
                    repr(self._clock()),
                    item.event.target,
                ],
            ),
        )

    async def release(self, claim: Claim, ack: Sequence[Pending] = ()) -> bool:
        more = await self._call(
            "EVALSHA release",
            self._release(
                keys=[self.k_in, self.k_due, self.k_claims, self.k_tries, self.k_bytes],
                args=[
                    self.lane_prefix + claim.lane,
                    claim.lane,
                    claim.token,
                    int(self._clock() * 1000),
                    *_acked(ack),
                ],
            ),
        )
        return int(more) == 1

    async def next_due(self) -> float | None:
        rows = await self._call("ZRANGE", self._redis.zrange(self.k_due, 0, 0, withscores=True))
        if not rows:
            return None
        return float(rows[0][1]) / 1000.0

    async def stats(self) -> BacklogStats:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(self.k_in)
                pipe.xrange(self.k_in, "-", "+", count=1)
                pipe.xlen(self.k_dead)
                pipe.zcard(self.k_due)
                pipe.hgetall(self.k_bytes)
                pending, first, dead, lanes, by_target = await pipe.execute()
        except _ERRORS as exc:
            self._fail("stats", exc)
        oldest: float | None = None
        if first:
            _eid, fields = first[0]
            try:
                oldest = float(_s(fields[b"r"]))
            except (KeyError, ValueError):
                oldest = int(_s(_eid).split("-")[0]) / 1000.0
        return BacklogStats(
            pending=int(pending),
            oldest_received=oldest,
            dead_letters=int(dead),
            lanes=int(lanes),
            extra={"sorted_here": self.sorted},
            bytes_by_target={_s(t): int(b) for t, b in by_target.items() if int(b) > 0},
        )

    # -- dead letters ------------------------------------------------------------

    @staticmethod
    def _dead(eid: Any, fields: dict[bytes, Any]) -> DeadLetter:
        f = {_s(k): v for k, v in fields.items()}
        return DeadLetter(
            id=_s(eid),
            event=_decode_event(f),
            reason=_s(f.get("reason", b"")),
            rounds=int(_s(f.get("rounds", b"0"))),
            dead_at=float(_s(f.get("dead_at", b"0"))),
        )

    async def list_dead(
        self, *, limit: int = 100, after: str | None = None, target: str | None = None
    ) -> list[DeadLetter]:
        if after is not None and not _STREAM_ID.fullmatch(after):
            return []
        limit = max(1, limit)
        start = f"({after}" if after else "-"
        out: list[DeadLetter] = []
        while len(out) < limit:
            rows: Any = await self._call(
                "XRANGE", self._redis.xrange(self.k_dead, start, "+", count=max(limit, 100))
            )
            if not rows:
                break
            for eid, fields in rows:
                dl = self._dead(eid, fields)
                if target is None or dl.event.target == target:
                    out.append(dl)
                    if len(out) >= limit:
                        break
            start = f"({_s(rows[-1][0])}"
        return out

    async def get_dead(self, dead_id: str) -> DeadLetter | None:
        if not _STREAM_ID.fullmatch(dead_id):
            return None
        rows: Any = await self._call("XRANGE", self._redis.xrange(self.k_dead, dead_id, dead_id))
        if not rows:
            return None
        eid, fields = rows[0]
        return self._dead(eid, fields)

    async def replay_dead(self, dead_id: str) -> bool:
        if not _STREAM_ID.fullmatch(dead_id):
            return False
        n = await self._call(
            "EVALSHA replay",
            self._replay(
                keys=[self.k_dead, self.k_in, self.k_bytes], args=[dead_id, repr(self._clock())]
            ),
        )
        return bool(n)

    async def purge_dead(
        self,
        *,
        ids: Sequence[str] | None = None,
        target: str | None = None,
        before: float | None = None,
    ) -> int:
        if ids is not None:
            valid = [i for i in ids if _STREAM_ID.fullmatch(i)]
            if not valid:
                return 0
            return int(await self._call("XDEL", self._redis.xdel(self.k_dead, *valid)))
        if target is None and before is None:
            n = int(await self._call("XLEN", self._redis.xlen(self.k_dead)))
            await self._call("DEL", self._redis.delete(self.k_dead))
            return n
        count = 0
        after: str | None = None
        while True:
            page = await self.list_dead(limit=500, after=after, target=target)
            if not page:
                return count
            doomed = [d.id for d in page if before is None or d.dead_at < before]
            if doomed:
                count += int(await self._call("XDEL", self._redis.xdel(self.k_dead, *doomed)))
            after = page[-1].id
