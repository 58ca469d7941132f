#!/usr/bin/env bash
# Set up (first time only) and run the default experiment end to end through the Prefect
# flow, then print where the results are.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
python -m flows.pipeline_flow
python -m pipeline.report
