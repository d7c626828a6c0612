#!/usr/bin/env bash
# The main job's app variant (tools/demo.sh --bundles runs this): the embedded SmolLM2-135M
# exported for each phone profile, benched here, bundled, and the bundle verified.
#
#   tools/demo_bundles.sh [PROFILE...]     default: android-qnn-htp android-cpu ios-coreml
#
# Per profile P, under $OUT (default artifacts/bundles):
#   P-export/   slmedge export --profile P (the profile's recipe, shapes and formats)
#   P/          slmedge bundle P-export --profile P   (+ P.zip)
# The bench is a short one on this machine's CPU (the accelerator is on the phone): its
# result lands in P-export/bench.json, which the bundle manifest carries as "last_bench".
# REUSE=1 keeps an export whose manifest exists (bench, bundle and verify run again).
# DEVICE_CARD=full|short|off (default off) is the QNN export's --device-card: how much of its
# quality card runs on the QNN HTP emulator. off: the CPU card of the QDQ graphs gates; on x86
# the emulator runs a 64-token chunk in minutes and the full card took > 50 min here
# (tools/bench/bench_qnn.py is where the emulator is measured). The placement check still opens the
# graphs on the emulator.
# Timings of each step go to $OUT/timings.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
OUT=${OUT:-artifacts/bundles}
SLM=(nice -n 10 .venv/bin/slmedge)
DEVICE_CARD=${DEVICE_CARD:-off}
profiles=("$@")
[ ${#profiles[@]} -gt 0 ] || profiles=(android-qnn-htp android-cpu ios-coreml)
mkdir -p "$OUT"
timings="$OUT/timings.tsv"
[ -f "$timings" ] || printf 'date\tprofile\tstep\tseconds\n' >"$timings"

step() {  # step PROFILE NAME CMD...: run, and log the wall time
  local profile=$1 name=$2 t0 t1
  shift 2
  echo "== $profile: $name" >&2
  t0=$(date +%s)
  "$@"
  t1=$(date +%s)
  printf '%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$profile" "$name" "$((t1 - t0))" >>"$timings"
}

for p in "${profiles[@]}"; do
  art="$OUT/$p-export"
  card=()
  case "$p" in android-qnn-htp*) card=(--device-card "$DEVICE_CARD") ;; esac
  if [ "${REUSE:-0}" = 1 ] && [ -f "$art/manifest.json" ]; then
    echo "== $p: export kept ($art, REUSE=1)" >&2
  else
    step "$p" export "${SLM[@]}" export --model embedded:smollm2-135m-instruct \
      --profile "$p" --output "$art" --overwrite ${card[@]+"${card[@]}"}
  fi
  # Short: 64-token prompt, 32 new tokens, one prompt/depth bucket, 2 rounds.
  step "$p" bench "${SLM[@]}" bench "$art" --prompt-tokens 64 --new-tokens 32 \
    --prompt-buckets 64 --depths 64 --warmup 1 --repeats 2 --threads 2
  step "$p" bundle "${SLM[@]}" bundle "$art" --profile "$p" -o "$OUT/$p" --zip --overwrite
  step "$p" verify "${SLM[@]}" verify "$OUT/$p" --runtime-version 1.22
done
.venv/bin/python tools/bundle_sizes.py "${profiles[@]/#/$OUT/}"
