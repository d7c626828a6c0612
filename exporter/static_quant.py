"""Static QDQ (a16w8 for QNN HTP, or int8-static) of the static-shape graphs.

The quantizer is issue 3's (``quantize.static.quantize_static_qdq`` on top of
``onnxruntime.quantization``); what is new here is the calibration data of the static
contract: real text run through the float prefill / decode graphs by the runtime's own
:class:`~slmedge.runtimes.static_decoder.StaticDecoder`, whose feeds (full fixed-size cache,
bias, positions) are recorded as samples. The attention-bias path (the -3.4e38 bias Add and
the Softmax) and the profile's ``float_ops`` stay float: DESIGN.md measured int8 RMSNorm and
Softmax diverging on HTP (cosine 0.52).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from slmedge.runtimes.static_decoder import StaticDecoder

from .static_shapes import DECODE_FILE, PREFILL_FILE, WEIGHTS_FILE, share_weights


class FeedReader(CalibrationDataReader):
    """Recorded feeds, one per ``get_next``."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self._i = 0

    def get_next(self) -> dict | None:
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self.feeds)


def record_feeds(root: Path, static: dict, token_ids: list[int], *, prefill_samples: int = 4,
                 decode_samples: int = 8, seed: int = 0) -> dict[str, list[dict]]:
    """Run the float graphs over ``token_ids`` and keep copies of what each graph was fed."""
    decoder = StaticDecoder(root, static)
    feeds: dict[str, list[dict]] = defaultdict(list)
    for kind, session in decoder.sessions.items():
        def recorder(names, feed, _run=session.run, _kind=kind):
            feeds[_kind].append({k: np.array(v, copy=True) for k, v in feed.items()})
            return _run(names, feed)

        session.run = recorder  # instance attribute: only this decoder's sessions record
    rng = np.random.default_rng(seed)
    context, chunk = decoder.context, decoder.chunk
    span = min(context - 1, 3 * chunk)
    per_passage = max(1, decode_samples // max(1, prefill_samples))
    for _ in range(prefill_samples):
        start = int(rng.integers(0, max(1, len(token_ids) - span - per_passage)))
        passage = token_ids[start:start + span + per_passage]
        decoder.reset()
        decoder.step(passage[:span])
        for t in passage[span:span + per_passage]:
            decoder.step([t])
    return {"prefill": feeds["prefill"], "decode": feeds["decode"]}


def _bias_path(graph: onnx.GraphProto) -> set[str]:
    """Nodes from the attention-bias inputs up to (and including) the Softmax."""
    consumers = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    frontier = [i.name for i in graph.input if i.name.startswith("attention_bias")]
    seen: set[str] = set()
    tensors: set[str] = set()
    while frontier:
        t = frontier.pop()
        if t in tensors:
            continue
        tensors.add(t)
        for node in consumers.get(t, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type not in ("Softmax", "MatMul"):
                frontier.extend(o for o in node.output if o)
    return seen


def quantize_static_graphs(root: Path, static: dict, recipe, token_ids: list[int], *,
                           float_ops: list[str], say=lambda _m: None) -> dict:
    """Replace ``prefill.onnx`` / ``decode.onnx`` in ``root`` by their QDQ forms (weights shared
    again); returns the decision tables for the manifest."""
    from .quantize.graph import analyze
    from .quantize.static import quantize_static_qdq

    cal = recipe.calibration
    say(f"recording calibration feeds of the static graphs ({cal.prefill_samples} passages)")
    feeds = record_feeds(root, static, token_ids, prefill_samples=min(cal.prefill_samples, 4),
                         decode_samples=min(cal.decode_samples, 8), seed=cal.seed)
    work = root / ".qdq-work"
    work.mkdir(exist_ok=True)
    tables, protos = {}, {}
    try:
        for kind, file in (("prefill", PREFILL_FILE), ("decode", DECODE_FILE)):
            model = onnx.load(str(root / file), load_external_data=False)
            facts = analyze(model)
            keep = _bias_path(model.graph)
            kept_by_profile = {n.name for n in model.graph.node if n.op_type in float_ops}
            # plan_static keeps "mask path" nodes float; the bias path and the profile's
            # float_ops are exactly that here.
            facts.mask_path = set(facts.mask_path) | keep | kept_by_profile
            del model
            dst = work / file
            tables[kind] = quantize_static_qdq(root / file, dst, facts, recipe,
                                               FeedReader(feeds[kind]), say=say)
            protos[file] = onnx.load(str(dst))
        for stale in (PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE):
            (root / stale).unlink()
        written, saved = share_weights(protos, root)
    finally:
        for p in sorted(work.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        work.rmdir()
    return {"scheme": recipe.scheme.value, "label": recipe.label(),
            "float_ops": float_ops, "tables": tables,
            "weights_bytes": written, "weights_bytes_saved_by_sharing": saved,
            "calibration_samples": {k: len(v) for k, v in feeds.items()}}


def static_quality(reference: StaticDecoder, candidate: StaticDecoder, token_ids: list[int], *,
                   prompts: int = 3, prompt_tokens: int = 16, new_tokens: int = 16,
                   window: int | None = None) -> dict:
    """Quality card of ``candidate`` against ``reference`` (the float static graphs):
    perplexity of both on ``token_ids`` (one window), greedy agreement and first divergence
    on a few prompts, mean cosine of the logits."""
    from slmedge.runtimes.generation import generate

    window = min(window or reference.context, reference.context, len(token_ids))
    ids = token_ids[:window]

    def ppl(dec):
        logits = dec.logits(ids).astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return float(np.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))), logits

    ppl_ref, l_ref = ppl(reference)
    ppl_cand, l_cand = ppl(candidate)
    cosine = (l_ref * l_cand).sum(-1) / np.linalg.norm(l_ref, axis=-1) / np.linalg.norm(l_cand, axis=-1)
    agree, first = [], []
    step = max(1, (len(token_ids) - prompt_tokens) // max(1, prompts))
    for p in range(prompts):
        prompt = token_ids[p * step:p * step + prompt_tokens]
        a = generate(reference, prompt, new_tokens).tokens
        b = generate(candidate, prompt, new_tokens).tokens
        same = [x == y for x, y in zip(a, b, strict=False)]
        agree.append(sum(same) / len(same))
        first.append(same.index(False) if False in same else len(same))
    return {"tokens": len(ids), "perplexity_reference": round(ppl_ref, 4),
            "perplexity": round(ppl_cand, 4),
            "ppl_increase_pct": round(100 * (ppl_cand / ppl_ref - 1), 3),
            "cosine_mean": round(float(cosine.mean()), 6), "cosine_min": round(float(cosine.min()), 6),
            "greedy_agreement": round(float(np.mean(agree)), 4), "first_divergence": first,
            "prompts": prompts, "new_tokens": new_tokens}
