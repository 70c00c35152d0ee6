"""A simulated WhatsApp API instance (WAHA or Blazz dialect) for tests and demos.

It keeps sessions in memory like a real instance, stores their "auth" in a
directory shared by a fleet (so any instance can restore any session), records
every accepted send in an append-only JSONL file, and takes injected faults
through ``/_sim/fault``.

The package imports nothing itself (so that its modules can import one another
without a cycle through it): ``router.simulator.app`` has ``build_app``,
``serve`` and ``run``; ``router.simulator.options`` the options and flags.
"""
