"""The shared store: one redis hash, ``{key_prefix}sessions``, field = session id.

A single hash keeps the whole map in one key (HGET / HSET / HDEL on the hot
write path, HSCAN to list it), so several router replicas share one view
and a router restart keeps it.

Failure behaviour, which the proxy relies on:

* every call is bounded: connect ~1 s, each command ~1 s, waiting for a
  pooled connection ~1 s; a redis that is down or hung costs a caller at
  most a couple of seconds, never a hang;
* every redis / socket error becomes ``StoreUnavailable`` with a one-line
  message (no password, no redis traceback chained to it);
* a redis restart is survived: a pooled connection found dead is dropped
  and the command retried once on a fresh connection (all commands used
  here are idempotent), and idle connections are PINGed before reuse
  (``health_check_interval``). Nothing has to be reset by the caller.

Change feed (several replicas): every write (``set``, ``set_many``,
``delete``) also PUBLISHes what changed on ``{key_prefix}map``, inside the
same MULTI/EXEC as the write: one round trip, the message goes out with
the write (a connection lost before EXEC applies neither), and messages
come out in the order redis applied the writes. (A retried EXEC whose reply
was lost may publish twice: applying a change twice is harmless.)
A message is ``{"r": replica id, "t": unix time, "c": {session: owner or
null}}`` (``encode_changes``); ``router.store.sync.MapSync`` applies other
replicas' messages to its ``SessionMap`` cache and skips its own.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any, NoReturn, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from router.config import redact_url
from router.store.base import SessionStore, StoreUnavailable

# Everything a redis call may raise that means "the store cannot answer".
# (``TimeoutError`` and ``asyncio.TimeoutError`` are ``OSError`` on 3.11.)
_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


class RedisStore(SessionStore):
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "wa-router:",
        connect_timeout: float = 1.0,
        op_timeout: float = 1.0,
        health_check_interval: float = 10.0,
        max_connections: int = 64,
        batch: int = 1000,
        publish: bool = True,
        replica_id: str | None = None,
    ) -> None:
        """Build the client and its pool; no I/O happens until the first call.

        ``url`` is a redis://, rediss:// or unix:// URL (``ValueError`` if not).
        ``batch`` is the HSCAN COUNT hint and the number of fields per HSET
        in ``set_many``. ``publish`` sends every change on ``channel`` (the
        change feed, see the module docstring), tagged with ``replica_id``
        (random unless given) so this replica can recognise its own messages.
        """
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.key_prefix = key_prefix
        self.key = f"{key_prefix}sessions"
        self.notes_key = f"{key_prefix}notes"
        self.channel = f"{key_prefix}map"
        self.replica_id = replica_id or uuid.uuid4().hex[:16]
        self.where = redact_url(url)
        self.publish = publish
        self._url = url
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout
        self._batch = batch
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            # How long a call waits for a free pooled connection.
            timeout=op_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=op_timeout,
            socket_keepalive=True,
            health_check_interval=health_check_interval,
            decode_responses=True,
            # One immediate retry on a fresh connection after a connection
            # error (stale socket after a redis restart). Timeouts are not
            # retried: a hung redis must cost one timeout, not several.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis: Redis = Redis.from_pool(pool)

    @property
    def client(self) -> Redis:
        """The underlying client, for features beside the map (pub/sub, locks)."""
        return self._redis

    def dedicated_client(self) -> Redis:
        """A new client with connections of its own (at most 2) and no automatic retry.

        For the change-feed subscriber: a subscribed connection cannot run
        other commands (a second one reads the store's epoch), and it must
        *see* a disconnect (to resync after it) rather than be silently
        reconnected. The caller closes it.
        """
        return Redis.from_url(
            self._url,
            socket_connect_timeout=self._connect_timeout,
            # Bounds command replies (SUBSCRIBE, PING); reads of the feed
            # pass their own timeout.
            socket_timeout=self._op_timeout,
            socket_keepalive=True,
            health_check_interval=0,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
            max_connections=2,
        )

    def _fail(self, op: str, exc: BaseException) -> NoReturn:
        detail = str(exc) or type(exc).__name__
        raise StoreUnavailable(
            f"redis {op} at {self.where} failed: {type(exc).__name__}: {detail}"
        ) from None

    async def get(self, session: str) -> str | None:
        try:
            value = await self._redis.hget(self.key, session)
        except _ERRORS as exc:
            self._fail("HGET", exc)
        return cast("str | None", value)  # decode_responses=True: str, never bytes

    async def set(self, session: str, instance: str) -> None:
        try:
            if not self.publish:
                await self._redis.hset(self.key, session, instance)
                return
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key, session, instance)
                pipe.publish(self.channel, self._message({session: instance}))
                await pipe.execute()
        except _ERRORS as exc:
            self._fail("HSET", exc)

    async def set_many(self, mapping: Mapping[str, str]) -> None:
        """Write in HSETs of ``batch`` fields, up to 10 HSETs per round trip.

        With ``publish``, each HSET is followed by the PUBLISH of its fields,
        and the round trip is one MULTI/EXEC. Not atomic as a whole: on
        ``StoreUnavailable`` a prefix may be written (and published).
        """
        items = iter(mapping.items())
        while True:
            chunks = list(islice(_chunks(items, self._batch), 10))
            if not chunks:
                return
            try:
                async with self._redis.pipeline(transaction=self.publish) as pipe:
                    for chunk in chunks:
                        pipe.hset(self.key, items=chunk)
                        if self.publish:
                            changes = dict(zip(chunk[::2], chunk[1::2], strict=True))
                            pipe.publish(self.channel, self._message(changes))
                    await pipe.execute()
            except _ERRORS as exc:
                self._fail("HSET (pipeline)", exc)

    async def delete(self, session: str) -> None:
        try:
            if not self.publish:
                await self._redis.hdel(self.key, session)
                return
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self.key, session)
                pipe.publish(self.channel, self._message({session: None}))
                await pipe.execute()
        except _ERRORS as exc:
            self._fail("HDEL", exc)

    async def fill_missing(self, pairs: Iterable[tuple[str, str]]) -> int:
        """HSETNX each pair: only sessions the store lacks are written; returns how many.

        For refilling a store that came back empty from a replica's cache:
        never overwrites an entry someone wrote meanwhile, and publishes
        nothing (the other replicas kept their caches too). ``batch`` per
        round trip.
        """
        written = 0
        items = iter(pairs)
        while batch := list(islice(items, self._batch)):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for session, instance in batch:
                        pipe.hsetnx(self.key, session, instance)
                    results = await pipe.execute()
            except _ERRORS as exc:
                self._fail("HSETNX (pipeline)", exc)
            written += sum(1 for result in results if result)
        return written

    def _message(self, changes: Mapping[str, str | None]) -> str:
        return encode_changes(self.replica_id, changes)

    async def scan(self) -> AsyncIterator[tuple[str, str]]:
        """HSCAN in batches. Like HSCAN itself, may yield a pair more than once."""
        cursor: int = 0
        while True:
            try:
                result = await self._redis.hscan(self.key, cursor, count=self._batch)
            except _ERRORS as exc:
                self._fail("HSCAN", exc)
            cursor, chunk = result
            for session, instance in cast("dict[str, str]", chunk).items():
                yield session, instance
            if cursor == 0:
                return

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _ERRORS:
            return False

    async def get_note(self, session: str) -> dict[str, Any] | None:
        try:
            raw = await self._redis.hget(self.notes_key, session)
        except _ERRORS as exc:
            self._fail("HGET", exc)
        if raw is None:
            return None
        try:
            note = json.loads(raw)
        except ValueError:
            return None
        return note if isinstance(note, dict) else None

    async def set_note(self, session: str, note: Mapping[str, Any]) -> None:
        try:
            await self._redis.hset(self.notes_key, session, json.dumps(dict(note)))
        except _ERRORS as exc:
            self._fail("HSET", exc)

    async def delete_note(self, session: str) -> None:
        try:
            await self._redis.hdel(self.notes_key, session)
        except _ERRORS as exc:
            self._fail("HDEL", exc)

    async def count(self) -> int:
        """Number of mapped sessions (HLEN)."""
        try:
            return int(await self._redis.hlen(self.key))
        except _ERRORS as exc:
            self._fail("HLEN", exc)

    async def clear(self) -> None:
        """Drop the whole map (admin / tests)."""
        try:
            await self._redis.delete(self.key)
        except _ERRORS as exc:
            self._fail("DEL", exc)

    async def close(self) -> None:
        with contextlib.suppress(*_ERRORS):
            await self._redis.aclose()


def encode_changes(replica_id: str, changes: Mapping[str, str | None]) -> str:
    """One change-feed message: who, when (unix time), and each session's new owner (or null)."""
    return json.dumps(
        {"r": replica_id, "t": round(time.time(), 6), "c": dict(changes)},
        separators=(",", ":"),
    )


def _chunks(items: Iterator[tuple[str, str]], size: int) -> Iterator[list[str]]:
    """Flat ``[field, value, field, value, ...]`` lists of ``size`` pairs each."""
    while True:
        chunk = [part for pair in islice(items, size) for part in pair]
        if not chunk:
            return
        yield chunk
