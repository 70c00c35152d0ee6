"""The durable webhook relay: instances -> router (persisted) -> main app, at least once.

Modules: ``ingest`` (endpoints, signature checks), ``signatures``,
``queue`` (interface), ``queue_sqlite`` / ``queue_redis`` (backends),
``delivery`` (routing, re-signing, one delivery round), ``relay`` (lifecycle,
scheduling), ``admin`` (dead-letter API), ``cli``, ``metrics``.
"""

from __future__ import annotations

from router.webhooks.relay import WebhookRelay, build_queue

__all__ = ["WebhookRelay", "build_queue"]
