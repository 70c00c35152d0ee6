"""Simulator options and the CLI flags that build them.

``add_arguments`` / ``options_from_args`` are shared by ``python -m router.simulator``
and ``session-router simulate`` so both accept exactly the same flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DIALECTS = ("waha", "blazz")

# Blazz's TimeoutHandler (src/middleware/TimeoutHandler.js): the first pattern
# found anywhere in the raw path (case-sensitive) gives the budget in seconds.
# Reaching one crashes the real process (``winston.warning`` is not a function).
DEFAULT_TIMEOUTS: tuple[tuple[str, float], ...] = (
    ("sessions", 60.0),
    ("send", 45.0),
    ("health", 5.0),
    ("status", 10.0),
    ("reconnect", 60.0),
    ("regenerate_qr", 30.0),
    ("default", 30.0),
)
TIMEOUT_KEYS = tuple(k for k, _ in DEFAULT_TIMEOUTS)


def parse_timeouts(spec: str) -> tuple[tuple[str, float], ...]:
    """``"sessions=60,send=45,default=30"`` over the real defaults."""
    budgets = dict(DEFAULT_TIMEOUTS)
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in budgets:
            raise ValueError(
                f"request timeouts: {item!r} is not KEY=SECONDS with KEY in {TIMEOUT_KEYS}"
            )
        seconds = float(value)
        if seconds <= 0:
            raise ValueError(f"request timeouts: {key} must be > 0")
        budgets[key] = seconds
    return tuple((k, budgets[k]) for k in TIMEOUT_KEYS)


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
    # Shared by every instance of a fleet. WAHA: ``<auth_dir>/<session>.json``
    # is a session's "auth". Blazz: ``<auth_dir>/workspace_<w>/session-<s>/``
    # is its Chromium profile (SingletonLock + stored login), as LocalAuth.
    auth_dir: Path = Path("sim-auth")
    # WAHA: seconds a session spends STARTING before it is ready (or shows a QR).
    # Blazz: seconds from the create's answer until ``connected``
    # (``authenticated`` at half of it).
    start_delay: float = 0.2
    # Append-only JSONL file recording every accepted send (survives SIGKILL).
    record: Path | None = None
    # A new session without auth pairs by itself after ``start_delay``;
    # otherwise it waits in SCAN_QR_CODE for ``POST /_sim/sessions/{s}/pair``.
    auto_auth: bool = True
    # Exit when this process is no longer our parent (test runner died).
    parent_pid: int | None = None
    # Blazz: seconds ``client.initialize()`` takes; a create answers after it.
    init_delay: float = 0.05
    # Blazz: seconds between QR codes while a session waits for a scan.
    qr_interval: float = 20.0
    # Blazz: > 0 runs each session's "Chromium" as a child process that holds
    # the profile lock and survives a SIGKILL of the simulator this long.
    browser_linger: float = 0.0
    # Blazz: per-route request budgets (see DEFAULT_TIMEOUTS); reaching one
    # crashes the process like the real TimeoutHandler.
    request_timeouts: tuple[tuple[str, float], ...] = DEFAULT_TIMEOUTS
    # Blazz: the main app (LARAVEL_URL): webhooks and the startup restore.
    laravel_url: str | None = None
    # Blazz: HMAC_SECRET for webhook signatures (required with laravel_url).
    hmac_secret: str | None = None
    # Blazz: multiplies webhook / startup-restore retry delays (1 = real).
    retry_scale: float = 1.0
    # Blazz: pause after each delivered recipient of bulk-send (real: 1 s).
    bulk_send_pause: float = 1.0

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {DIALECTS}, not {self.dialect!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        for name in ("start_delay", "init_delay", "browser_linger", "retry_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.bulk_send_pause < 0 or self.qr_interval <= 0:
            raise ValueError("bulk_send_pause must be >= 0 and qr_interval > 0")
        if self.laravel_url is not None and not self.hmac_secret:
            # Like the real service: WebhookNotifier throws without HMAC_SECRET.
            raise ValueError("laravel_url needs hmac_secret")


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
        help="seconds a session takes to start; Blazz: from the create's answer to "
        "connected (default: 0.2)",
    )
    parser.add_argument(
        "--record", type=Path, default=None, help="append every accepted send to this JSONL file"
    )
    parser.add_argument(
        "--no-auto-auth",
        dest="auto_auth",
        action="store_false",
        help="new sessions wait in SCAN_QR_CODE (Blazz: qr_scanning) until "
        "POST /_sim/sessions/{s}/pair",
    )
    blazz = parser.add_argument_group("blazz dialect")
    blazz.add_argument(
        "--init-delay",
        type=float,
        default=0.05,
        help="seconds client.initialize() takes; POST /api/sessions answers after it "
        "(default: 0.05; the real one takes 1-2 s)",
    )
    blazz.add_argument(
        "--qr-interval",
        type=float,
        default=20.0,
        help="seconds between QR codes (and qr_code_generated webhooks) (default: 20)",
    )
    blazz.add_argument(
        "--browser-linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run each session's browser as a child process holding the profile lock "
        "that outlives a SIGKILL of the simulator this long (default: 0, no child)",
    )
    blazz.add_argument(
        "--request-timeouts",
        type=parse_timeouts,
        default=DEFAULT_TIMEOUTS,
        metavar="KEY=S,...",
        help="request budgets that crash the process when reached, keys "
        f"{','.join(TIMEOUT_KEYS)} (default: the real 60,45,5,10,60,30,30)",
    )
    blazz.add_argument(
        "--laravel-url",
        default=None,
        help="main app URL: webhooks go to URL/api/whatsapp/webhooks/webjs, and at start "
        "every session of URL/api/whatsapp/accounts/active is created",
    )
    blazz.add_argument("--hmac-secret", default=None, help="webhook HMAC secret")
    blazz.add_argument(
        "--retry-scale",
        type=float,
        default=1.0,
        help="multiply webhook and startup retry delays (default: 1, the real 1/2/4 s)",
    )
    blazz.add_argument(
        "--bulk-send-pause",
        type=float,
        default=1.0,
        help="seconds bulk-send waits after each delivered recipient (default: 1)",
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
        init_delay=ns.init_delay,
        qr_interval=ns.qr_interval,
        browser_linger=ns.browser_linger,
        request_timeouts=ns.request_timeouts,
        laravel_url=ns.laravel_url,
        hmac_secret=ns.hmac_secret,
        retry_scale=ns.retry_scale,
        bulk_send_pause=ns.bulk_send_pause,
    )
