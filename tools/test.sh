#!/usr/bin/env bash
# The test command (README; .ci/run calls exactly this): set up, then run the whole suite.
#
# Step 1: everything but TFLite, in .venv (arguments go to this pytest).
# Step 2: the TFLite (LiteRT) tests in .venv-tflite: litert-torch's stack pins
#         typing-extensions<4.13, which the main venv's pydantic cannot take
#         (tools/setup_tflite.sh). Its set-up (mostly downloads) runs during step 1.
#         SLMEDGE_SKIP_TFLITE=1 leaves this step out.
# Step 3: the wheel (tools/ci_wheel.sh): build it, install it in clean venvs outside the
#         checkout ([export], then the torch-free core) and run export --quant int4 /
#         generate / eval / bench / bundle / verify on the embedded SmolLM2 from a directory
#         with no shared/ above it. SLMEDGE_SKIP_WHEEL=1 leaves it out.
# Property tests run derandomized (Hypothesis profile "ci", tests/conftest.py), as in CI;
# HYPOTHESIS_PROFILE=explore draws new examples.
# The exit code is the first failing step's (pytest's own codes; 1 for the wheel step).
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
tools/setup.sh
# The emulated arm64 target (tests/arm64, issue 18): its root filesystem builds in the
# background (first time ~12 min, cached in /var/cache/slmedge: ~2 s) while the other tests run;
# the arm64 tests run last and wait for it (~4 min). SLMEDGE_SKIP_ARM64=1 skips them.
if [ "${SLMEDGE_SKIP_ARM64:-0}" != 1 ]; then
  mkdir -p .cache
  tools/setup_arm64.sh >.cache/setup_arm64.log 2>&1 &
fi
tflite=0
[ "${SLMEDGE_SKIP_TFLITE:-0}" = 1 ] || tflite=1
if [ "$tflite" = 1 ]; then
  mkdir -p .cache
  tools/setup_tflite.sh >.cache/setup_tflite.log 2>&1 &
  setup_pid=$!
fi
status=0
# Two pytest workers (pytest-xdist), one test file per worker at a time (module fixtures built
# once): much of a test's time is single-threaded Python (tracing, serializing graphs), so on the
# 2-core CI machine two workers are faster than one (tests/cli, 2026-12-07: 618 s in one
# process at load ~4, 210 s in two at load ~2; the whole main step on a quiet machine: 24.9 min
# for 927 tests in one process, 21.5 min for 952 in two, 15.1 min for 985 once the
# session fixtures were shared by the workers: tests/helpers/built_once.py). SLMEDGE_TEST_WORKERS=0 runs in one
# process (a debugger, or output in order).
workers=${SLMEDGE_TEST_WORKERS:-2}
parallel=()
[ "$workers" -le 1 ] 2>/dev/null || parallel=(-n "$workers" --dist loadfile)
.venv/bin/python -m pytest --durations=30 "${parallel[@]}" "$@" || status=$?   # the slowest 30: where CI time goes
if [ "$tflite" = 1 ]; then
  if ! wait "$setup_pid"; then
    tail -n 40 .cache/setup_tflite.log >&2
    echo "tools/test.sh: tools/setup_tflite.sh failed (log: .cache/setup_tflite.log)" >&2
    exit 1
  fi
  tflite_status=0
  .venv-tflite/bin/python -m pytest tests/parity/test_tflite.py tests/parity/test_tflite_cli.py \
    tests/parity/test_tflite_bundle.py \
    || tflite_status=$?
  [ "$status" -ne 0 ] || status=$tflite_status
fi
if [ "${SLMEDGE_SKIP_WHEEL:-0}" != 1 ]; then
  wheel_start=$SECONDS
  wheel_status=0
  tools/ci_wheel.sh || wheel_status=$?
  echo "tools/test.sh: wheel step $([ "$wheel_status" = 0 ] && echo passed || echo FAILED)" \
    "in $((SECONDS - wheel_start)) s (tools/ci_wheel.sh)" >&2
  [ "$status" -ne 0 ] || status=$wheel_status
fi
exit "$status"
