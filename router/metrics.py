"""Every Prometheus metric the router exports, in one place.

Naming follows Prometheus conventions with one prefix, ``wa_router_``.
Labels are bounded by the fleet: instance names, methods, status classes,
reasons and outcomes from fixed sets. Never a session id, phone number or
key (cardinality, and privacy).

Hot-path cost: the proxy keeps the per-instance label children it needs
(``InstanceMetrics``), so recording is an attribute lookup and an ``inc``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from router import __version__
from router.hotmetrics import FastCounter, FastGauge, FastHistogram

if TYPE_CHECKING:
    from router.runtime import Runtime

REGISTRY = CollectorRegistry(auto_describe=True)

# Record per-request metrics on the hot path. Only the benchmark turns this
# off, to measure what recording costs (bench/run.py --no-metrics).
HOT_PATH = True

# Latency buckets for a proxy on a LAN: sub-millisecond to tens of seconds.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RESTORE = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)

BUILD_INFO = Info("wa_router_build", "Version of the router.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

# The two per-request metrics are lock-free (router.hotmetrics): recording
# them is on every request's path.
REQUESTS = FastCounter(
    "wa_router_requests",
    "Requests proxied, by instance, method and status class (2xx, 4xx, ...).",
    ["instance", "method", "status_class"],
    registry=REGISTRY,
)
ROUTER_ERRORS = Counter(
    "wa_router_router_errors_total",
    "Errors the router answered itself (bad id, auth, unknown session, ...), by code.",
    ["error"],
    registry=REGISTRY,
)
REQUEST_DURATION = FastHistogram(
    "wa_router_request_duration_seconds",
    "Time from the request's arrival to the response headers, as the client sees it.",
    ["instance"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
UPSTREAM_DURATION = FastHistogram(
    "wa_router_upstream_duration_seconds",
    "Time the upstream instance took to answer (headers), per instance.",
    ["instance"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "wa_router_upstream_errors_total",
    "Upstream failures by instance and kind "
    "(connect, stale, reset, timeout, status_5xx: a 502/503/504 answer, session_missing).",
    ["instance", "kind"],
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "wa_router_failovers_total",
    "Session recoveries by reason and outcome.",
    ["reason", "outcome"],
    registry=REGISTRY,
)
RESTORE_DURATION = Histogram(
    "wa_router_restore_duration_seconds",
    "Time to bring a session back (find or restore), successful recoveries.",
    buckets=_RESTORE,
    registry=REGISTRY,
)
RESTORE_HELD = Counter(
    "wa_router_restore_held_total",
    "Restore attempts refused because another process still held the session's "
    "storage (Blazz: Chromium's SingletonLock), by target instance; retried.",
    ["instance"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "wa_router_retries_total",
    "Requests sent again, by why (connect, stale, idempotent, recovered).",
    ["reason"],
    registry=REGISTRY,
)
RETRIES_DENIED = Counter(
    "wa_router_retries_denied_total",
    "Retries not made, by why (budget, unsafe, exhausted).",
    ["reason"],
    registry=REGISTRY,
)
IDEMPOTENT_REPLAYS = Counter(
    "wa_router_idempotent_replays_total",
    "Client repeats answered from a remembered Idempotency-Key response.",
    registry=REGISTRY,
)
HEALTH_CHECKS = Counter(
    "wa_router_health_checks_total",
    "Active health check results by instance and result (ok, fail).",
    ["instance", "result"],
    registry=REGISTRY,
)
EJECTIONS = Counter(
    "wa_router_ejections_total",
    "Passive outlier ejections by instance.",
    ["instance"],
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "wa_router_config_reloads_total",
    "Config reload attempts by result (success, failure).",
    ["result"],
    registry=REGISTRY,
)
CONFIG_LAST_RELOAD_SUCCESS = Gauge(
    "wa_router_config_last_reload_successful",
    "1 if the last config reload succeeded (or none was tried), 0 if it was rejected.",
    registry=REGISTRY,
)
CONFIG_LAST_RELOAD_SUCCESS.set(1)
CONFIG_LAST_RELOAD_TIME = Gauge(
    "wa_router_config_last_reload_timestamp_seconds",
    "Unix time of the last successful config load.",
    registry=REGISTRY,
)
# Lock-free: moved twice per request (router.hotmetrics).
IN_FLIGHT = FastGauge(
    "wa_router_requests_in_flight",
    "Client requests being proxied right now.",
    registry=REGISTRY,
)

# Placement by labels (router.placement): a session placed outside its
# selector, or refused a place because its selector is strict. ``action``:
# create, failover, drain, move, rebalance.
SELECTOR_MISSES = Counter(
    "wa_router_placement_selector_misses_total",
    "Placements where no instance matching the session's selector had room, by action "
    "(create, failover, drain, move, rebalance) and outcome (outside: placed on another "
    "instance; refused: strict selector, not placed).",
    ["action", "outcome"],
    registry=REGISTRY,
)

# -- send pacing (router.pacing); recorded for paced sessions' sends only,
# lock-free (router.hotmetrics) like the other per-request metrics --
PACING_SENDS = FastCounter(
    "wa_router_pacing_sends",
    "Sends of paced sessions by outcome (passed: at once, paced: waited for their slot, "
    "refused) and the limit that held or refused them (none, min_gap, per_minute, per_hour, "
    "recipients_per_day; unavailable: the pacing store could not answer).",
    ["outcome", "limit"],
    registry=REGISTRY,
)
PACING_DELAY = FastHistogram(
    "wa_router_pacing_delay_seconds",
    "Delay pacing added to each send it let through (0 for those that passed at once).",
    [],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
# Moved twice per waiting send.
PACING_WAITING = FastGauge(
    "wa_router_pacing_waiting",
    "Sends waiting for their pacing slot right now (this replica).",
    registry=REGISTRY,
)

ADMIN_STATES = ("active", "draining", "maintenance")


class FleetCollector(Collector):
    """Fleet state read at scrape time, so the hot path records nothing for it:
    sessions and capacity per instance, health, admin state, cache lookups."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.rt
        counts = rt.smap.counts()
        sessions = GaugeMetricFamily(
            "wa_router_sessions", "Sessions mapped to each instance.", labels=["instance"]
        )
        capacity = GaugeMetricFamily(
            "wa_router_instance_capacity_sessions",
            "Configured max_sessions of each instance.",
            labels=["instance"],
        )
        healthy = GaugeMetricFamily(
            "wa_router_instance_healthy",
            "1 when the instance is healthy (active checks and outlier detection), else 0.",
            labels=["instance"],
        )
        admin = GaugeMetricFamily(
            "wa_router_instance_admin_state",
            "1 for the instance's administrative state (active, draining, maintenance).",
            labels=["instance", "state"],
        )
        for inst in rt.fleet:
            sessions.add_metric([inst.name], counts.get(inst.name, 0))
            capacity.add_metric([inst.name], inst.config.max_sessions)
            healthy.add_metric([inst.name], 1 if inst.healthy else 0)
            for state in ADMIN_STATES:
                admin.add_metric([inst.name, state], 1 if inst.admin.value == state else 0)
        lookups = CounterMetricFamily(
            "wa_router_cache_lookups",
            "Session map lookups by result: hit and miss (in-process cache), "
            "store_hit and store_miss (the store behind it, on a cache miss).",
            labels=["result"],
        )
        smap = rt.smap
        lookups.add_metric(["hit"], smap.hits)
        lookups.add_metric(["miss"], smap.misses)
        lookups.add_metric(["store_hit"], smap.store_hits)
        lookups.add_metric(["store_miss"], smap.store_misses)
        mapped = GaugeMetricFamily("wa_router_mapped_sessions", "Entries in the session map.")
        mapped.add_metric([], len(smap))
        yield from (sessions, capacity, healthy, admin, lookups, mapped)
        yield from _selector_capacity(rt)


def _selector_capacity(rt: Runtime) -> Iterator[Metric]:
    """Free capacity per label selector, the autoscaling signal
    (deploy/kubernetes/autoscaling). ``selector`` values come from the config
    (``*``, the placement rules' selectors, the instances' label sets)."""
    families = {
        field: GaugeMetricFamily(name, text, labels=["selector"])
        for field, name, text in _SELECTOR_FAMILIES
    }
    for pool in rt.placer.capacity():
        label = [str(pool.selector)]
        for field, family in families.items():
            family.add_metric(label, getattr(pool, field))
    yield from families.values()


# (router.placement.PoolCapacity field, metric, help) of the capacity families.
_SELECTOR_FAMILIES = (
    (
        "instances",
        "wa_router_selector_instances",
        "Healthy, active instances matching the selector.",
    ),
    (
        "capacity",
        "wa_router_selector_capacity_sessions",
        "max_sessions summed over the healthy, active instances matching the selector.",
    ),
    (
        "sessions",
        "wa_router_selector_sessions",
        "Sessions mapped to instances matching the selector (any health or state).",
    ),
    (
        "free",
        "wa_router_selector_free_sessions",
        "Room for new sessions on the healthy, active instances matching the selector.",
    ),
    (
        "instance_max_sessions",
        "wa_router_selector_instance_max_sessions",
        "Largest max_sessions of an instance matching the selector (what one more instance "
        "of that pool adds).",
    ),
)


_collector: FleetCollector | None = None


def register_runtime(runtime: Runtime) -> None:
    """Point the fleet collector at the current runtime (once per process)."""
    global _collector
    if _collector is None:
        _collector = FleetCollector(runtime)
        REGISTRY.register(_collector)
    else:
        _collector.rt = runtime


def metrics_exposition(accept: str) -> tuple[bytes, str]:
    """The registry rendered in the format the scraper asked for."""
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type
