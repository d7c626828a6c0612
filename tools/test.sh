#!/usr/bin/env bash
# The test command (README; .ci/run calls exactly this): set up, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec .venv/bin/python -m pytest "$@"
