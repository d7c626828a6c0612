"""The quality card's greedy prompts decoded as one batch vs one prompt at a time (issue 15).

    python tools/bench/bench_card_batch.py ARTIFACT [--rounds 2] [--new-tokens 64]
        [--json tools/bench/results/card_batch_0.5b.json]

``ARTIFACT``: an int4 (or fp32) artifact written by ``slmedge export`` / ``quantize`` with the
fused graph (metadata ``slmedge.batch_padding = right``). In one process, on one session
opened with the card's verification options: the card's 6 default prompts, ``--new-tokens``
greedy steps each, through the card's own ``_decode_rows`` with the batch on and off; the
two modes alternate within each round (the machine is shared: wall times are inflated, so
only the ratio within a round means something). Also recorded: session creation, the
evaluation window's prefill, whether the tokens and logits are identical, and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


class _OneAtATime:
    """The decoder as the card sees a decoder without ``decode_batch``."""

    batches_rows = False

    def __init__(self, decoder):
        self._decoder = decoder

    def reset(self):
        self._decoder.reset()

    def step(self, token_ids, all_logits=False):
        return self._decoder.step(token_ids, all_logits=all_logits)


def main(argv: list[str] | None = None) -> int:
    from slmedge.exporter.quality.card import (QualitySettings, _all_logits, _decode_rows,
                                               eval_token_ids)
    from slmedge.exporter.quality.memory import verification_session_options
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
    from slmedge.runtimes.tokenizer import TextTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    settings = QualitySettings(eval_tokens=256, new_tokens=args.new_tokens)
    tokenizer = TextTokenizer(args.artifact)
    ids, _ = eval_token_ids(tokenizer, settings)
    prompts = [tokenizer.encode(p) for p in settings.prompts]
    import subprocess

    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or None
    out: dict = {"artifact": str(args.artifact), "slmedge_commit": commit,
                 "prompts": len(prompts), "new_tokens": args.new_tokens,
                 "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    decoder = OnnxDecoder(args.artifact / "model.onnx",
                          session_options=verification_session_options())
    out["session_s"] = round(time.perf_counter() - t0, 2)
    if not decoder.batches_rows:
        raise SystemExit(f"{args.artifact}: the graph cannot batch rows (no slmedge.batch_padding "
                         "= right metadata); export it again")
    t0 = time.perf_counter()
    _all_logits(decoder, ids[: settings.window])
    out["window_prefill_s"] = round(time.perf_counter() - t0, 2)
    rounds, results = [], {}
    for r in range(args.rounds):
        order = ("batched", "one_at_a_time") if r % 2 == 0 else ("one_at_a_time", "batched")
        row, seconds = {}, {}
        for mode in order:
            target = decoder if mode == "batched" else _OneAtATime(decoder)
            t0 = time.perf_counter()
            results[mode] = _decode_rows(target, prompts, args.new_tokens)
            seconds[mode] = time.perf_counter() - t0
            row[mode + "_s"] = round(seconds[mode], 2)
        # from the unrounded times (a tiny model's batch can round to 0.00 s)
        row["ratio"] = (round(seconds["one_at_a_time"] / seconds["batched"], 2)
                        if seconds["batched"] > 0 else None)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    (bt, br), (st, sr) = results["batched"], results["one_at_a_time"]
    out["rounds"] = rounds
    out["same_tokens"] = bt == st
    out["logits_max_abs_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(br, sr))
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
