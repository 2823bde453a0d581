#!/usr/bin/env bash
# Set up a virtual environment in .venv (if missing), install the package with its test extras,
# and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Pin the CPU build of torch for development and CI; the package itself accepts a range.
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[dev]"
exec .venv/bin/python -m pytest -q "$@"
