#!/usr/bin/env bash
# Set up a virtual environment in .venv (if missing), install the package with its test extras,
# lint (ruff, configured in pyproject.toml) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh dev
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
