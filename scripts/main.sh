#!/usr/bin/env bash
# The main job: from a fresh clone, set up .venv (if missing) and install the package, then train
# the small Block-Recurrent Transformer on the built-in corpus (the CPython standard library),
# evaluate it on held-out documents by position, sample a continuation, and write report/.
# About 15 minutes on 2 CPU cores. Extra arguments go to `brt run`, e.g. --quick or max_steps=100;
# --quick writes report-quick/ instead, so that it never blocks the full job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh all
exec .venv/bin/brt run "$@"
