#!/usr/bin/env bash
# The test command: set up .venv (idempotent), lint, then run the whole suite in two tiers: the fast one (every
# module's unit behaviour; -m "not slow") first, so a broken unit fails in minutes, then the end-to-end runs marked
# slow. Both must pass; arguments go to both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Exit code 5 is "no test selected": tests named in the arguments may all sit in one tier.
tier() { .venv/bin/python -m pytest -q --durations=10 -m "$1" "${@:2}" || [ $? -eq 5 ]; }
tier "not slow" "$@"
tier slow "$@"
