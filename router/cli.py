"""``session-router``: run, check-config, simulate, demo, and the admin commands
(status, instances, drain, undrain, maintenance, move, sessions, pin, unpin,
reload: see ``router.admin_client``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from router import __version__
from router.config import ConfigError
from router.config_loader import check_config, load


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cmd_run(ns: argparse.Namespace) -> int:
    from router.server import Server, install_uvloop

    try:
        config = load(ns.config)
    except ConfigError as exc:
        print(f"config rejected: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    watch = ns.watch_interval if ns.watch_interval > 0 else None
    try:
        asyncio.run(Server(config, drain_timeout=ns.drain_timeout, watch_interval=watch).run())
    except OSError as exc:
        # Typically the listen address is taken: say so, without a traceback.
        print(f"cannot start the router: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_check_config(ns: argparse.Namespace) -> int:
    ok, text = check_config(ns.file)
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _cmd_simulate(ns: argparse.Namespace) -> int:
    from router.simulator.app import run
    from router.simulator.options import options_from_args

    run(options_from_args(ns))
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from router.demo import DemoError, run_demo
    from router.server import install_uvloop

    install_uvloop()
    try:
        return asyncio.run(
            run_demo(ns.config, ns.port, base_port=ns.base_port, free_ports=ns.free_ports)
        )
    except (ConfigError, DemoError, OSError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-router",
        description="Session-affine reverse proxy for a fleet of WhatsApp API instances.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the router")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=15.0,
        help="seconds to let in-flight requests finish on SIGTERM (default 15)",
    )
    run.add_argument(
        "--watch-interval",
        type=float,
        default=1.0,
        help="seconds between two looks at the config file for changes; 0 turns the "
        "watch off (SIGHUP and POST /admin/reload still reload) (default 1)",
    )
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=_cmd_check_config)

    sim = sub.add_parser("simulate", help="run one simulated WhatsApp instance")
    from router.simulator.options import add_arguments

    add_arguments(sim)
    sim.set_defaults(func=_cmd_simulate)

    demo = sub.add_parser("demo", help="three simulated instances behind the router")
    demo.add_argument("-c", "--config", default=None, help="demo config (default config/demo.yaml)")
    demo.add_argument("--port", type=int, default=None, help="router port (default from config)")
    ports = demo.add_mutually_exclusive_group()
    ports.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="router on this port, the instances on the ones after it",
    )
    ports.add_argument("--free-ports", action="store_true", help="let the system pick every port")
    demo.set_defaults(func=_cmd_demo)

    from router.admin_client import add_arguments as add_admin_arguments

    add_admin_arguments(sub)

    from router.webhooks.cli import add_arguments as add_webhooks_arguments

    add_webhooks_arguments(sub)  # webhooks dead-letters | replay | purge | stats
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(ns.log_level)
    result: int = ns.func(ns)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
