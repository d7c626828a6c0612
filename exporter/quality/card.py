"""The quality card: how much of the model survived an export or a quantization.

Inputs are two decoders with the runtime's ``reset()`` / ``step(ids, all_logits)``
protocol (``slmedge.runtimes.generation.Decoder``): a *reference* (the fp32 graph) and a
*candidate* (the artifact under test, ONNX or LiteRT alike), plus token ids. The card:

* perplexity of both on an evaluation text (windows 512 / stride 256, as ``slmedge
  eval``) and the relative increase;
* mean KL divergence KL(reference || candidate) of the next-token distributions and
  top-1 agreement, over every scored position of the evaluation text;
* greedy decoding on a set of prompts: the reference generates; the candidate is fed
  the reference's tokens one decode step at a time (its KV-cache path, as in use) and
  must predict each one. Top-1 agreement is the fraction it predicts; the first
  divergence is the first position it misses (where free-running greedy decoding of
  the candidate would leave the reference's text). A reference streamed from the source
  (streamed_reference.py: too large for an fp32 session) cannot decode step by step: the
  candidate generates and the reference scores its text teacher-forced
  (``greedy.generated_by: "candidate"``); the first divergence is the same position. An fp32
  graph from :data:`GRAPH_TEACHER_FORCED_FROM` bytes does the same (its 6 x 64 decode steps
  were the longest part of a 0.5B-1B int4 export): its session is opened again after the
  candidate's, and scores each prompt's candidate text in one prefill.

With no reference (an fp32 export, whose reference is itself) the card holds the
perplexity only. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.evaluate import plan_windows, token_nll
from slmedge.runtimes.generation import Decoder
from slmedge.runtimes.check.target_card import (
    REPLAY_NEW_TOKENS,
    REPLAY_PROMPT,
    REPLAY_WINDOW,
    run_spec,
    window_perplexity,
)
from slmedge.runtimes.texts import default_eval_text

from slmedge.exporter.quality.memory import release_memory, verification_session_options

#: Evaluation text shipped in the package (runtimes/data); calibration uses a different book.
DEFAULT_EVAL_TEXT = default_eval_text()
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "def fibonacci(n):",
    "The three primary colours are",
    "Question: What is the largest planet in the solar system?\nAnswer:",
)
Progress = Callable[[str], None]
#: An fp32 graph reference of this many bytes (file + external data) or more scores the
#: candidate's greedy text teacher-forced instead of decoding its own greedy tokens step by
#: step. Measured before (load 10-18): the fp32 graph's 6 prompts x 64 decode steps took 183 s
#: of a Qwen2.5-0.5B int4 export's 520 s (1976 MB graph) and 554 s of Llama-3.2-1B's 1064 s.
#: SmolLM2-135M (541 MB) and the tiny test models stay below: their cards decode step by step.
GRAPH_TEACHER_FORCED_FROM = 1 << 30


@dataclass(frozen=True)
class QualitySettings:
    """How much text and how many prompts the card uses."""

    eval_text: Path | None = None  # None: DEFAULT_EVAL_TEXT
    eval_tokens: int = 4096
    window: int = 512
    stride: int = 256
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    new_tokens: int = 64

    def text_path(self) -> Path | None:
        path = Path(self.eval_text) if self.eval_text else DEFAULT_EVAL_TEXT
        if path.is_file():
            return path
        if self.eval_text:
            raise UsageError(f"evaluation text '{self.eval_text}' not found; pass an existing UTF-8 file")
        return None


@dataclass
class QualityCard:
    """The figures; ``to_dict()`` is what the manifest stores under ``quality``."""

    perplexity: float
    eval: dict
    reference_perplexity: float | None = None
    ppl_increase_pct: float | None = None
    kl_mean: float | None = None
    kl_max_position: float | None = None
    top1_agreement_eval: float | None = None
    cosine_mean: float | None = None  # cosine of the reference's and the candidate's logit rows
    cosine_min: float | None = None
    greedy: dict | None = None
    reference: str = "self"
    seconds: float = 0.0
    replay: dict | None = None  # what a target replays (runtimes/check/target_card.py), this machine's result
    notes: list[str] = field(default_factory=list)
    #: not a field (not in to_dict): greedy text waiting for :func:`finish_greedy`
    pending_greedy = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def summary(self) -> str:
        s = f"perplexity {self.perplexity:.3f}"
        if self.reference_perplexity is not None:
            s += (f" (reference {self.reference_perplexity:.3f}, {self.ppl_increase_pct:+.2f}%), "
                  f"KL {self.kl_mean:.4f}, top-1 {self.top1_agreement_eval:.1%}")
        if self.greedy:
            s += (f", greedy agreement {self.greedy['top1_agreement']:.1%}, first divergence "
                  f"{self.greedy['first_divergence']}")
        return s


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_rows(ref_logits: np.ndarray, cand_logits: np.ndarray, chunk: int = 64) -> np.ndarray:
    """KL(softmax(ref) || softmax(cand)) per row, in float64, ``chunk`` rows at a time."""
    out = np.empty(len(ref_logits), dtype=np.float64)
    for i in range(0, len(ref_logits), chunk):
        lp = _log_softmax(ref_logits[i : i + chunk])
        lq = _log_softmax(cand_logits[i : i + chunk])
        out[i : i + chunk] = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.maximum(out, 0.0)


def cosine_rows(ref_logits: np.ndarray, cand_logits: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Cosine of each row of ``ref_logits`` with the same row of ``cand_logits`` (float64,
    ``chunk`` rows at a time, as :func:`kl_rows`)."""
    out = np.empty(len(ref_logits), dtype=np.float64)
    for i in range(0, len(ref_logits), chunk):
        r = ref_logits[i : i + chunk].astype(np.float64)
        c = cand_logits[i : i + chunk].astype(np.float64)
        norms = np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1)
        # a zero row has no direction: equal to another zero row, unlike anything else
        same = np.all(r == c, axis=-1)
        out[i : i + chunk] = np.where(norms > 0, (r * c).sum(-1) / np.where(norms > 0, norms, 1.0),
                                      np.where(same, 1.0, 0.0))
    return out


def _all_logits(decoder: Decoder, ids: Sequence[int]) -> np.ndarray:
    decoder.reset()
    try:
        return np.asarray(decoder.step(list(ids), all_logits=True), dtype=np.float32)
    finally:
        decoder.reset()


def _step_progress(say: Progress, what: str, total: int):
    """``report(k)`` says ``what k+1/total`` before step ``k`` with an ETA from the steps done
    (the card's windows; its greedy prompts: at 0.5B a prompt's 64 decode steps took seconds
    each on the fp32 reference, the longest part of the card)."""
    t0 = time.perf_counter()

    def report(k: int) -> None:
        eta = (time.perf_counter() - t0) / k * (total - k) if k else None
        say(f"{what} {k + 1}/{total}" + (f", ETA {eta:.0f} s" if eta else ""))

    return report


def _decode_rows(decoder: Decoder, prompts: Sequence[Sequence[int]], new_tokens: int,
                 forced: Sequence[Sequence[int]] | None = None, progress: Progress | None = None,
                 what: str = "quality: greedy prompt") -> tuple[list[list[int]], list[np.ndarray]]:
    """Each prompt's ``new_tokens`` tokens (greedy, or ``forced[b]``: fed whatever the logits
    say) and the logits before each (``[new_tokens, vocab]`` float32). All prompts as one
    batch where the decoder batches rows of different lengths (``OnnxDecoder.decode_batch``:
    the same tokens, the same logits up to fp32 rounding, each decode step's weights read once
    for all prompts; SmolLM2 int4, 6 prompts x 64 steps: 6.4 vs 25.3 s), else one prompt at a
    time."""
    say = progress or (lambda _m: None)
    if getattr(decoder, "batches_rows", False):
        say(f"{what.replace('prompt', 'prompts', 1)}: {len(prompts)} as one batch, "
            f"{new_tokens} steps")
        decoder.reset()
        try:
            return decoder.decode_batch([list(p) for p in prompts], new_tokens, forced=forced)
        finally:
            decoder.reset()
    report = _step_progress(say, what, len(prompts))
    tokens: list[list[int]] = []
    rows: list[np.ndarray] = []
    for k, prompt in enumerate(prompts):
        report(k)
        decoder.reset()
        logits = np.asarray(decoder.step(list(prompt)), dtype=np.float32)
        got, kept = [], np.empty((new_tokens, logits.shape[-1]), dtype=np.float32)
        for pos in range(new_tokens):
            kept[pos] = logits
            got.append(int(forced[k][pos]) if forced is not None else int(np.argmax(logits)))
            if pos + 1 < new_tokens:
                logits = np.asarray(decoder.step([got[-1]]), dtype=np.float32)
        tokens.append(got)
        rows.append(kept)
    decoder.reset()
    return tokens, rows


def _greedy(candidate: Decoder, reference: Decoder, prompts: Sequence[Sequence[int]],
            new_tokens: int, progress: Progress | None = None) -> dict:
    """The reference decodes its greedy tokens; the candidate is fed them (teacher-forced, on
    its KV-cache path) and must predict each one."""
    ref_tokens, ref_rows = _decode_rows(reference, prompts, new_tokens, progress=progress,
                                        what="quality: greedy prompt (reference)")
    _, cand_rows = _decode_rows(candidate, prompts, new_tokens, forced=ref_tokens,
                                progress=progress, what="quality: greedy prompt (candidate)")
    agree = total = 0
    firsts: list[int] = []
    kls: list[float] = []
    for tokens, ref, cand in zip(ref_tokens, ref_rows, cand_rows):
        hits = cand.argmax(-1) == np.asarray(tokens)
        agree += int(hits.sum())
        total += len(tokens)
        firsts.append(int(np.argmin(hits)) if not hits.all() else new_tokens)
        kls.extend(kl_rows(ref, cand).tolist())
    return _greedy_summary(len(prompts), new_tokens, agree, total, firsts, kls)


def _greedy_summary(prompts: int, new_tokens: int, agree: int, total: int, firsts: list[int],
                    kls: list[float]) -> dict:
    """The card's ``greedy`` section from the per-position tallies (either direction)."""
    return {
        "prompts": prompts,
        "new_tokens": new_tokens,
        "top1_agreement": agree / total if total else 1.0,
        "first_divergence": firsts,
        "first_divergence_min": min(firsts) if firsts else new_tokens,
        "prompts_identical": sum(f == new_tokens for f in firsts),
        "kl_mean": float(np.mean(kls)) if kls else 0.0,
    }


def _generate_greedy(candidate: Decoder, prompts: Sequence[Sequence[int]], new_tokens: int,
                     progress: Progress | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """:func:`_greedy` the other way round, for a reference that cannot decode step by step
    (streamed_reference.py): the candidate generates greedily (its KV-cache path, as in use),
    and the reference scores each generated sequence teacher-forced, all in one pass
    (:func:`_score_generated`). Top-1 agreement is the share of positions where the
    reference's top token is the candidate's; the first divergence is the same position either
    way (the prefixes are equal up to it). Returns the candidate's greedy tokens and its logits
    at each of them."""
    return _decode_rows(candidate, prompts, new_tokens, progress=progress,
                        what="quality: greedy prompt (candidate)")


def _score_generated(scorer, prompts: Sequence[Sequence[int]], generated: list[list[int]],
                     rows: list[np.ndarray], new_tokens: int) -> dict:
    """The reference's teacher-forced pass over the candidate's greedy text (:func:`_generate_greedy`)."""
    # the reference predicts generated token j from the prompt and the tokens before it
    ref_rows = scorer.score([list(p) + t[:-1] for p, t in zip(prompts, generated)], new_tokens)
    agree = total = 0
    firsts: list[int] = []
    kls: list[float] = []
    for tokens, cand, ref in zip(generated, rows, ref_rows):
        hits = ref.argmax(-1) == np.asarray(tokens)
        agree += int(hits.sum())
        total += len(tokens)
        firsts.append(int(np.argmin(hits)) if not hits.all() else new_tokens)
        kls.extend(kl_rows(ref, cand).tolist())
    return {**_greedy_summary(len(prompts), new_tokens, agree, total, firsts, kls),
            "generated_by": "candidate"}


def quality_card(
    candidate: Decoder,
    eval_ids: Sequence[int],
    *,
    reference: Decoder | None = None,
    prompt_ids: Sequence[Sequence[int]] = (),
    window: int = 512,
    stride: int = 256,
    new_tokens: int = 64,
    eval_info: dict | None = None,
    progress: Progress | None = None,
    defer_scoring: bool = False,
) -> QualityCard:
    """Compute the card of ``candidate`` (against ``reference`` when given). With
    ``defer_scoring`` and a reference that scores teacher-forced (streamed), the candidate's
    greedy text is kept in ``card.pending_greedy`` for :func:`finish_greedy`, to be scored once
    the candidate's session is closed (the two side by side were a 3B int4 export's peak)."""
    say = progress or (lambda _m: None)
    ids = np.asarray(eval_ids, dtype=np.int64)
    if len(ids) < 2:
        raise UsageError(f"the evaluation text has {len(ids)} tokens; need at least 2")
    t0 = time.perf_counter()
    plans = plan_windows(len(ids), window, stride)
    nll_c = nll_r = 0.0
    count = agree = 0
    kl_sum, kl_max = 0.0, 0.0
    cos_sum, cos_min = 0.0, 1.0
    report = _step_progress(say, "quality: window", len(plans))  # the last may be shorter
    for k, w in enumerate(plans):
        report(k)
        lo, hi = w.score_from - 1 - w.begin, w.end - 1 - w.begin
        targets = ids[w.score_from : w.end]
        rows_c = _all_logits(candidate, ids[w.begin : w.end].tolist())[lo:hi]
        nll_c += float(token_nll(rows_c, targets).sum())
        count += len(targets)
        if reference is not None:
            rows_r = _all_logits(reference, ids[w.begin : w.end].tolist())[lo:hi]
            nll_r += float(token_nll(rows_r, targets).sum())
            kl = kl_rows(rows_r, rows_c)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            agree += int((rows_r.argmax(-1) == rows_c.argmax(-1)).sum())
            cos = cosine_rows(rows_r, rows_c)
            cos_sum += float(cos.sum())
            cos_min = min(cos_min, float(cos.min()))
    info = {"tokens": int(len(ids)), "window": window, "stride": stride, "windows": len(plans),
            **(eval_info or {})}
    card = QualityCard(perplexity=math.exp(nll_c / count), eval=info)
    if reference is not None:
        card.reference_perplexity = math.exp(nll_r / count)
        card.ppl_increase_pct = (card.perplexity / card.reference_perplexity - 1.0) * 100.0
        card.kl_mean = kl_sum / count
        card.kl_max_position = kl_max
        card.top1_agreement_eval = agree / count
        card.cosine_mean, card.cosine_min = cos_sum / count, cos_min
        scorer = getattr(reference, "teacher_forced", None)
        if prompt_ids:
            say(f"quality: greedy decoding on {len(prompt_ids)} prompts")
            if scorer is None:
                card.greedy = _greedy(candidate, reference, prompt_ids, new_tokens, say)
            else:
                card.pending_greedy = (scorer, list(prompt_ids),
                                       *_generate_greedy(candidate, prompt_ids, new_tokens, say),
                                       new_tokens)
                if not defer_scoring:
                    finish_greedy(card)
        card.reference = getattr(reference, "card_reference", None) or "fp32 graph"
    card.seconds = round(time.perf_counter() - t0, 2)
    return card


def eval_token_ids(tokenizer, settings: QualitySettings) -> tuple[list[int], dict] | None:
    """The first ``eval_tokens`` tokens of the evaluation text (None when there is none)."""
    path = settings.text_path()
    if path is None:
        return None
    raw = path.read_bytes()
    ids = tokenizer.encode(raw.decode("utf-8", errors="replace"))[: settings.eval_tokens]
    return ids, {"text": str(path), "text_sha256": hashlib.sha256(raw).hexdigest()}


def decoder_card(
    candidate: Decoder,
    tokenizer_dir: Path,
    settings: QualitySettings = QualitySettings(),
    *,
    reference: Decoder | None = None,
    progress: Progress | None = None,
    score_greedy: bool = True,
) -> QualityCard | None:
    """The card of an open decoder (any runtime, provider or shape contract) against an open
    reference, on the settings' text and prompts (None when no evaluation text exists).
    ``score_greedy=False``: a teacher-forced (streamed) reference's scoring of the greedy text
    is left to :func:`finish_greedy`, for a caller that closes the candidate first."""
    from slmedge.runtimes.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_dir)
    found = eval_token_ids(tokenizer, settings)
    if found is None:
        return None
    ids, info = found
    prompts = [tokenizer.encode(p) for p in settings.prompts] if reference else []
    window, stride, new_tokens = settings.window, settings.stride, settings.new_tokens
    # A fused graph capped below the card's sizes (--max-context): the windows, prompts and
    # greedy tokens fit inside the cap (the runtime refuses longer sequences)
    cap = getattr(candidate, "max_sequence_length", None)
    if cap and cap < max(window, max((len(p) for p in prompts), default=0) + new_tokens):
        window, stride = min(window, cap), min(stride, max(1, min(window, cap) // 2))
        prompts = [p[: cap // 2] for p in prompts]
        new_tokens = min(new_tokens, cap - max((len(p) for p in prompts), default=0) + 1)
    if not getattr(candidate, "context", None):  # the replay window is ids[:REPLAY_WINDOW]
        kept = list(ids)[: min(REPLAY_WINDOW, cap or REPLAY_WINDOW)]
        candidate = KeepPrefill(candidate, kept)
        reference = KeepPrefill(reference, kept) if reference is not None else None
    card = quality_card(candidate, ids, reference=reference, prompt_ids=[p for p in prompts if p],
                        window=window, stride=stride,
                        new_tokens=new_tokens, eval_info=info, progress=progress,
                        defer_scoring=True)
    card.replay = replay_record(candidate, tokenizer.encode(REPLAY_PROMPT), ids,
                                reference=reference)
    if score_greedy:
        finish_greedy(card)
    return card


def finish_greedy(card: QualityCard) -> None:
    """Score the greedy text :func:`quality_card` kept with ``defer_scoring``."""
    if card.pending_greedy is None:
        return
    t0 = time.perf_counter()
    scorer, prompts, generated, rows, new_tokens = card.pending_greedy
    card.pending_greedy = None
    card.greedy = _score_generated(scorer, prompts, generated, rows, new_tokens)
    card.seconds = round((card.seconds or 0.0) + time.perf_counter() - t0, 2)


class KeepPrefill:
    """A decoder that computes one prefill from a fresh state (all positions' logits of
    ``ids``) once and serves it again: the card's first window and the replay record's window
    are the same tokens when the evaluation text is that short (``--eval-tokens 256``, as the
    scale benchmark runs), one prefill of a whole window each. Everything else is forwarded."""

    def __init__(self, decoder: Decoder, ids: Sequence[int]):
        self._decoder = decoder
        self._ids = tuple(int(i) for i in ids)
        self._kept: np.ndarray | None = None
        self._fresh = True
        self._served = False  # the decoder's own cache is not filled: only reset() may follow

    def __getattr__(self, name):
        return getattr(self._decoder, name)

    def reset(self) -> None:
        self._decoder.reset()
        self._fresh, self._served = True, False

    def step(self, token_ids, all_logits: bool = False):
        if self._served:
            raise RuntimeError("a step after a kept prefill needs reset() first")
        fresh, self._fresh = self._fresh, False
        if not (fresh and all_logits and tuple(int(t) for t in token_ids) == self._ids):
            return self._decoder.step(token_ids, all_logits=all_logits)
        if self._kept is None:
            self._kept = np.array(self._decoder.step(token_ids, all_logits=True), copy=True)
        else:
            self._served = True
        return self._kept


def replay_record(candidate: Decoder, prompt_ids: Sequence[int], eval_ids: Sequence[int], *,
                  reference: Decoder | None = None) -> dict:
    """The card's replay record (``quality.replay`` in the manifest): a fixed prompt's greedy
    tokens and a short window's perplexity as this machine computes them, which ``slmedge check
    --target`` replays where the model runs (x86 and ARM kernels differ, e.g. int4)."""
    import platform

    import onnxruntime as ort

    # A static-shape decoder holds `context` tokens (prompt + generated, or one window): the
    # replay fits inside it (a 32-token test export cannot take 16 tokens after a 20-token
    # prompt, nor a 256-token window).
    # (or a fused graph's positions, capped at export by --max-context)
    context = getattr(candidate, "context", None) or getattr(candidate, "max_sequence_length", None)
    window, new_tokens = REPLAY_WINDOW, REPLAY_NEW_TOKENS
    if context:
        if len(prompt_ids) >= int(context):
            prompt_ids = list(prompt_ids)[: int(context) // 2]
        window = min(window, int(context))
        new_tokens = max(0, min(new_tokens, int(context) - len(prompt_ids)))
    spec = {"prompt": REPLAY_PROMPT, "prompt_ids": [int(i) for i in prompt_ids],
            "new_tokens": new_tokens,
            "window_ids": [int(i) for i in list(eval_ids)[:window]]}
    measured = run_spec(candidate, spec)
    record = {**spec, "tokens": measured["tokens"], "perplexity": measured.get("perplexity"),
              "machine": platform.machine(), "onnxruntime": ort.__version__}
    if reference is not None and len(spec["window_ids"]) >= 2:
        record["reference_perplexity"] = window_perplexity(reference, spec["window_ids"])
    return record


class GraphScorer:
    """An ONNX graph as a teacher-forced scorer (the ``score(sequences, last)`` of
    :class:`~slmedge.exporter.quality.streamed_reference.StreamedReference`): its session is opened
    for one :meth:`score` call and closed after it, so that it never sits beside the
    candidate's (one session at a time, as :func:`artifact_card` records the reference)."""

    def __init__(self, model_path: Path, threads: int | None = None):
        self.model_path = Path(model_path)
        self.threads = threads

    def score(self, sequences: Sequence[Sequence[int]], last: int) -> list[np.ndarray]:
        """The logits of the last ``last`` positions of each sequence, one prefill of each
        from an empty cache: row ``j`` predicts the token after position ``len(s) - last + j``."""
        from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

        decoder = OnnxDecoder(self.model_path, threads=self.threads,
                              session_options=verification_session_options())
        try:
            return [np.array(decoder.logits(list(s))[len(s) - last :], dtype=np.float32)
                    for s in sequences]
        finally:
            del decoder
            release_memory()


def _graph_bytes(path: Path) -> int:
    data = Path(path).with_name(Path(path).name + ".data")
    return Path(path).stat().st_size + (data.stat().st_size if data.exists() else 0)


def artifact_card(
    candidate_model: Path,
    tokenizer_dir: Path,
    settings: QualitySettings = QualitySettings(),
    *,
    reference_model: Path | None = None,
    threads: int | None = None,
    providers=None,
    allow_cpu_fallback: bool = True,
    progress: Progress | None = None,
    timings: dict | None = None,
    reference_source=None,
    teacher_forced_from: int | None = GRAPH_TEACHER_FORCED_FROM,
) -> QualityCard | None:
    """The card of an ONNX graph against another (None when no evaluation text exists).

    ``candidate_model``: an ``.onnx`` file, or an artifact directory (a static-shape one runs
    through its prefill / decode graphs). ``providers`` / ``allow_cpu_fallback`` build the
    candidate's sessions (e.g. a profile's QNN HTP with CPU fallback off); the reference
    always runs on CPU. ``timings`` (when given) receives ``reference``: the seconds of the
    reference's session and recorded logits (and of its teacher-forced scoring of the
    candidate's greedy text, when it scores that). ``reference_source``: a
    :class:`~slmedge.exporter.quality.streamed_reference.StreamedReference` to compare with instead of
    ``reference_model`` (the source in PyTorch, one layer at a time: no fp32 graph session).
    ``teacher_forced_from``: a ``reference_model`` of this many bytes or more scores the
    candidate's greedy text (:class:`GraphScorer`) instead of decoding its own greedy tokens;
    None: always step by step."""
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    candidate_model = Path(candidate_model)
    kwargs = dict(threads=threads, providers=providers, allow_cpu_fallback=allow_cpu_fallback)
    if candidate_model.is_dir():
        # a static-shape artifact (small models, NPU profiles): its replay window follows its
        # context, so its reference runs beside it
        from slmedge.runtimes.artifact import open_artifact
        from slmedge.runtimes.sessions.static_decoder import open_decoder

        candidate = open_decoder(open_artifact(candidate_model), **kwargs)
        reference = OnnxDecoder(reference_model, threads=threads) if reference_model else None
        return decoder_card(candidate, tokenizer_dir, settings, reference=reference,
                            progress=progress)

    def open_candidate():
        return OnnxDecoder(candidate_model, **kwargs,
                           session_options=verification_session_options())

    if reference_model is None and reference_source is None:
        return decoder_card(open_candidate(), tokenizer_dir, settings, progress=progress)
    # One session at a time: the reference runs first and its logits go to a scratch file
    # beside the candidate, then the candidate's session replays them (two fp32-sized
    # sessions side by side were the card's peak: issue 15).
    with tempfile.TemporaryDirectory(prefix=".card-reference-",
                                     dir=candidate_model.parent) as scratch:
        say = progress or (lambda _m: None)
        t_ref = time.perf_counter()
        if reference_source is not None:
            say(f"quality: reference logits from the {reference_source.description}")
            recorded = reference_source.record(tokenizer_dir, settings, Path(scratch) / "logits",
                                               progress=say)
        else:
            say("quality: reference logits (one session at a time)")
            size = _graph_bytes(reference_model)
            scorer = (GraphScorer(reference_model, threads)
                      if teacher_forced_from is not None and size >= teacher_forced_from else None)
            reference = OnnxDecoder(reference_model, threads=threads,
                                    session_options=verification_session_options())
            recorded = record_reference(reference, tokenizer_dir, settings,
                                        Path(scratch) / "logits", progress=say,
                                        greedy=scorer is None)
            del reference
            if recorded is not None and scorer is not None:
                recorded.teacher_forced = scorer
                recorded.greedy_note = (
                    f"the fp32 graph ({size / 1e6:.0f} MB, from {teacher_forced_from / 1e6:.0f} MB "
                    "on) scored the candidate's greedy text teacher-forced, one prefill per "
                    "prompt, instead of decoding its own greedy tokens step by step "
                    "(greedy.generated_by); the first divergence is the same position")
        release_memory()
        if timings is not None:
            timings["reference"] = round(time.perf_counter() - t_ref, 2)
        if recorded is None:
            return None
        candidate = open_candidate()
        card = decoder_card(candidate, tokenizer_dir, settings, reference=recorded,
                            progress=progress, score_greedy=False)
        # a teacher-forced reference (streamed, or a large fp32 graph) scores the candidate's
        # greedy text after its session is closed
        # (the two side by side were the 3B int4 export's peak: 10.9 GB)
        del candidate
        release_memory()
        t_greedy = time.perf_counter()
        finish_greedy(card)
        if timings is not None and card.greedy and card.greedy.get("generated_by"):
            # the reference's share of the card: its scoring of the candidate's greedy text too
            timings["reference"] = round(timings["reference"] + time.perf_counter() - t_greedy, 2)
        note = getattr(recorded, "greedy_note", None)
        if note and card.greedy:
            card.notes.append(note)
        return card


class RecordedReference:
    """A decoder that replays what another decoder returned, call by call, from a scratch file:
    the card's reference without its session in memory. Each ``step`` must be given the
    tokens the recording was given at that point (else ``RuntimeError``): the card's calls
    are the same in both passes, and a difference would compare the wrong logits."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.calls: list[tuple[tuple[int, ...], bool, int, tuple[int, ...], str]] = []
        self._file = open(self.path, "wb")
        self._replay = 0
        self.context = None
        #: what the card names as its reference
        self.card_reference = "fp32 graph"
        #: an object with ``score(sequences, last)`` when the greedy prompts were not recorded
        #: (a streamed reference: the candidate generates, the reference scores; see
        #: streamed_reference.py; or a large fp32 graph: GraphScorer)
        self.teacher_forced = None
        #: the card's note on why its greedy text is the candidate's (None: nothing to say)
        self.greedy_note: str | None = None
        #: the recorded decoder decoded its greedy prompts as one batch (decode_batch)
        self.batches_rows = False
        self.batch_calls: list[tuple[tuple, tuple | None, int, tuple[int, ...], str, list]] = []
        self._batch_replay = 0

    # -- recording
    def wrap(self, decoder: Decoder) -> Decoder:
        """A decoder that forwards to ``decoder`` and records every ``step``."""
        recorder = self
        recorder.batches_rows = bool(getattr(decoder, "batches_rows", False))

        class _Recording:
            batches_rows = recorder.batches_rows

            def reset(self) -> None:
                decoder.reset()

            def decode_batch(self, prompts, new_tokens: int, forced=None):
                tokens, rows = decoder.decode_batch(prompts, new_tokens, forced=forced)
                out = np.ascontiguousarray(np.stack(rows))
                recorder.batch_calls.append((_batch_key(prompts, new_tokens), _forced_key(forced),
                                             recorder._file.tell(), out.shape, out.dtype.str,
                                             tokens))
                recorder._file.write(memoryview(out.reshape(-1)).cast("B"))
                return tokens, rows

            def step(self, token_ids, all_logits: bool = False):
                out = np.ascontiguousarray(decoder.step(token_ids, all_logits=all_logits))
                recorder.calls.append((tuple(int(t) for t in token_ids), bool(all_logits),
                                       recorder._file.tell(), out.shape, out.dtype.str))
                recorder._file.write(memoryview(out.reshape(-1)).cast("B"))
                return out

        return _Recording()

    def finish(self) -> RecordedReference:
        self._file.close()
        return self

    # -- replaying (the Decoder protocol)
    def reset(self) -> None:
        pass

    def step(self, token_ids, all_logits: bool = False) -> np.ndarray:
        if self._replay >= len(self.calls):
            raise RuntimeError(f"the recorded reference has {len(self.calls)} steps; the card "
                               "asked for one more")
        tokens, flag, offset, shape, dtype = self.calls[self._replay]
        if tokens != tuple(int(t) for t in token_ids) or flag != bool(all_logits):
            raise RuntimeError(f"the card's reference step {self._replay} differs from the "
                               f"recorded one ({len(token_ids)} vs {len(tokens)} tokens)")
        self._replay += 1
        count = int(np.prod(shape))
        return np.fromfile(self.path, dtype=np.dtype(dtype), count=count,
                           offset=offset).reshape(shape)

    def decode_batch(self, prompts, new_tokens: int, forced=None):
        """The recorded ``decode_batch`` of the same prompts (tokens, rows)."""
        if self._batch_replay >= len(self.batch_calls):
            raise RuntimeError(f"the recorded reference has {len(self.batch_calls)} batch calls; "
                               "the card asked for one more")
        key, forced_key, offset, shape, dtype, tokens = self.batch_calls[self._batch_replay]
        if key != _batch_key(prompts, new_tokens) or forced_key != _forced_key(forced):
            raise RuntimeError(f"the card's reference batch {self._batch_replay} differs from the "
                               f"recorded one ({len(prompts)} prompts)")
        self._batch_replay += 1
        rows = np.fromfile(self.path, dtype=np.dtype(dtype), count=int(np.prod(shape)),
                           offset=offset).reshape(shape)
        return [list(t) for t in tokens], list(rows)


def _batch_key(prompts, new_tokens: int) -> tuple:
    return tuple(tuple(int(t) for t in p) for p in prompts), int(new_tokens)


def _forced_key(forced) -> tuple | None:
    return None if forced is None else tuple(tuple(int(t) for t in f) for f in forced)


def record_reference(reference: Decoder, tokenizer_dir: Path, settings: QualitySettings,
                     path: Path, progress: Progress | None = None,
                     greedy: bool = True) -> RecordedReference | None:
    """Run ``reference`` through the calls :func:`decoder_card` makes to its reference (the
    windows, the greedy prompts unless ``greedy`` is False, the replay window) and record its
    logits in ``path``."""
    from slmedge.runtimes.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_dir)
    found = eval_token_ids(tokenizer, settings)
    if found is None:
        return None
    recorded = RecordedReference(path)
    replay_reference_calls(recorded.wrap(reference), tokenizer, found[0], settings,
                           greedy=greedy, progress=progress)
    return recorded.finish()


def replay_reference_calls(reference: Decoder, tokenizer, eval_ids: Sequence[int],
                           settings: QualitySettings, *, greedy: bool = True,
                           progress: Progress | None = None) -> None:
    """Make the calls :func:`decoder_card` makes to its reference, in its order: the windows,
    the greedy prompts (unless ``greedy`` is False: a streamed reference scores the
    candidate's greedy text instead), the replay window."""
    ids = np.asarray(eval_ids, dtype=np.int64)
    # as decoder_card wraps the replayed reference: the same calls reach the recording
    ref = KeepPrefill(reference, ids[:REPLAY_WINDOW].tolist())
    for w in plan_windows(len(ids), settings.window, settings.stride):
        _all_logits(ref, ids[w.begin : w.end].tolist())
    prompts = [p for p in (tokenizer.encode(t) for t in settings.prompts) if p] if greedy else []
    if prompts:  # as _greedy: the reference's own greedy tokens
        _decode_rows(ref, prompts, settings.new_tokens, progress=progress,
                     what="quality reference: greedy prompt")
    window = ids[:REPLAY_WINDOW].tolist()
    if len(window) >= 2:  # replay_record's reference perplexity
        window_perplexity(ref, window)
