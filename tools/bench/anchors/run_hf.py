"""One timed greedy generation with Hugging Face ``generate``: PyTorch eager or Optimum ORT.

Run by ``tools/bench/bench_anchors.py`` in a process of its own (so that its peak RSS is this
process's alone): ``--backend pytorch`` in the main venv, ``--backend optimum`` in the
Optimum venv (transformers 4.57). It imports neither slmedge nor anything outside
torch / transformers / optimum / onnxruntime, and prints one JSON object on stdout.

Timing: a streamer timestamps every token as ``generate`` hands it out, so TTFT
(call -> first new token) and decode speed (tokens after the first / their time) are
taken at the same point for both backends, including ``generate``'s own overhead.
End-of-sequence is switched off (``eos_token_id = None``), so exactly ``--new-tokens``
tokens come out and an EOS is fed back like any other token -- as ``slmedge bench``
does. (``min_new_tokens`` would instead mask EOS and change the greedy choice.)

    python tools/bench/anchors/run_hf.py --backend pytorch --model-dir DIR --prompt-file ids.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "torch",
    "transformers",
    "onnxruntime",
    "optimum",
    "optimum-onnx",
    "numpy",
    "tokenizers",
)


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB (10^6 bytes); ru_maxrss is KiB on Linux."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e6


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def model_size_mb(model_dir: Path, backend: str) -> float:
    """Size on disk of the weights/graph files this backend loads, MB (10^6 bytes)."""
    if backend == "pytorch":
        files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("*.bin"))
    else:
        files = [
            p
            for p in model_dir.iterdir()
            if p.suffix == ".onnx" or p.name.endswith((".onnx_data", ".onnx.data"))
        ]
    return sum(p.stat().st_size for p in files) / 1e6


def make_streamer():
    """A streamer that records when each generated token arrives."""
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False
            self.tokens: list[int] = []
            self.times: list[float] = []

        def put(self, value):
            # generate() first puts the prompt ids, then each new token as it is chosen.
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            now = time.perf_counter()
            for token in value.reshape(-1).tolist():
                self.tokens.append(int(token))
                self.times.append(now)

        def end(self):
            pass

    return TimingStreamer()


def load(backend: str, model_dir: Path, threads: int):
    """The model, ready for ``generate`` with ``threads`` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    if backend == "pytorch":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
        )
        return model.eval()
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Optimum's defaults otherwise (use_io_binding is off on the CPU provider).
    return ORTModelForCausalLM.from_pretrained(
        str(model_dir), session_options=options, provider="CPUExecutionProvider", use_cache=True
    )


def greedy_config(model, new_tokens: int):
    """The model's generation config, made greedy, fixed-length and stop-free.

    EOS is cleared on the model's own ``generation_config`` too: transformers 4.57 fills
    fields a passed config leaves at their default (``None``) from the model's config
    ("`generation_config` default values have been modified to match model-specific
    defaults: {'eos_token_id': [2]}"), which would bring the stop back.
    """
    model.generation_config.eos_token_id = None
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens = new_tokens
    config.min_new_tokens = None
    config.max_length = None
    config.eos_token_id = None
    config.use_cache = True
    return config


def timed_generate(model, prompt: list[int], config) -> dict:
    import torch

    input_ids = torch.tensor([prompt], dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    streamer = make_streamer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            streamer=streamer,
        )
    new = out[0, len(prompt) :].tolist()
    if new != streamer.tokens or len(new) != config.max_new_tokens:
        raise RuntimeError(
            f"generate returned {len(new)} new tokens, the streamer saw {len(streamer.tokens)}; "
            f"expected exactly {config.max_new_tokens}"
        )
    times = streamer.times
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    decode_s = times[-1] - times[0]
    return {
        "ttft_ms": round((times[0] - t0) * 1000, 4),
        "decode_tokens_per_s": round((len(times) - 1) / decode_s, 4) if decode_s > 0 else 0.0,
        "decode_ms_p50": round(statistics.median(steps) * 1000, 4) if steps else 0.0,
        "tokens": new,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("pytorch", "optimum"), required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--prompt-file", type=Path, required=True, help="JSON list of token ids")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    prompt = [int(t) for t in json.loads(args.prompt_file.read_text())]
    t0 = time.perf_counter()
    model = load(args.backend, args.model_dir, args.threads)
    load_s = time.perf_counter() - t0
    config = greedy_config(model, args.new_tokens)
    for _ in range(args.warmup):
        timed_generate(model, prompt, config)
    result = timed_generate(model, prompt, config)

    import torch

    extra = {"use_io_binding": bool(model.use_io_binding)} if args.backend == "optimum" else {}
    print(
        json.dumps(
            {
                "backend": args.backend,
                "load_s": round(load_s, 4),
                "prompt_tokens": len(prompt),
                "new_tokens": args.new_tokens,
                "threads": args.threads,
                "torch_threads": torch.get_num_threads(),
                "model_size_mb": round(model_size_mb(args.model_dir, args.backend), 2),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "versions": versions(),
                **extra,
                **result,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
