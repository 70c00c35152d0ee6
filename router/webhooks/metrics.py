"""Prometheus metrics of the webhook relay (prefix ``wa_router_webhook_``).

Registered in the router's registry (``router.metrics.REGISTRY``), so the
router's ``/metrics`` exports them with everything else.

Labels are bounded by the config: ``dialect`` (blazz, waha), ``target`` (a
configured target name), ``outcome`` and ``reason`` (fixed sets below).
Never a session id, an event id or a key.

Gauges describe the shared queue as this replica last read it (every few
seconds): with several replicas on one redis, every replica reports the
same backlog, so alert on ``max()`` of them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from router.metrics import REGISTRY

__all__ = [
    "ATTEMPTS",
    "BACKLOG",
    "DEAD_LETTERED",
    "DEAD_LETTERS",
    "DELIVERED",
    "DELIVERY_LATENCY",
    "INGEST_SECONDS",
    "LANES",
    "OLDEST_AGE",
    "QUEUED_BYTES",
    "QUEUE_USAGE",
    "RECEIVED",
]

# outcome: queued, unrouted (no target wants it), duplicate (every target
# had its id already: nothing stored), bad_signature, stale, malformed,
# too_large, slow (no body byte for limits.body_timeout: 408),
# unknown_instance, busy (the ingest holds max_buffered_bytes:
# 429), queue_full (a target's queue is at max_queued_bytes: 429),
# unavailable (queue down: 503).
RECEIVED = Counter(
    "wa_router_webhook_received_total",
    "Webhook calls from instances, by dialect and what the router did with them.",
    ["dialect", "outcome"],
    registry=REGISTRY,
)
INGEST_SECONDS = Histogram(
    "wa_router_webhook_ingest_seconds",
    "Time from a webhook's arrival to its durable commit (the 200 waits for it).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "wa_router_webhook_backlog",
    "Events (one per target) waiting for delivery.",
    registry=REGISTRY,
)
OLDEST_AGE = Gauge(
    "wa_router_webhook_oldest_pending_age_seconds",
    "Age of the oldest event waiting for delivery (0 when none).",
    registry=REGISTRY,
)
QUEUED_BYTES = Gauge(
    "wa_router_webhook_queued_bytes",
    "Bytes of event bodies waiting for delivery, per target.",
    ["target"],
    registry=REGISTRY,
)
QUEUE_USAGE = Gauge(
    "wa_router_webhook_queue_usage_ratio",
    "Queued bytes of a target over webhooks.ingest.max_queued_bytes (at 1 its new events"
    " are refused with 429).",
    ["target"],
    registry=REGISTRY,
)
LANES = Gauge(
    "wa_router_webhook_lanes",
    "Lanes (target x session) with events waiting.",
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "wa_router_webhook_delivery_latency_seconds",
    "Time from ingest to the target's 2xx.",
    ["target"],
    buckets=(
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
        30.0,
        60.0,
        300.0,
        1800.0,
        3600.0,
        21600.0,
        86400.0,
    ),
    registry=REGISTRY,
)
# outcome: success, http_4xx, http_5xx, network, timeout.
ATTEMPTS = Counter(
    "wa_router_webhook_delivery_attempts_total",
    "HTTP delivery attempts, by target and outcome.",
    ["target", "outcome"],
    registry=REGISTRY,
)
DELIVERED = Counter(
    "wa_router_webhook_delivered_total",
    "Events delivered (target answered 2xx).",
    ["target"],
    registry=REGISTRY,
)
# reason: max_age, rejected (a dead_letter_statuses answer), no_target.
DEAD_LETTERED = Counter(
    "wa_router_webhook_dead_lettered_total",
    "Events moved to the dead-letter list, by target and reason.",
    ["target", "reason"],
    registry=REGISTRY,
)
DEAD_LETTERS = Gauge(
    "wa_router_webhook_dead_letters",
    "Events in the dead-letter list now.",
    registry=REGISTRY,
)
