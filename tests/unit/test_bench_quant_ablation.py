"""tools/bench/bench_quant.py's ablation of the default ``--quant int4`` (issue 16): each row
changes one ingredient of the default, and speed is reported against a baseline row of the
same run (--baseline)."""

import json
from pathlib import Path

from slmedge.tools.bench import bench_quant

#: the rows of the README's "int4 ablation" table besides the default ("int4-head8")
ABLATION = ("int4-rtn-asym", "int4-rtn-sym", "int4-gptq-act", "int4-hqq-intzero", "int4-b64",
            "int4-b128", "int4-acc1", "int4-head-float", "int4-head4", "int4-head-split",
            "int4-emb8", "int4-emb4")


def _options(flags: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``--flag value...`` -> {flag: values}, the open gate's bounds left out."""
    gate = {bench_quant.OPEN_GATE[i] for i in range(0, len(bench_quant.OPEN_GATE), 2)}
    out: dict[str, list[str]] = {}
    key = None
    for tok in flags:
        if tok.startswith("--"):
            key = tok
            out[key] = []
        else:
            out[key].append(tok)
    return {k: tuple(v) for k, v in out.items() if k not in gate}


def test_each_ablation_row_changes_one_ingredient_of_the_default():
    default = _options(bench_quant.VARIANTS["int4-head8"][0])
    assert default == {"--quant": ("int4",)}  # the quantizer's own defaults, no flag
    for name in ABLATION:
        flags, precision = bench_quant.VARIANTS[name]
        opts = _options(flags)
        assert precision == "int4" and opts["--quant"] == ("int4",), name
        changed = {k for k in opts if k != "--quant"}
        # one ingredient: one flag (the split head is --lm-head int4 with its int8 rows)
        assert len(changed) == 1 or changed == {"--lm-head", "--lm-head-int8-tokens"}, name
        assert all(bench_quant.OPEN_GATE[i] in flags for i in (0, 2, 4)), name  # measured
    # the integer-zero HQQ row is written from the asymmetric RTN row's artifact
    assert bench_quant.REWRITTEN["int4-hqq-intzero"] == "int4-rtn-asym"
    assert (bench_quant.VARIANTS["int4-hqq-intzero"][0]
            == bench_quant.VARIANTS["int4-rtn-asym"][0])


def test_speed_ratios_against_the_baseline_row_of_the_same_run(tiny_artifact, tmp_path):
    fp32 = tiny_artifact("llama")
    out = tmp_path / "rows.json"
    assert bench_quant.main(["--fp32", str(fp32), "--variants", "int4-head8", "int4-b64",
                             "--rounds", "1", "--repeats", "1", "--prompt-tokens", "8",
                             "--new-tokens", "4", "--skip-quality", "--no-genai", "--open-gate",
                             "--workdir", str(tmp_path), "--baseline", "int4-head8",
                             "--eval-tokens", "64", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    # the quantizer's own card scored the run's --eval-tokens (as the held-out card would)
    command = json.loads((tmp_path / "slmedge-q-int4-b64" / "manifest.json").read_text())["command"]
    assert "--eval-tokens 64" in command
    base, b64 = rows["int4-head8"], rows["int4-b64"]
    assert base["decode_vs_baseline"] == 1.0 and base["ttft_vs_baseline"] == 1.0
    assert b64["baseline"] == "int4-head8"
    assert b64["decode_vs_baseline"] == round(b64["decode_tok_s"] / base["decode_tok_s"], 3)
    assert b64["ttft_vs_baseline"] == round(b64["ttft_ms"] / base["ttft_ms"], 3)
    assert len(b64["load_average_rounds"]) == 1  # the load of each round is recorded
    # the two rows are different graphs: block 64 has half the scales of block 32
    def nbytes(row):
        return sum(p.stat().st_size for p in Path(row["path"]).glob("model.onnx*"))

    assert nbytes(b64) < nbytes(base)
    # without --baseline no ratio is made up
    out2 = tmp_path / "rows2.json"
    assert bench_quant.main(["--fp32", str(fp32), "--variants", "int4-head8", "--rounds", "1",
                             "--repeats", "1", "--prompt-tokens", "8", "--new-tokens", "4",
                             "--skip-quality", "--no-genai", "--open-gate", "--eval-tokens",
                             "64", "--workdir", str(tmp_path), "--json", str(out2)]) == 0
    (row,) = json.loads(out2.read_text())
    assert "decode_vs_baseline" not in row and "decode_tok_s" in row
