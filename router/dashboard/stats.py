"""Per-instance request rate, error rate and p99 for the dashboard, off the hot path.

The proxy only increments Prometheus metrics (``REQUESTS`` by instance,
method and status class; ``REQUEST_DURATION`` by instance). A background
task here reads those metric objects once a second and keeps the last
``window`` seconds of cumulative readings; every figure is a difference
between the newest and the oldest reading:

- rate: requests per second over the window;
- error rate: the fraction of those requests answered 5xx;
- p99: from the differences of the histogram's cumulative buckets, with
  the linear interpolation inside a bucket that Prometheus'
  ``histogram_quantile`` uses (so it is as precise as the buckets are).

A counter that went down (a label child removed and re-created) counts from
zero, as Prometheus' ``rate`` does. Nothing here touches a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.registry import Collector

from router.metrics import REQUEST_DURATION, REQUESTS

log = logging.getLogger(__name__)

ERROR_CLASS = "5xx"


@dataclass(frozen=True, slots=True)
class Reading:
    """Cumulative values of one instance at one moment."""

    requests: float = 0.0
    errors: float = 0.0
    # (upper bound, cumulative count) in increasing bound order, +Inf last.
    buckets: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # monotonic seconds
    instances: Mapping[str, Reading]


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What one instance (or the whole fleet) did over the window."""

    requests: float = 0.0  # requests counted in the window
    rate: float = 0.0  # per second
    error_rate: float | None = None  # fraction 0..1; None without requests
    p99: float | None = None  # seconds; None without timed requests

    def as_dict(self) -> dict[str, float | None]:
        return {
            "requests": round(self.requests, 3),
            "rate": round(self.rate, 3),
            "error_rate": None if self.error_rate is None else round(self.error_rate, 4),
            "p99": None if self.p99 is None else round(self.p99, 6),
        }


@dataclass(frozen=True, slots=True)
class FleetStats:
    window: float  # seconds actually covered (0 until two samples exist)
    instances: Mapping[str, WindowStats] = field(default_factory=dict)
    total: WindowStats = field(default_factory=WindowStats)

    def get(self, name: str) -> WindowStats:
        return self.instances.get(name) or WindowStats()


def read(requests: Collector, durations: Collector) -> dict[str, Reading]:
    """One reading of every instance from the two metric objects."""
    totals: dict[str, float] = {}
    errors: dict[str, float] = {}
    for family in requests.collect():
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue  # ``_created``
            inst = s.labels.get("instance", "")
            totals[inst] = totals.get(inst, 0.0) + s.value
            if s.labels.get("status_class") == ERROR_CLASS:
                errors[inst] = errors.get(inst, 0.0) + s.value
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in durations.collect():
        for s in family.samples:
            if not s.name.endswith("_bucket"):
                continue
            inst = s.labels.get("instance", "")
            buckets.setdefault(inst, []).append((float(s.labels["le"]), s.value))
    out: dict[str, Reading] = {}
    for inst in totals.keys() | buckets.keys():
        out[inst] = Reading(
            requests=totals.get(inst, 0.0),
            errors=errors.get(inst, 0.0),
            buckets=tuple(sorted(buckets.get(inst, ()))),
        )
    return out


def _delta(new: float, old: float) -> float:
    # A counter that went down was reset: everything it holds is new.
    return new - old if new >= old else new


def bucket_deltas(new: Reading, old: Reading | None) -> list[tuple[float, float]]:
    """Cumulative bucket counts of the window (``new`` minus ``old``)."""
    if old is None or [b for b, _ in old.buckets] != [b for b, _ in new.buckets]:
        return list(new.buckets)
    if any(n < o for (_, n), (_, o) in zip(new.buckets, old.buckets, strict=True)):
        return list(new.buckets)  # reset
    return [(b, n - o) for (b, n), (_, o) in zip(new.buckets, old.buckets, strict=True)]


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``(upper bound, count)`` buckets, as
    Prometheus' ``histogram_quantile`` computes it; None when empty."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in ordered:
        if cumulative >= rank and cumulative > below:
            if math.isinf(bound):
                # Above the highest finite bucket: that bound is all we know.
                return lower
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        if not math.isinf(bound):
            lower = bound
        below = cumulative
    return lower


def _merge(lists: Iterable[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    merged: dict[float, float] = {}
    for buckets in lists:
        for bound, count in buckets:
            merged[bound] = merged.get(bound, 0.0) + count
    return sorted(merged.items())


def window_stats(old: Sample, new: Sample) -> FleetStats:
    """Rates and p99 between two samples."""
    span = new.at - old.at
    if span <= 0:
        return FleetStats(window=0.0)
    per: dict[str, WindowStats] = {}
    all_requests = all_errors = 0.0
    all_buckets: list[list[tuple[float, float]]] = []
    for name, now in new.instances.items():
        before = old.instances.get(name)
        requests = _delta(now.requests, before.requests if before else 0.0)
        errors = _delta(now.errors, before.errors if before else 0.0)
        buckets = bucket_deltas(now, before)
        all_requests += requests
        all_errors += errors
        all_buckets.append(buckets)
        per[name] = WindowStats(
            requests=requests,
            rate=requests / span,
            error_rate=min(1.0, errors / requests) if requests > 0 else None,
            p99=quantile(0.99, buckets),
        )
    total = WindowStats(
        requests=all_requests,
        rate=all_requests / span,
        error_rate=min(1.0, all_errors / all_requests) if all_requests > 0 else None,
        p99=quantile(0.99, _merge(all_buckets)),
    )
    return FleetStats(window=span, instances=per, total=total)


class StatsSampler:
    """Reads the request metrics every ``interval`` seconds and keeps the
    figures of the last ``window`` seconds (``stats``), ready to serve."""

    def __init__(
        self,
        requests: Collector = REQUESTS,
        durations: Collector = REQUEST_DURATION,
        *,
        interval: float = 1.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests = requests
        self.durations = durations
        self.interval = interval
        self.window = window
        self.clock = clock
        # One more sample than the window holds intervals, so it spans it whole.
        self._samples: deque[Sample] = deque(maxlen=max(2, round(window / interval) + 1))
        self._stats = FleetStats(window=0.0)
        self._task: asyncio.Task[None] | None = None

    @property
    def stats(self) -> FleetStats:
        return self._stats

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def sample(self) -> FleetStats:
        """Take one reading now and recompute the window."""
        self._samples.append(Sample(self.clock(), read(self.requests, self.durations)))
        if len(self._samples) >= 2:
            self._stats = window_stats(self._samples[0], self._samples[-1])
        return self._stats

    def start(self) -> None:
        if not self.running:
            self.sample()  # the baseline: rates exist from the next tick on
            self._task = asyncio.create_task(self._run(), name="dashboard-stats")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sample()
            except Exception:  # a bad reading must not end the sampling
                log.exception("dashboard stats sample failed")
