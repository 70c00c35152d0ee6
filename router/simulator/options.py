"""Simulator options and the CLI flags that build them.

``add_arguments`` / ``options_from_args`` are shared by ``python -m router.simulator``
and ``session-router simulate`` so both accept exactly the same flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DIALECTS = ("waha", "blazz")


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    """How one simulated WhatsApp API instance behaves."""

    name: str = "sim"
    # "waha" or "blazz": which upstream API the instance speaks.
    dialect: str = "waha"
    host: str = "127.0.0.1"
    # 0 picks a free port; the real one is printed on the READY line.
    port: int = 0
    # None means the instance does not authenticate callers.
    api_key: str | None = None
    # Shared by every instance of a fleet: ``<auth_dir>/<session>.json`` is a
    # session's "auth", so any instance can restore any session.
    auth_dir: Path = Path("sim-auth")
    # Seconds a session spends STARTING before it is ready (or shows a QR).
    start_delay: float = 0.2
    # Append-only JSONL file recording every accepted send (survives SIGKILL).
    record: Path | None = None
    # A new session without auth pairs by itself after ``start_delay``;
    # otherwise it waits in SCAN_QR_CODE for ``POST /_sim/sessions/{s}/pair``.
    auto_auth: bool = True
    # Exit when this process is no longer our parent (test runner died).
    parent_pid: int | None = None

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}, not {self.dialect!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.start_delay < 0:
            raise ValueError("start_delay must be >= 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator flags to ``parser`` (a subcommand parser is fine)."""
    parser.add_argument("--name", default="sim", help="instance name (default: sim)")
    parser.add_argument("--dialect", choices=DIALECTS, default="waha", help="API to speak")
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=0, help="listen port; 0 picks a free one")
    parser.add_argument("--api-key", default=None, help="require this API key (default: none)")
    parser.add_argument(
        "--auth-dir",
        type=Path,
        default=Path("sim-auth"),
        help="shared directory holding session auth files (default: ./sim-auth)",
    )
    parser.add_argument(
        "--start-delay",
        type=float,
        default=0.2,
        help="seconds a session takes to start (default: 0.2)",
    )
    parser.add_argument(
        "--record", type=Path, default=None, help="append every accepted send to this JSONL file"
    )
    parser.add_argument(
        "--no-auto-auth",
        dest="auto_auth",
        action="store_false",
        help="new sessions wait in SCAN_QR_CODE until POST /_sim/sessions/{s}/pair",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this pid is no longer our parent (used by the test harness)",
    )


def options_from_args(ns: argparse.Namespace) -> SimulatorOptions:
    """Build ``SimulatorOptions`` from a namespace parsed with ``add_arguments``."""
    return SimulatorOptions(
        name=ns.name,
        dialect=ns.dialect,
        host=ns.host,
        port=ns.port,
        api_key=ns.api_key,
        auth_dir=ns.auth_dir,
        start_delay=ns.start_delay,
        record=ns.record,
        auto_auth=ns.auto_auth,
        parent_pid=ns.parent_pid,
    )
