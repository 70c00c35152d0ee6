"""Where a new session goes: the placeable instance with the lowest load.

Load is (sessions + 1) / (max_sessions * weight); ``max_sessions`` is a hard cap.
Ties go to the instance with fewer sessions, then to config order, so the
choice is deterministic and testable.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from router.instances import Instance
from router.sessionmap import SessionMap
from router.snapshot import Live


def load_ratio(inst: Instance, sessions: int) -> float:
    return sessions / (inst.config.max_sessions * inst.config.weight)


def _placement_key(inst: Instance, sessions: int, slow_start: float, now: float) -> float:
    # The load *after* placing one more: with "+1", weights and slow start
    # matter even for an empty instance (0/anything would always win).
    ramp = 1.0
    if inst.healthy_since and slow_start > 0:
        ramp = min(1.0, max(0.1, (now - inst.healthy_since) / slow_start))
    return (sessions + 1) / (inst.config.max_sessions * inst.config.weight * ramp)


def choose(
    instances: Iterable[Instance],
    counts: Mapping[str, int],
    *,
    exclude: frozenset[str] = frozenset(),
    slow_start: float = 0.0,
) -> Instance | None:
    """The instance a new session should start on, or None when the fleet is full.

    An instance that came back less than ``slow_start`` seconds ago takes
    new sessions as if its capacity were ramping up from 10 %.
    """
    now = time.monotonic()
    best: Instance | None = None
    best_key: tuple[float, int] | None = None
    for inst in instances:
        if not inst.placeable or inst.name in exclude:
            continue
        n = counts.get(inst.name, 0)
        if n >= inst.config.max_sessions:
            continue
        key = (_placement_key(inst, n, slow_start, now), n)
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best


class Reservations:
    """Placements decided but not yet confirmed by the instance.

    Without them, a burst of concurrent creates all see the same counts and
    land on the same "least loaded" instance.
    """

    def __init__(self) -> None:
        self._pending: dict[str, int] = {}

    def add(self, instance: str) -> None:
        self._pending[instance] = self._pending.get(instance, 0) + 1

    def release(self, instance: str) -> None:
        left = self._pending.get(instance, 0) - 1
        if left > 0:
            self._pending[instance] = left
        else:
            self._pending.pop(instance, None)

    def with_counts(self, counts: Mapping[str, int]) -> Mapping[str, int]:
        if not self._pending:
            return counts
        merged = dict(counts)
        for name, n in self._pending.items():
            merged[name] = merged.get(name, 0) + n
        return merged


class Placer:
    """Where the proxy, failover and moves put sessions, for the fleet in force."""

    def __init__(self, live: Live, smap: SessionMap) -> None:
        self.live = live
        self.smap = smap
        self.reservations = Reservations()
        self._rr = itertools.count()

    def counts(self) -> Mapping[str, int]:
        """Sessions per instance, placements in flight included."""
        return self.reservations.with_counts(self.smap.counts())

    def place(self, exclude: frozenset[str] = frozenset()) -> Instance | None:
        """Where a new (or restored) session should start: least loaded, with
        pending placements and slow start of recovered instances counted."""
        snap = self.live.snap
        return choose(
            snap.fleet,
            self.counts(),
            exclude=exclude,
            slow_start=snap.config.outlier.slow_start,
        )

    def any_instance(self, exclude: Instance | None = None) -> Instance | None:
        """A healthy instance for a request that names no session (round robin)."""
        healthy = [i for i in self.live.snap.fleet.healthy() if i is not exclude]
        if not healthy:
            return None
        return healthy[next(self._rr) % len(healthy)]

    @contextmanager
    def reserved(self, inst: Instance) -> Iterator[Instance]:
        """Count ``inst`` as one session fuller while a start on it is in flight."""
        self.reservations.add(inst.name)
        try:
            yield inst
        finally:
            self.reservations.release(inst.name)
