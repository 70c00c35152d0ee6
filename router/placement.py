"""Where a new session goes: the placeable instance with the lowest load.

Load is (sessions + 1) / (max_sessions * weight); ``max_sessions`` is a hard cap.
Ties go to the instance with fewer sessions, then to config order, so the
choice is deterministic and testable.

With labels (``router.labels``), a session has a selector and goes to the
least loaded placeable instance *matching* it. When none in it has room, a
soft selector places it on the least loaded other instance (a session
running outside its selector beats a session not running: a WhatsApp
session that is down misses its messages), a strict one places it nowhere;
either way an event (``placement_outside`` / ``placement_refused``), the
counter ``wa_router_placement_selector_misses_total`` and a log line say
so. Creates, failover, drain and moves all place through ``Placer.place``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from router.config import RouterConfig
from router.events import EventLog
from router.instances import Instance
from router.labels import (
    NO_CHOICE,
    Choice,
    Policy,
    Selector,
    exported_selectors,
)
from router.metrics import SELECTOR_MISSES
from router.sessionmap import SessionMap
from router.snapshot import Live
from router.store.base import StoreUnavailable

log = logging.getLogger(__name__)


def labels_of(inst: Instance) -> Mapping[str, str]:
    """An instance's labels (``instances[].labels`` in the config)."""
    return inst.config.labels


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


class Placed(NamedTuple):
    """A placement: the instance (None: nowhere), and whether it is outside
    the session's selector (``outside``) or was refused one there because
    the selector is strict (``refused``)."""

    instance: Instance | None
    outside: bool = False
    refused: bool = False


@dataclass(frozen=True, slots=True)
class PoolCapacity:
    """Capacity of the instances matching one selector (``Placer.capacity``)."""

    selector: Selector
    # Healthy and active (placeable) instances matching, and their max_sessions summed.
    instances: int
    capacity: int
    # Sessions mapped to any matching instance, placeable or not (all need a home).
    sessions: int
    # Room left on the placeable matching instances.
    free: int
    # The largest max_sessions of a matching instance, placeable or not: what
    # one more instance of the pool adds (the autoscaler's unit).
    instance_max_sessions: int


class Placer:
    """Where the proxy, failover and moves put sessions, for the fleet in force."""

    def __init__(self, live: Live, smap: SessionMap, events: EventLog) -> None:
        self.live = live
        self.smap = smap
        self.events = events
        self.reservations = Reservations()
        self._rr = itertools.count()
        # The placement policy compiled for the config it came from.
        self._policy: tuple[RouterConfig, Policy] | None = None

    def counts(self) -> Mapping[str, int]:
        """Sessions per instance, placements in flight included."""
        return self.reservations.with_counts(self.smap.counts())

    def policy(self, config: RouterConfig | None = None) -> Policy:
        """The placement rules of ``config`` (default: the config in force),
        compiled once per config."""
        if config is None:
            config = self.live.snap.config
        cached = self._policy
        if cached is None or cached[0] is not config:
            cached = self._policy = (config, Policy.of(config.placement))
        return cached[1]

    async def choice_of(self, session: str) -> Choice:
        """The selector an existing session is placed by: the one its create's
        header chose (kept in the store's note of it), else the rules'."""
        try:
            note = await self.smap.store.get_note(session)
        except StoreUnavailable:
            note = None  # the rules still apply
        return Choice.from_note(note) or self.policy().by_rules(session)

    def place(
        self,
        exclude: frozenset[str] = frozenset(),
        choice: Choice = NO_CHOICE,
        *,
        action: str = "create",
        session: str | None = None,
    ) -> Instance | None:
        """Where a new (or restored) session should start: least loaded, with
        pending placements and slow start of recovered instances counted."""
        return self.place_for(choice, exclude, action=action, session=session).instance

    def place_for(
        self,
        choice: Choice,
        exclude: frozenset[str] = frozenset(),
        *,
        action: str,
        session: str | None,
    ) -> Placed:
        """``place`` for a session with a selector: within it when any
        instance in it has room, else outside it (soft) or nowhere (strict),
        which is recorded (event, metric, log)."""
        snap = self.live.snap
        counts = self.counts()
        slow = snap.config.outlier.slow_start
        selector = choice.selector
        if selector.empty:
            return Placed(choose(snap.fleet, counts, exclude=exclude, slow_start=slow))
        inside: list[Instance] = []
        outside: list[Instance] = []
        for inst in snap.fleet:
            (inside if selector.matches(labels_of(inst)) else outside).append(inst)
        within = choose(inside, counts, exclude=exclude, slow_start=slow)
        if within is not None:
            return Placed(within)
        other = choose(outside, counts, exclude=exclude, slow_start=slow)
        if other is None:
            return Placed(None)  # the whole fleet is full or down: not a selector matter
        if choice.strict:
            self._missed(choice, session, action, "refused", None)
            return Placed(None, refused=True)
        self._missed(choice, session, action, "outside", other)
        return Placed(other, outside=True)

    def note_outside(self, choice: Choice, session: str, action: str, inst: Instance) -> None:
        """Record that ``session`` was put outside its selector by other means
        (an operator's move)."""
        self._missed(choice, session, action, "outside", inst)

    def _missed(
        self, choice: Choice, session: str | None, action: str, outcome: str, inst: Instance | None
    ) -> None:
        SELECTOR_MISSES.labels(action, outcome).inc()
        self.events.add(
            f"placement_{outcome}",
            session=session,
            selector=str(choice.selector),
            source=choice.source,
            strict=choice.strict,
            action=action,
            instance=inst.name if inst is not None else None,
        )
        if inst is not None:
            log.warning(
                "%s of %s: no instance matching %s has room; placed on %s, outside its selector",
                action,
                session,
                choice.selector,
                inst.name,
            )
        else:
            log.warning(
                "%s of %s: no instance matching %s has room and the selector is strict: not placed",
                action,
                session,
                choice.selector,
            )

    def capacity(self) -> list[PoolCapacity]:
        """Capacity per selector: the whole fleet (``*``), each rule's selector
        and each instance label set (so label cardinality comes from config)."""
        fleet = list(self.live.snap.fleet)
        counts = self.smap.counts()
        pools = []
        for selector in exported_selectors(self.policy(), (labels_of(i) for i in fleet)):
            members = [i for i in fleet if selector.matches(labels_of(i))]
            placeable = [i for i in members if i.placeable]
            pools.append(
                PoolCapacity(
                    selector=selector,
                    instances=len(placeable),
                    capacity=sum(i.config.max_sessions for i in placeable),
                    sessions=sum(counts.get(i.name, 0) for i in members),
                    free=sum(
                        max(0, i.config.max_sessions - counts.get(i.name, 0)) for i in placeable
                    ),
                    instance_max_sessions=max((i.config.max_sessions for i in members), default=0),
                )
            )
        return pools

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
