#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, no hub access needed):
# export -> generate -> bench. Artifacts land in artifacts/.
#   tools/demo.sh --bundles [PROFILE...]   the app variant: export per phone profile, bench,
#                                          bundle, verify (tools/demo_bundles.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --bundles ]; then
  shift
  exec tools/demo_bundles.sh "$@"
fi
tools/setup.sh
OUT=${OUT:-artifacts/smollm2-135m-fp32}
.venv/bin/slmedge export --model embedded:smollm2-135m-instruct --output "$OUT" --overwrite
.venv/bin/slmedge generate "$OUT" --chat --prompt "What is the capital of France?" --max-new-tokens 64
.venv/bin/slmedge bench "$OUT" --prompt-tokens 128 --new-tokens 128 --threads 2
