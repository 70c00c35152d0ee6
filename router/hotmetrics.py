"""Lock-free counters and histograms for the request path.

prometheus-client's metrics take a lock on every ``inc``/``observe`` (they
are thread-safe); a histogram observation costs two locked increments and a
Python loop over the buckets. The router's request path runs on one event
loop thread, so these collectors keep plain numbers instead (a ``bisect``
picks the bucket) and build the Prometheus families only when scraped.
The API is the subset the router uses: ``labels(*values)`` returning a child
with ``inc()`` / ``observe()``, and ``collect()``.

Use only from the event loop thread.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


def _go_float(value: float) -> str:
    # How Prometheus writes an ``le`` bound (e.g. 0.5 -> '0.5', 1 -> '1.0').
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


_C = TypeVar("_C")


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1


class _Labelled(Collector, Generic[_C]):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _C] = {}
        registry.register(self)

    def _new_child(self) -> _C:
        raise NotImplementedError

    def labels(self, *values: str) -> _C:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        """Forget one label set (as prometheus-client's ``remove``)."""
        self._children.pop(values, None)

    def clear(self) -> None:
        self._children.clear()

    def describe(self) -> Iterator[Metric]:
        yield from self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(empty=False)

    def _families(self, empty: bool) -> Iterator[Metric]:
        raise NotImplementedError


class FastCounter(_Labelled[CounterChild]):
    """A labelled counter; ``name`` without the ``_total`` suffix."""

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _families(self, empty: bool) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if not empty:
            for values, child in list(self._children.items()):
                family.add_metric(list(values), child.value)
        yield family


class FastGauge(Collector):
    """An unlabelled gauge the owner moves with ``value += 1`` / ``-= 1``."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, value=self.value)


class FastHistogram(_Labelled[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._le = [_go_float(b) for b in self.bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _families(self, empty: bool) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if not empty:
            for values, child in list(self._children.items()):
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for le, n in zip(self._le, child.counts, strict=False):
                    cumulative += n
                    buckets.append((le, cumulative))
                cumulative += child.counts[-1]
                buckets.append(("+Inf", cumulative))
                family.add_metric(list(values), buckets, child.sum)
        yield family
