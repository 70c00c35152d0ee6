"""A simulated WhatsApp API instance (WAHA or Blazz dialect) for tests and demos.

It keeps sessions in memory like a real instance, stores their "auth" in a
directory shared by a fleet (so any instance can restore any session), records
every accepted send in an append-only JSONL file, and takes injected faults
through ``/_sim/fault``. See ``router/simulator/app.py`` for the entry points.
"""

from router.simulator.app import READY_PREFIX, build_app, run, serve
from router.simulator.options import SimulatorOptions, add_arguments, options_from_args

__all__ = [
    "READY_PREFIX",
    "SimulatorOptions",
    "add_arguments",
    "build_app",
    "options_from_args",
    "run",
    "serve",
]
