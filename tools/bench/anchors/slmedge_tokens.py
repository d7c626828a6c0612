"""The greedy tokens slmedge generates for the benchmark prompt (an untimed sanity run).

``slmedge bench --json`` reports timings, not the tokens it generated, so
``tools/bench/bench_anchors.py`` runs this once to compare slmedge's greedy output with
PyTorch's. The prompt is built exactly as ``slmedge.runtimes.bench.runner.run_bench`` builds it
(the vocabulary size read from the session, ``bench_prompt_ids`` with the same seed),
and printed too, so the caller can check every tool got the same ids.

    python tools/bench/anchors/slmedge_tokens.py ARTIFACT_DIR --prompt-tokens 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import sys

from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.bench.runner import bench_prompt_ids
from slmedge.runtimes.generation import generate
from slmedge.runtimes.sessions.static_decoder import open_decoder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    artifact = open_artifact(args.artifact)
    decoder = open_decoder(artifact, threads=args.threads)  # the decoder run_bench opens
    # As run_bench does: the session's vocabulary, else the width of one step's logits.
    vocab = decoder.vocab_size or int(decoder.step([0]).shape[-1])
    prompt = bench_prompt_ids(vocab, args.prompt_tokens, args.seed)
    result = generate(decoder, prompt, args.new_tokens)  # no stop ids: never stops early
    print(json.dumps({"vocab_size": vocab, "prompt_ids": prompt, "tokens": result.tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
