"""``EventQueue``: the narrow interface between ingest, delivery and the two backends.

Vocabulary:

* an **event** is one webhook call from an instance, copied once per target
  it is routed to (each copy is queued, retried and dead-lettered on its own);
* a **lane** is the unit of ordering: ``"<target>|<session>"`` (every event
  of one session for one target, in arrival order), or one lane per event
  when ordering is off. Only the head of a lane may be attempted; a failed
  head holds the lane back until its next attempt time;
* a **claim** is one consumer's exclusive hold on a lane, carrying the lane's
  first few events. Whoever holds the claim delivers those events in order,
  ``ack``-ing them (several at once, or with the ``release``), and ends the
claim with ``release`` (lane due again now),
  ``nack`` (head failed: lane due at ``next_at``) or by losing it (the lease
  ran out: redis only, a crashed replica's lanes come back this way).

Delivery is at-least-once: an event leaves the queue only through ``ack``
(delivered) or ``dead_letter`` (kept in the dead-letter list for an operator),
both called after the outcome is known. A crash between the target's 2xx and
the ``ack`` means the event is delivered again; the stable event id lets the
target drop the duplicate.

Ingest bounds (both in ``append``, atomic with the store itself):

* **de-duplication**, per target: an event whose id was stored for that
  target less than ``dedup_window`` seconds ago is not stored again (a
  replay, or an instance retrying an event the router already has). The
  window counts from the first acceptance, whether the event is still
  queued or delivered since; ids are remembered for that long only.
* **bytes**, per target: the bodies queued for a target never exceed
  ``max_bytes``; an event that would is not stored for that target.

Backends: ``queue_sqlite.SqliteQueue`` (embedded default, one process) and
``queue_redis.RedisQueue`` (Redis Streams, shared by several replicas).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Appended",
    "BacklogStats",
    "Claim",
    "DeadLetter",
    "Event",
    "EventQueue",
    "Pending",
    "QueueUnavailable",
]


class QueueUnavailable(Exception):
    """The backend cannot be reached or written (redis down, disk full).

    Ingest answers 503 (the instance retries); delivery waits and tries again.
    """


@dataclass(frozen=True, slots=True)
class Event:
    """One event for one target, as stored."""

    # Stable across retries, replays and router restarts: the target
    # de-duplicates on it (``X-Event-Id``). WAHA's own ``id`` when it sent
    # one, otherwise generated at ingest.
    id: str
    target: str
    lane: str
    instance: str
    # "blazz" or "waha": how the instance signed it, and the default way to re-sign.
    dialect: str
    # The event type ("message", "session.status", ...).
    type: str
    session: str | None
    # Unix time the router accepted it (its age, for max_age and metrics).
    received: float
    # The raw body exactly as the instance sent it: re-signed, never re-encoded.
    body: bytes
    # Blazz ``X-Instance-Url`` as the instance sent it, passed on to the target.
    instance_url: str | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """What ``append`` did with each event (by target)."""

    # Stored now.
    stored: tuple[str, ...] = ()
    # Not stored: the target already had this event id within the window.
    duplicate: tuple[str, ...] = ()
    # Not stored: the target's queue would exceed ``max_bytes``.
    full: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pending:
    """A claimed event: ``ref`` is the backend's handle (sqlite row, stream id)."""

    ref: str
    event: Event
    # Delivery rounds that already failed (drives the backoff).
    rounds: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class Claim:
    lane: str
    token: str
    events: list[Pending]
    # Monotonic time of the claim or its last renewal (for lease renewal).
    renewed_at: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    # Backend handle, URL-safe (``/admin/webhooks/dead-letters/{id}``).
    id: str
    event: Event
    reason: str
    rounds: int
    dead_at: float


@dataclass(frozen=True, slots=True)
class BacklogStats:
    # Events waiting for delivery (every target copy counts).
    pending: int
    # Unix time the oldest pending event was accepted, None when empty.
    oldest_received: float | None
    dead_letters: int
    lanes: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    # Bytes of pending event bodies per target (targets with none may be absent).
    bytes_by_target: dict[str, int] = field(default_factory=dict)


class EventQueue(ABC):
    """Durable, ordered-per-lane event queue.

    Every method may raise ``QueueUnavailable``. ``on_work`` (set by the
    relay) is called when new work may be claimable: after a local append,
    and for redis when another replica's events arrive.
    """

    on_work: Callable[[], None] | None = None
    backend: str = "?"

    @abstractmethod
    async def open(self) -> None:
        """Create tables / groups, start background tasks."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def append(
        self, events: Sequence[Event], *, dedup_window: float = 0.0, max_bytes: int = 0
    ) -> Appended:
        """Store ``events`` durably; return only once they are.

        Each event is checked on its own, atomically with its store:
        ``dedup_window`` > 0: skipped (``duplicate``) when its target stored
        its id less than that many seconds ago; ``max_bytes`` > 0: skipped
        (``full``) when its target's queued bodies would exceed it.
        Concurrent calls are batched into one commit / pipeline (group commit).
        """

    @abstractmethod
    async def claim(self, max_lanes: int, per_lane: int) -> list[Claim]:
        """Up to ``max_lanes`` due lanes nobody holds, each with its first ``per_lane`` events."""

    async def claim_due(self, max_lanes: int, per_lane: int) -> tuple[list[Claim], float | None]:
        """``claim`` and then ``next_due`` (backends do both in one round trip)."""
        claims = await self.claim(max_lanes, per_lane)
        return claims, await self.next_due()

    @abstractmethod
    async def renew(self, claim: Claim) -> bool:
        """Extend the claim's lease; False if it was lost (stop delivering that lane)."""

    @abstractmethod
    async def ack(self, claim: Claim, items: Sequence[Pending]) -> None:
        """``items`` (the lane's first events, in order) were delivered: remove them."""

    @abstractmethod
    async def nack(
        self, claim: Claim, item: Pending, *, next_at: float, rounds: int, error: str
    ) -> None:
        """``item`` failed: record it, end the claim, lane due again at ``next_at``."""

    @abstractmethod
    async def dead_letter(self, claim: Claim, item: Pending, *, reason: str, rounds: int) -> None:
        """Move ``item`` (the lane's head) to the dead-letter list; the claim continues."""

    @abstractmethod
    async def release(self, claim: Claim, ack: Sequence[Pending] = ()) -> bool:
        """``ack`` these, then end the claim; the lane is due again at once if it has events.

        True if the lane still has events (only meaningful while the claim was held).
        """

    @abstractmethod
    async def next_due(self) -> float | None:
        """Unix time the next unclaimed lane becomes due (may be past), None if none."""

    @abstractmethod
    async def stats(self) -> BacklogStats: ...

    # -- dead letters --------------------------------------------------------

    @abstractmethod
    async def list_dead(
        self, *, limit: int = 100, after: str | None = None, target: str | None = None
    ) -> list[DeadLetter]:
        """Oldest first; ``after`` is the last id of the previous page."""

    @abstractmethod
    async def get_dead(self, dead_id: str) -> DeadLetter | None: ...

    @abstractmethod
    async def replay_dead(self, dead_id: str) -> bool:
        """Queue the dead letter again (at the end of its lane, age reset). False if unknown."""

    @abstractmethod
    async def purge_dead(
        self,
        *,
        ids: Sequence[str] | None = None,
        target: str | None = None,
        before: float | None = None,
    ) -> int:
        """Delete dead letters: the given ids, or all matching ``target``/``before``."""

    async def replay_all(self, *, target: str | None = None) -> int:
        """Replay every dead letter (of ``target``), oldest first."""
        count = 0
        after: str | None = None
        while True:
            page = await self.list_dead(limit=500, after=after)
            if not page:
                return count
            for dl in page:
                if (target is None or dl.event.target == target) and await self.replay_dead(dl.id):
                    count += 1
            after = page[-1].id

    def _notify(self) -> None:
        cb = self.on_work
        if cb is not None:
            cb()
