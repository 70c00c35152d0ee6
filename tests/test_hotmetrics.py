"""The lock-free request-path metrics expose exactly what prometheus-client would."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from router.hotmetrics import FastCounter, FastHistogram

BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 10.0)


def _lines(registry: CollectorRegistry) -> list[str]:
    # prometheus-client adds *_created samples; ours has none to add.
    return [
        ln
        for ln in generate_latest(registry).decode().splitlines()
        if "_created" not in ln and not ln.startswith("#")
    ]


@settings(max_examples=50)
@given(values=st.lists(st.floats(min_value=0, max_value=50, allow_nan=False), max_size=40))
def test_histogram_matches_prometheus_client(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("lat_seconds", "d", ["instance"], buckets=BUCKETS, registry=ours)
    ref = Histogram("lat_seconds", "d", ["instance"], buckets=BUCKETS, registry=theirs)
    for v in values:
        fast.labels("a").observe(v)
        ref.labels("a").observe(v)
    assert _lines(ours) == _lines(theirs)


def test_counter_matches_prometheus_client_and_forgets_removed_labels() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastCounter("reqs", "d", ["instance", "code"], registry=ours)
    ref = Counter("reqs", "d", ["instance", "code"], registry=theirs)
    for labels, n in ((("a", "2xx"), 3), (("b", "5xx"), 1)):
        fast.labels(*labels).inc(n)
        ref.labels(*labels).inc(n)
    assert _lines(ours) == _lines(theirs)
    fast.remove("b", "5xx")
    ref.remove("b", "5xx")
    assert _lines(ours) == _lines(theirs)
    with pytest.raises(ValueError):
        fast.labels("only-one")
