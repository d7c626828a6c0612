"""The quality card replayed where the model runs: greedy tokens and a short perplexity window
(no torch, no tokenizers: token ids come in, ids and figures go out).

At export / quantize time the card records, on the exporting machine, a *replay spec* and its
result in the manifest (``quality.replay``): prompt ids, the greedy tokens this machine's ONNX
Runtime produced, and the perplexity of a short window of the evaluation text. On a target
(a Raspberry Pi, a phone, an emulated arm64 in the tests) the same spec runs again::

    python -m slmedge.runtimes.check.target_card ARTIFACT [--spec-json FILE|-] --json

and :func:`compare` tells how far the target's figures are from the recorded ones: greedy
agreement (teacher-forced along the recorded tokens, as the card's own greedy agreement),
the first divergence, the free-running tokens, and the perplexity difference.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slmedge.runtimes.evaluate import token_nll

#: The replay's fixed prompt (greedy decoding of it is what the issue compared across CPUs).
REPLAY_PROMPT = "It is a truth universally acknowledged that"
REPLAY_NEW_TOKENS = 16
REPLAY_WINDOW = 256


def _argmax(logits) -> int:
    return int(np.argmax(np.asarray(logits, dtype=np.float32).reshape(-1)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    m = x.max()
    return x - m - math.log(float(np.exp(x - m).sum()))


def greedy_tokens(decoder, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Free-running greedy decoding: the first ``new_tokens`` tokens after ``prompt``."""
    decoder.reset()
    logits = decoder.step(list(prompt))
    out: list[int] = []
    for pos in range(new_tokens):
        out.append(_argmax(logits))
        if pos + 1 < new_tokens:
            logits = decoder.step([out[-1]])
    decoder.reset()
    return out


def teacher_forced(decoder, prompt: Sequence[int], tokens: Sequence[int],
                   keep_logprobs: bool = False) -> dict:
    """Feed ``tokens`` after ``prompt`` one decode step at a time; at each position, whether
    this decoder's argmax is the given token. With ``keep_logprobs``, the log-softmax rows
    (float16 lists) for a KL computed elsewhere."""
    decoder.reset()
    logits = decoder.step(list(prompt))
    hits: list[bool] = []
    rows: list[list[float]] = []
    for pos, token in enumerate(tokens):
        hits.append(_argmax(logits) == int(token))
        if keep_logprobs:
            rows.append(_log_softmax(logits).astype(np.float16).tolist())
        if pos + 1 < len(tokens):
            logits = decoder.step([int(token)])
    decoder.reset()
    first = next((i for i, h in enumerate(hits) if not h), len(hits))
    out = {"agreement": sum(hits) / len(hits) if hits else 1.0, "first_divergence": first,
           "positions": len(hits)}
    if keep_logprobs:
        out["logprobs"] = rows
    return out


def window_perplexity(decoder, ids: Sequence[int]) -> float:
    """Perplexity of ``ids`` in one window (every token after the first scored)."""
    ids = np.asarray(ids, dtype=np.int64)
    decoder.reset()
    logits = np.asarray(decoder.step(ids.tolist(), all_logits=True), dtype=np.float32)
    decoder.reset()
    return math.exp(float(token_nll(logits[:-1], ids[1:]).mean()))


def run_spec(decoder, spec: dict) -> dict:
    """Run a replay spec (``prompt_ids``, ``new_tokens``, ``window_ids``, and optionally
    ``reference_tokens`` to check agreement along) on an open decoder."""
    t0 = time.perf_counter()
    prompt = [int(i) for i in spec["prompt_ids"]]
    out: dict = {"tokens": greedy_tokens(decoder, prompt, int(spec["new_tokens"]))}
    ref = spec.get("reference_tokens")
    if ref:
        out["teacher_forced"] = teacher_forced(decoder, prompt, ref,
                                               keep_logprobs=bool(spec.get("logprobs")))
    window = spec.get("window_ids") or []
    if len(window) >= 2:
        out["perplexity"] = window_perplexity(decoder, window)
        out["window_tokens"] = len(window)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def platform_facts() -> dict:
    import onnxruntime as ort

    return {"machine": platform.machine(), "system": platform.system(),
            "python": platform.python_version(), "onnxruntime": ort.__version__}


def compare(recorded: dict, measured: dict, max_ppl_increase: float | None = None) -> dict:
    """The target's figures against the recorded ones (same spec). ``within_gate``: the
    target's window perplexity stays within ``max_ppl_increase`` percent of the recorded
    reference (the fp32 graph's, else the recorded figure of this artifact)."""
    rec_tokens = recorded.get("tokens") or []
    tokens = measured.get("tokens") or []
    same = 0
    for a, b in zip(rec_tokens, tokens):
        if a != b:
            break
        same += 1
    out = {"tokens_equal": rec_tokens == tokens, "same_prefix": same,
           "tokens": tokens, "recorded_tokens": rec_tokens}
    tf = measured.get("teacher_forced")
    if tf:
        out["greedy_agreement"] = tf["agreement"]
        out["first_divergence"] = tf["first_divergence"]
    ppl, rec_ppl = measured.get("perplexity"), recorded.get("perplexity")
    if ppl is not None and rec_ppl:
        out["perplexity"] = ppl
        out["recorded_perplexity"] = rec_ppl
        out["ppl_diff_pct"] = (ppl / rec_ppl - 1.0) * 100.0
        base = recorded.get("reference_perplexity") or rec_ppl
        out["ppl_increase_vs_reference_pct"] = (ppl / base - 1.0) * 100.0
        if max_ppl_increase is not None:
            out["max_ppl_increase"] = max_ppl_increase
            out["within_gate"] = out["ppl_increase_vs_reference_pct"] <= max_ppl_increase
    return out


def _view(value):
    """Attribute access on a raw JSON manifest section (dicts inside stay dicts of views)."""
    from types import SimpleNamespace

    if isinstance(value, dict):
        return SimpleNamespace(**{k: _view(v) for k, v in value.items()})
    return value


def verify_here(bundle: str, threads: int = 1) -> dict:
    """The device half of ``slmedge verify --target``: every file's size and sha256, then the
    parity replay (recorded prompt -> greedy tokens and first-step logits), with
    :mod:`.verify`'s own checks, on this machine. Targets have no pydantic, so the manifest is
    read as raw JSON (``files`` and ``parity`` seen through attribute views); the host has
    validated it and checked the runtime version. Returns the figures, or the error the
    checks stopped at (class, message, exit code, figures), with the platform facts. Run on a
    target by ``remote_card.run_remote_verify``."""
    from types import SimpleNamespace

    from slmedge.runtimes.artifact import open_artifact
    from slmedge.runtimes.errors import SlmEdgeError
    from .verify import check_files, check_parity

    out: dict = {"platform": platform_facts()}
    try:
        raw = open_artifact(bundle).manifest
        view = SimpleNamespace(files={k: _view(v) for k, v in (raw.get("files") or {}).items()},
                               parity=_view(raw.get("parity")))
        out["files_checked"] = check_files(Path(bundle), view)
        out["parity"] = check_parity(Path(bundle), view, threads=threads)
    except SlmEdgeError as e:
        out["error"] = {"class": type(e).__name__, "message": str(e), "exit_code": e.exit_code,
                        "figures": getattr(e, "figures", None)}
    return out


def main(argv: list[str] | None = None) -> int:
    from slmedge.runtimes.artifact import open_artifact
    from slmedge.runtimes.sessions.static_decoder import open_decoder

    p = argparse.ArgumentParser(prog="python -m slmedge.runtimes.check.target_card",
                                description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--spec-json", help="replay spec file ('-' = stdin); default: the "
                   "manifest's quality.replay")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--verify-bundle", action="store_true",
                   help="instead: check ARTIFACT (a bundle) here as `slmedge verify` does (files, "
                   "parity) and print the figures, or the error, as JSON (exit 0 either way)")
    args = p.parse_args(argv)
    if args.verify_bundle:
        print(json.dumps(verify_here(args.artifact, args.threads or 1)))
        return 0
    artifact = open_artifact(args.artifact)
    if args.spec_json:
        text = sys.stdin.read() if args.spec_json == "-" else Path(args.spec_json).read_text()
        spec = json.loads(text)
    else:
        spec = (artifact.manifest.get("quality") or {}).get("replay")
        if not spec:
            print(f"{args.artifact}: the manifest has no quality.replay record (exported before "
                  "it existed); export again or pass --spec-json", file=sys.stderr)
            return 2
        spec = dict(spec, reference_tokens=spec.get("tokens"))
    decoder = open_decoder(artifact, threads=args.threads)
    result = {"platform": platform_facts(), **run_spec(decoder, spec)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['platform']['machine']}: tokens {result['tokens']}"
              + (f", perplexity {result['perplexity']:.3f}" if "perplexity" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
