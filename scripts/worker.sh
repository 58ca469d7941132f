#!/usr/bin/env bash
# On a GPU machine, in its checkout: set up .venv (first time only) and start a Prefect worker
# on the work pool. Needs the variables `python -m flows.cluster env` prints on the coordinating
# machine. Extra arguments go to flows.worker (--name, --limit, --data-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec python -m flows.worker "$@"
