"""The durable webhook relay: instances -> router (persisted) -> main app, at least once.

Modules: ``ingest`` (endpoints, signature checks), ``signatures``,
``queue`` (interface), ``queue_sqlite`` / ``queue_redis`` (backends),
``delivery`` (routing, re-signing, one delivery round), ``relay`` (lifecycle,
scheduling: ``WebhookRelay``), ``admin`` (dead-letter API), ``cli``, ``metrics``.

Nothing is imported here: importers name the module they use
(``router.webhooks.relay``), so no module of the package imports the package
that imports it.
"""
