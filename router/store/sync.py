"""Cross-replica cache sync: the redis change feed applied to this replica's cache.

Every write through a replica's ``RedisStore`` publishes what changed on
``{key_prefix}map`` in the same MULTI/EXEC as the write (see
``router.store.redis``). ``MapSync`` runs one task per replica that listens
on that channel and hands other replicas' changes to ``SessionMap.apply``,
which updates the cache in place (new owner) or drops the entry (forgotten).
Nothing of this is on the request path: the proxy keeps reading the cache.

Connection and gaps. The subscriber has a connection of its own with no
automatic reconnect, so a disconnect is always *seen*: after any gap in the
feed the replica cannot know what it missed, so every (re)connection runs
``subscribe -> SessionMap.resync() -> apply messages``. Subscribing first
means no change is lost between the scan and the feed; messages published
while the scan runs wait in the socket and are applied afterwards in order,
which converges on the store's latest state. ``resync`` corrects the cache
in place rather than wiping it (no burst of store reads, placement counts
stay whole).

A store that lost its data. Redis restarted without persistence (or
flushed) is not "every session gone": dropping the cache would turn every
request into a probe of every instance. Each connection reads the store's
*epoch*, a random marker ``{key_prefix}epoch`` created by the first replica
to find it missing; a replica that sees it differ from the one it last
synced with knows the store was reset, keeps the sessions the store lacks
(``resync(keep_missing=True)``) and writes them back
(``RedisStore.fill_missing``: HSETNX, never over an entry another replica
wrote meanwhile, nothing published), since reconciliation writes only what
differs from the cache and a replica started later needs the store. (A
session forgotten by another replica in the instant between the scan and
the refill may be written back; its instance then says "not here" and
failover / reconciliation clear it.) An epoch, not "the store is empty",
because one replica may already have written a new session before another
reconnects. A redis restarted *with* persistence keeps its epoch: an
ordinary resync, and a session written after its last snapshot is dropped
from the cache and found again by a probe on its next request.
While disconnected the cache keeps serving what it knows: with redis down
no other replica can publish a change either, and a dead owner is still
caught by failover.

A silent connection (half-open TCP, a hung redis) is detected by a PING
after ``ping_interval`` seconds without traffic, answered within
``ping_timeout``, else the connection is dropped and re-established with
backoff (``retry_min`` doubling up to ``retry_max``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from router.sessionmap import Resync, SessionMap
from router.store.base import StoreUnavailable
from router.store.redis import RedisStore

__all__ = ["MapSync", "decode_changes"]

log = logging.getLogger(__name__)


class _FeedLost(Exception):
    """The subscribed connection stopped answering."""


# Everything that ends one connection of the feed (then: retry, resync).
_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, StoreUnavailable, _FeedLost)


def decode_changes(data: str | bytes) -> tuple[str, float, dict[str, str | None]]:
    """``(replica id, publish time, {session: owner or None})``; ``ValueError`` if malformed."""
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    replica, sent, changes = doc.get("r"), doc.get("t", 0.0), doc.get("c")
    if not isinstance(replica, str) or not isinstance(changes, dict):
        raise ValueError("missing r or c")
    if not isinstance(sent, int | float):
        raise ValueError("bad t")
    for session, owner in changes.items():
        if not isinstance(session, str) or not (owner is None or isinstance(owner, str)):
            raise ValueError("bad change")
    return replica, float(sent), changes


class MapSync:
    def __init__(
        self,
        smap: SessionMap,
        store: RedisStore,
        *,
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        retry_min: float = 0.05,
        retry_max: float = 2.0,
        refill: bool = True,
    ) -> None:
        self.smap = smap
        self.store = store
        self.channel = store.channel
        self.epoch_key = f"{store.key_prefix}epoch"
        self.replica_id = store.replica_id
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.refill = refill
        self._task: asyncio.Task[None] | None = None
        self._client: Redis | None = None
        self._first: asyncio.Future[bool] | None = None
        self._epoch: str | None = None  # the store's epoch as of the last resync
        self._synced = asyncio.Event()
        # Observability (metrics, admin, tests).
        self.connected = False
        self.connects = 0  # successful subscriptions (1 + reconnects)
        self.messages = 0  # change messages received, own ones included
        self.own = 0  # own messages skipped
        self.applied = 0  # cache entries changed by other replicas' messages
        self.malformed = 0
        self.last_lag: float | None = None  # publish -> applied, seconds (wall clocks)
        self.last_resync: Resync | None = None
        self.resets = 0  # times the store was found reset (epoch changed)
        self.refilled = 0  # sessions written back into a store found reset
        self.last_error: str | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> bool:
        """Start the subscriber; wait for the outcome of its first connection.

        True once subscribed and the cache resynced from the store (the
        initial load); False if redis could not be reached (the task keeps
        retrying in the background and resyncs when it gets through).
        """
        if self._task is not None:
            raise RuntimeError("MapSync already running")
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="map-sync")
        return await asyncio.shield(self._first)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected = False
        self._synced.clear()

    async def wait_synced(self) -> None:
        """Wait until subscribed and resynced (again, after a gap). Bound it with a timeout."""
        await self._synced.wait()

    # -- the task ----------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.retry_min
        lost_at: float | None = None
        try:
            while True:
                client = self.store.dedicated_client()
                self._client = client
                try:
                    await self._session(client, lost_at)
                except _ERRORS as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if self.connected:
                        delay = self.retry_min  # it worked until now: retry at once
                    if self.connected or lost_at is None:
                        lost_at = time.monotonic()
                        log.warning(
                            "map change feed at %s lost (%s); retrying, the cache "
                            "will be resynced when it is back",
                            self.store.where,
                            self.last_error,
                        )
                    else:
                        log.debug("map change feed still down: %s", self.last_error)
                finally:
                    self.connected = False
                    self._synced.clear()
                    self._client = None
                    with contextlib.suppress(Exception):
                        await client.aclose()
                self._resolve_first(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
        finally:
            self._resolve_first(False)

    async def _session(self, client: Redis, lost_at: float | None) -> None:
        """Subscribe, resync, then apply messages until the connection fails."""
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            # The confirmation: from here on every published change reaches us.
            confirm = await pubsub.get_message(timeout=self.ping_timeout + 1.0)
            if confirm is None or confirm.get("type") != "subscribe":
                raise _FeedLost(f"no subscribe confirmation: {confirm!r}")
            first = self._epoch is None
            reset = await self._check_epoch(client)
            # A first sync over a cache filled meanwhile (redis was down at
            # start: what the instances answered to probes) keeps it too.
            keep = reset or (first and len(self.smap) > 0)
            self.last_resync = result = await self.smap.resync(keep_missing=keep)
            if reset:
                self.resets += 1
                log.warning(
                    "session store at %s was reset (redis restarted empty or flushed): "
                    "keeping the %d cached sessions%s",
                    self.store.where,
                    len(self.smap),
                    " and writing them back" if self.refill else "",
                )
            if keep and self.refill:
                self.refilled += await self.store.fill_missing(self.smap.entries())
            if lost_at is not None:
                log.info(
                    "map change feed back after %.1fs; cache resynced: %d changed, %d dropped",
                    time.monotonic() - lost_at,
                    result.changed,
                    result.dropped,
                )
            self.connects += 1
            self.connected = True
            self._synced.set()
            self._resolve_first(True)
            await self._listen(pubsub)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        ping_sent: float | None = None
        while True:
            message = await pubsub.get_message(timeout=self.ping_interval)
            now = loop.time()
            if message is None:
                self.smap.expire_recent()  # idle: let old write records go
                if ping_sent is not None:
                    if now - ping_sent >= self.ping_timeout:
                        raise _FeedLost(f"no answer to PING within {self.ping_timeout}s")
                elif now - quiet_since >= self.ping_interval:
                    await pubsub.ping()
                    ping_sent = now
                continue
            quiet_since = now
            ping_sent = None
            if message.get("type") == "message":
                self._handle(message.get("data"))

    async def _check_epoch(self, client: Redis) -> bool:
        """Read (or create) the store's epoch; True if it changed since the last sync.

        Runs on the client's second connection: the first one is subscribed.
        """
        await client.set(self.epoch_key, uuid.uuid4().hex, nx=True)
        epoch = await client.get(self.epoch_key)
        if not isinstance(epoch, str):
            raise _FeedLost("the store epoch vanished while it was read")
        reset = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return reset

    def _handle(self, data: Any) -> None:
        self.messages += 1
        try:
            replica, sent, changes = decode_changes(data)
        except (ValueError, TypeError):
            self.malformed += 1
            log.warning("ignoring a malformed map change message on %s", self.channel)
            return
        if replica == self.replica_id:
            self.own += 1
            return
        self.applied += self.smap.apply(changes)
        if sent:
            self.last_lag = max(0.0, time.time() - sent)

    def _resolve_first(self, ok: bool) -> None:
        first = self._first
        if first is not None and not first.done():
            first.set_result(ok)

    # For tests and admin: the feed's state at a glance.
    def status(self) -> Mapping[str, Any]:
        return {
            "connected": self.connected,
            "connects": self.connects,
            "messages": self.messages,
            "own": self.own,
            "applied": self.applied,
            "malformed": self.malformed,
            "last_lag": self.last_lag,
            "last_error": self.last_error,
        }
