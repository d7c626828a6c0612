"""What a large table's precision costs in quality, on real weights (issues 15/16).

    python tools/bench/bench_large_table.py --fp32 <SmolLM2 fp32 artifact> \\
        [--variants float tied8 tied4] [--tokens 4096] [--json FILE]

A table of at least ``tied_table.TIED_TABLE_MIN_VALUES`` (64M) values is not kept float by
the default int4 (``QuantRecipe.large_table``): Qwen2.5-0.5B's, Llama-3.2-1B/3B's, the 8B's.
No real checkpoint that large is on this machine, so SmolLM2-135M's tied 49152 x 576 table
(28M values) is pushed through the same path with the threshold lowered, and the default
int4 (HQQ body, zero points folded) quantized with it:

- ``float``: the table float, the lm_head int8 (SmolLM2's default, the reference row);
- ``tied8``: the lookup reads the lm_head's int8 table (``large_table_bits=8``);
- ``tied4``: the lm_head int4 RTN with integer zero points, the lookup reading it
  (``large_table_bits=4``: ONNX Runtime GenAI's layout but for the zero points, half the
  table's bytes);
- ``tied4intzero``: ``tied4`` with the head's (and so the table's) int4 blocks chosen by
  ``int_zero.from_hqq`` (HQQ's grid, its zero point rounded down and up, the scale refit)
  instead of RTN: still integer zero points the lookup can read;
- ``split<N>-<rtn|hqq|gptq>`` (any N, e.g. ``split8192-hqq``, ``split0-gptq``): the ``float``
  variant's graph (same int4 body) with its head and lookup rewritten by
  ``tied_split.split_tied_table``: the N most frequent calibration tokens' rows int8 (in
  aligned groups of 64 ids), the rest int4 rounded by RTN, HQQ's grid with integer zero
  points, or GPTQ on the fp32 graph's final hidden states over the packaged calibration
  text; the lookup reads both parts (``-headonly``: the lookup keeps the float table, the
  head's share of the cost). ``--high-block`` sets the int8 rows' block size;
  ``--gguf FILE``: the fp32 artifact is that GGUF's, whose blocks the base keeps (Gemma 3 270M);
- ``wired<N>`` (e.g. ``wired8192``): the quantizer's own split, ``large_table_bits=4`` with
  ``large_table_int8_tokens=N`` (the calibration pass and GPTQ inside the streaming
  quantizer; a GGUF source's 8-bit rows on its 8-bit block, 128);
- ``--table-bytes V K [--rows N ...]``: no cards, the bytes of a V x K tied table + head one
  int4 table and split (Qwen2.5-0.5B's 151936 x 896).

Each is judged by the quality card against the fp32 graph on the held-out text
(``tests/data/heldout_persuasion.txt``) and the packaged evaluation (tuning) text:
perplexity change, mean KL, top-1 agreement. One JSON row per variant (size, seconds,
cards, load average) is appended to ``--json``; the machine is shared: seconds are
inflated by the load recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HELDOUT_TEXT = REPO / "tests" / "data" / "heldout_persuasion.txt"
VARIANTS = {
    "float": dict(large=False, recipe={}),
    "tied8": dict(large=True, recipe={}),
    "tied4": dict(large=True, recipe={"large_table_bits": 4}),
    "tied4intzero": dict(large=True, recipe={"large_table_bits": 4}, int_zero_head=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, help="fp32 artifact (SmolLM2-135M)")
    ap.add_argument("--table-bytes", nargs=2, type=int, metavar=("V", "K"),
                    help="instead of cards: the bytes of a V x K tied table + lm_head (random "
                    "weights) as one int4 table and split with --rows int8 rows")
    ap.add_argument("--rows", nargs="+", type=int, default=[0, 4096, 8192, 16384])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), type=_variant,
                    help=f"{', '.join(VARIANTS)} or split<N>-<rtn|hqq|gptq>")
    ap.add_argument("--high-block", type=int, default=None,
                    help="split variants: block size of the int8 rows (default: 32)")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens of each card")
    ap.add_argument("--texts", nargs="+", choices=("heldout", "tuning"),
                    default=["heldout", "tuning"])
    ap.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "bench" / "large-table")
    ap.add_argument("--json", type=Path, default=None, help="append one row per variant")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="the GGUF the fp32 artifact came from: its blocks are kept as the "
                    "export from it keeps them (Gemma 3 270M's Q4_K_M), and its table is "
                    "large already (the threshold is not lowered)")
    ap.add_argument("--recipe", type=json.loads, default={},
                    help="extra recipe fields for every variant (JSON), e.g. "
                    "'{\"zero_point_storage\": \"int8-a8\"}'")
    ap.add_argument("--size-only", action="store_true",
                    help="no cards: quantize, record size, peak RSS and the split's report")
    ap.add_argument("--force-rows", action="store_true",
                    help="wired<N>: the split's 8-bit rows are token ids 0..N-1 (a random-weight "
                    "checkpoint's toy tokenizer sees fewer than N distinct tokens; sizes do not "
                    "depend on which rows)")
    ap.add_argument("--no-hessian", action="store_true",
                    help="wired<N>: the 4-bit rows RTN, no calibration pass over the fp32 graph "
                    "(the quantize-on-write rounding; same sizes)")
    args = ap.parse_args(argv)
    if args.table_bytes:
        return _table_bytes(*args.table_bytes, args.rows, [args.high_block or 32])
    if args.fp32 is None:
        ap.error("give --fp32 (or --table-bytes V K)")
    args.exact = None
    if args.gguf:
        import torch

        from slmedge.exporter.sources.gguf import open_gguf_streamed

        args.exact = open_gguf_streamed(args.gguf, torch.float32)[3].exact_blocks

    from slmedge.exporter.quantize import tied_table

    threshold = tied_table.TIED_TABLE_MIN_VALUES
    args.workdir.mkdir(parents=True, exist_ok=True)
    cards = _Cards(args)
    try:
        for name in args.variants:
            _run_one(args, name, cards, threshold)
    finally:
        cards.close()
    return 0


def _run_one(args, name: str, cards, threshold: int) -> None:
    from slmedge.exporter.quantize import tied_table
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming

    if name.startswith("split"):
        _run_split(args, name, cards)
        return
    spec = VARIANTS[name]
    out = args.workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tied_table.TIED_TABLE_MIN_VALUES = 1 if spec["large"] and not args.gguf else threshold
    recipe = QuantRecipe(scheme="int4", **spec["recipe"], **args.recipe)
    row = {"name": name, "model": args.fp32.name, "recipe": {**spec["recipe"], **args.recipe},
           "table_forced_large": spec["large"], "tokens": args.tokens,
           "load_start": os.getloadavg()}
    t0 = time.perf_counter()
    undo = _patch_split(args)
    try:
        report = quantize_file_streaming(
            args.fp32 / "model.onnx", out / "model.onnx", recipe, exact=args.exact,
            progress=lambda m: print(f"[bench_large_table] {m}", file=sys.stderr, flush=True))
    finally:
        tied_table.TIED_TABLE_MIN_VALUES = threshold
        undo()
    if spec.get("int_zero_head"):
        row["head_rounding"] = "int_zero.from_hqq"
        _int_zero_head(out / "model.onnx", args.fp32 / "model.onnx")
    row.update(label=recipe.label(), quantize_s=round(time.perf_counter() - t0, 1),
               size_mb=round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6, 2),
               embedding=report.embedding, lm_head=report.lm_head,
               quantize_peak_rss_mb=round(
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    if report.large_table_split:
        row["large_table_split"] = report.large_table_split
        row["forced_rows"] = args.force_rows
    if args.size_only:
        row["load_end"] = os.getloadavg()
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        return
    cards(out, row)


def _patch_split(args):
    """``--force-rows`` / ``--no-hessian`` on the streaming quantizer's split; returns undo."""
    from slmedge.exporter.quantize import head_split, streaming

    saved = head_split.frequent_tokens, streaming._plan_split
    if args.force_rows:
        head_split.frequent_tokens = lambda ids, limit, vocab, group=1: list(range(limit // group
                                                                                   * group))
    if args.no_hessian:
        plan = saved[1]
        streaming._plan_split = lambda model, facts, lazy, recipe, src, tok, say: plan(
            model, facts, lazy, recipe, None, tok, say)

    def undo():
        head_split.frequent_tokens, streaming._plan_split = saved
    return undo


def _variant(name: str) -> str:
    wired = re.fullmatch(r"wired(\d+)", name)
    if wired:  # the quantizer's own split (QuantRecipe.large_table_int8_tokens)
        VARIANTS[name] = dict(large=True, recipe={"large_table_bits": 4,
                                                  "large_table_int8_tokens": int(wired[1])})
        return name
    if name in VARIANTS or re.fullmatch(r"split\d+-(rtn|hqq|gptq)(-headonly)?", name):
        return name
    raise argparse.ArgumentTypeError(f"{name!r}: one of {', '.join(VARIANTS)} or "
                                     "split<N>-<rtn|hqq|gptq>")


class _Cards:
    """The quality cards of each variant on ``args.texts`` against the fp32 graph's logits,
    recorded once per text (quality.record_reference, as bench_gguf_int4.py does): the
    reference runs once per process, not once per card."""

    def __init__(self, args):
        import tempfile

        self.args = args
        self.recorded = {}
        self.scratch = Path(tempfile.mkdtemp(prefix=".bench-large-table-ref-",
                                             dir=args.workdir))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __call__(self, out: Path, row: dict) -> None:
        """Card ``out``, then the row printed and appended to ``--json``."""
        from bench_gguf_int4 import card_figures  # a sibling script (tools/bench is sys.path[0])
        from slmedge.exporter.quality.card import (QualitySettings, decoder_card,
                                                   finish_greedy, record_reference)
        from slmedge.exporter.quality.memory import release_memory, verification_session_options
        from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

        args = self.args
        texts = {"heldout": HELDOUT_TEXT, "tuning": None}  # None: the packaged evaluation text
        for tag in args.texts:
            settings = QualitySettings(eval_text=texts[tag], eval_tokens=args.tokens, prompts=())
            t1 = time.perf_counter()
            if tag not in self.recorded:
                reference = OnnxDecoder(args.fp32 / "model.onnx", threads=2,
                                        session_options=verification_session_options())
                self.recorded[tag] = record_reference(reference, args.fp32, settings,
                                                      self.scratch / f"{tag}.logits")
                del reference
                release_memory()
            ref = self.recorded[tag]
            ref._replay = 0  # the recording replays from its first call for each variant
            candidate = OnnxDecoder(out / "model.onnx", threads=2,
                                    session_options=verification_session_options())
            card = decoder_card(candidate, args.fp32, settings, reference=ref, score_greedy=False)
            del candidate
            release_memory()
            finish_greedy(card)
            row[tag] = {**card_figures(card), "seconds": round(time.perf_counter() - t1)}
        row["load_end"] = os.getloadavg()
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


def _run_split(args, name: str, cards) -> None:
    """One ``split<N>-<method>`` variant: the ``float`` variant's graph (quantized once,
    reused), its head and lookup rewritten by ``tied_split.split_tied_table``, cards."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from slmedge.exporter.quantize import tied_split
    from slmedge.exporter.quantize.head_split import frequent_tokens, group_size
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.exporter.quantize.streaming import quantize_file_streaming

    rows, method, head_only = re.fullmatch(r"split(\d+)-(rtn|hqq|gptq)(-headonly)?",
                                           name).groups()
    rows = int(rows)
    base = args.workdir / "float-base"
    recipe = QuantRecipe(scheme="int4")
    if not (base / "model.onnx").is_file():
        base.mkdir(parents=True, exist_ok=True)
        quantize_file_streaming(args.fp32 / "model.onnx", base / "model.onnx",
                                QuantRecipe(scheme="int4", large_table=False), exact=args.exact)
    row = {"name": name, "model": args.fp32.name, "base": "float (int4 body, table float)",
           "int8_rows": rows, "int4_rounding": method, "tokens": args.tokens,
           "high_block": args.high_block or recipe.block_size, "load_start": os.getloadavg()}
    t0 = time.perf_counter()
    model = onnx.load(str(base / "model.onnx"))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    look = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                and len(inits[n.input[0]].dims) == 2)
    vocab, k = inits[look.input[0]].dims
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and any(
        a.name == "N" and a.i == vocab for a in n.attribute))
    w = numpy_helper.to_array(inits[look.input[0]]).T.astype(np.float32)
    frequent = []
    if rows:
        from slmedge.exporter.quantize.core import _tokens_for_calibration

        ids = _tokens_for_calibration(args.fp32, recipe.calibration, None)
        frequent = frequent_tokens(ids, rows, vocab, group_size(vocab, rows))
    hi = np.zeros(vocab, bool)
    hi[frequent] = True
    hessian = _head_hessian(args, head.input[0], k) if method == "gptq" else None
    rest = tied_split.quantize_rows(w[:, ~hi], 4, recipe.block_size, method, hessian)
    counts = tied_split.split_tied_table(model, head.name, look.name, w, frequent, rest,
                                         recipe.block_size, args.high_block,
                                         lookup=not head_only)
    out = args.workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data")
    del model, graph, inits, look, head, w, rest, hessian  # the table's copies (Gemma: GBs) before the cards
    row.update(counts, build_s=round(time.perf_counter() - t0, 1),
               size_mb=round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6, 2))
    cards(out, row)


def _table_bytes(vocab: int, k: int, rows: list[int], high_blocks: list[int]) -> int:
    """Initializer bytes of a ``vocab x k`` tied table + lm_head after ``split_tied_table``
    (RTN rest, block 32; random weights: the sizes do not depend on the values), per number
    of int8 rows: printed as JSON."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from slmedge.exporter.quantize import tied_split

    w = (np.random.default_rng(0).standard_normal((k, vocab)) * 0.02).astype(np.float32)
    sizes = {}
    for n in rows:
        for high in high_blocks:
            model = helper.make_model(helper.make_graph(
                [helper.make_node("Gather", ["table", "ids"], ["x"], name="embed", axis=0),
                 helper.make_node("MatMul", ["x", "w"], ["logits"], name="lm_head")], "table",
                [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                [numpy_helper.from_array(np.zeros((vocab, k), np.float32), "table"),
                 numpy_helper.from_array(np.zeros((1, 1), np.float32), "w")]))
            rest = tied_split.quantize_rows(w[:, n:], 4, 32, "rtn")
            tied_split.split_tied_table(model, "lm_head", "embed", w, list(range(n)), rest, 32,
                                        high)
            sizes[f"{n}@{high}"] = sum(numpy_helper.to_array(t).nbytes
                                       for t in model.graph.initializer)
    print(json.dumps({"vocab": vocab, "k": k, "bytes": sizes}), flush=True)
    return 0


def _head_hessian(args, activation: str, k: int):
    """``E[x^T x]`` of the lm_head's input on the fp32 graph over the packaged calibration
    text (gptq.collect_hessians, KVCacheCalibrationReader's samples), cached in the workdir."""
    import numpy as np

    cache = args.workdir / "head_hessian.npy"
    if cache.is_file():
        return np.load(cache)
    from slmedge.exporter.quantize.calibration import KVCacheCalibrationReader
    from slmedge.exporter.quantize.core import _tokens_for_calibration
    from slmedge.exporter.quantize.gptq import collect_hessians
    from slmedge.exporter.quantize.recipe import CalibrationConfig

    config = CalibrationConfig()
    ids = _tokens_for_calibration(args.fp32, config, None)
    reader = KVCacheCalibrationReader(args.fp32 / "model.onnx", ids, config, threads=2)
    h = collect_hessians(args.fp32 / "model.onnx", {activation: k}, reader.samples)[activation]
    np.save(cache, h)
    return h


def _int_zero_head(path: Path, fp32: Path) -> None:
    """Re-round the int4 lm_head of ``path`` (the MatMulNBits whose ``N`` is the vocabulary:
    the lookup reads the same initializers) with ``int_zero.from_hqq`` on the fp32 graph's
    weight, and save it in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from slmedge.exporter.quantize.int_zero import rewrite_int_zero

    model = onnx.load(str(path))
    head = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    vocab_k = None
    for n in model.graph.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "MatMulNBits" and n.input[1] in {i for r in model.graph.node
                                                          if r.op_type == "Reshape"
                                                          and r.output[0] in head.input
                                                          for i in r.input}:
            head, vocab_k = n, (a["N"], a["K"])
    if vocab_k is None:
        raise SystemExit(f"{path}: no int4 lm_head shared with the lookup")
    vocab, k = vocab_k
    ref = onnx.load(str(fp32))
    table = next(numpy_helper.to_array(t) for t in ref.graph.initializer
                 if int(np.prod(t.dims)) == vocab * k)
    # the fp32 graph keeps the tied table once, [1, K, V] (passes.tied_head) or [V, K]
    w = table.reshape(k, vocab) if table.shape[-1] == vocab else table.reshape(vocab, k).T
    rewrite_int_zero(model, lambda n: np.ascontiguousarray(w, np.float32) if n is head else None)
    data = path.with_name(path.name + ".data")
    data.unlink()  # onnx appends to an existing data file; everything is in memory now
    onnx.save_model(model, str(path), save_as_external_data=True, location=data.name)


if __name__ == "__main__":
    sys.exit(main())
