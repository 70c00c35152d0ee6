#!/bin/bash
# One side-by-side run of bench/peers/peers.sh with the router as an extra target.
# Usage: bench/run.sh [--dur 8] [--write bench/last-run.md]   (see bench/run.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" bench/run.py "$@"
