#!/usr/bin/env bash
# Shared by test.sh and main.sh: create .venv if missing and install the package with the extras
# named in $1 (e.g. dev, all). Run from the repository root.
set -euo pipefail
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Pin the CPU build of torch for development and CI; the package itself accepts a range.
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[$1]"
