"""``python -m router.simulator --dialect waha --port 0 ...``"""

from __future__ import annotations

import argparse

from router.simulator.app import run
from router.simulator.options import add_arguments, options_from_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m router.simulator", description="Simulated WhatsApp API instance"
    )
    add_arguments(parser)
    run(options_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
