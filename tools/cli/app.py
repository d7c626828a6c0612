"""The ``slmedge`` command: flags -> config object -> library call.

``--json`` prints exactly one JSON document on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from slmedge.runtimes.errors import (
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_OK,
    MissingDependency,
    SlmEdgeError,
    UsageError,
    validation_problems,
)

from .progress import Progress

DESCRIPTION = """\
slmedge: export small language models to phones, Raspberry Pis and NPUs, run them,
and measure how they run there.

  make     export (ONNX or TFLite) -> quantize (an fp32 artifact, no re-export)
           fuse (the fusion passes on any decoder ONNX file)
  run      generate, eval (perplexity), bench (here, over SSH or ADB)
  read     compare (bench results as ratios), report (HTML / Markdown), results (the store)
  target   profiles (device profiles), check (what a profile's providers would run)
  ship     bundle (files for an app) -> verify (where only the runtime exists)
  choose   sweep (models x recipes x profiles: export, quantize, bench, Pareto pick)

`slmedge COMMAND --help` lists a command's flags.
"""


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _load_exporter():
    try:
        from slmedge.exporter import pipeline as export_module
    except ImportError as e:
        raise MissingDependency(
            f"slmedge export needs the [export] extra ({e.name or e} is not installed): "
            "pip install 'slmedge[export]' torch==2.13.0"
        ) from None
    return export_module


# -- export --------------------------------------------------------------------------------


def cmd_export(args) -> int:
    from slmedge.tools.cli.tflite import cmd_export_tflite, wants_tflite

    if wants_tflite(args):  # --format tflite: its own config, recipes and venv
        return cmd_export_tflite(args)
    exp = _load_exporter()
    fields = {}
    if args.config:
        try:
            fields = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--config {args.config}: cannot read it as JSON ({e})") from None
    for name in ("model", "output", "dtype", "opset", "parity_atol", "profile", "device_card",
                 "max_context"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.overwrite:
        fields["overwrite"] = True
    if getattr(args, "no_fuse", False):
        fields["fuse"] = False
    if getattr(args, "padding_mask", False):
        fields["padding_mask"] = True
    if args.external_data:
        fields["external_data"] = True
    if "output" not in fields:
        raise UsageError("slmedge export needs --output DIR (or a --config file that names one)")
    from slmedge.tools.cli.quantize import quant_fields, summary_line

    fields.update(quant_fields(args))
    from pydantic import ValidationError

    try:
        config = exp.ExportConfig(**fields)
    except ValidationError as e:
        raise UsageError(f"invalid export config: {validation_problems(e)}") from None
    if args.dry_run:
        _print_json(json.loads(config.model_dump_json()))
        return EXIT_OK
    progress = Progress()
    try:
        manifest = exp.run_export(config, progress=progress.say, command=args.command_line)
    finally:
        progress.close()
    from slmedge.tools.cli.results import store_quality

    store_quality(args, manifest, config.output)  # the results store, unless --no-store
    if args.json:
        _print_json({"output": str(config.output), **manifest})
    else:
        from slmedge.runtimes.manifest_schema import validate_manifest

        m = validate_manifest(manifest, Path(config.output) / "manifest.json")
        parity = m.verification.parity if m.verification else None
        checked = parity.summary() if parity else "parity not recorded"
        print(
            f"exported {m.architecture.family} to {config.output} "
            f"({m.model_bytes() / 1e6:.1f} MB, {m.recipe.dtype}); {checked}"
        )
        print(summary_line(m, config.output))
    return EXIT_OK


# -- generate ----------------------------------------------------------------------------


def _open_decoder(path, threads, args=None):
    from slmedge.runtimes.artifact import open_artifact
    from slmedge.runtimes.sessions.static_decoder import open_decoder
    from slmedge.runtimes.tokenizer import TextTokenizer

    from slmedge.tools.cli.profiles import runtime_kwargs  # --profile / --strict -> providers

    artifact = open_artifact(path)
    # a TFLite artifact takes --threads only: its profile's providers and threads are not read
    # (LiteRT has no providers to pick)
    kwargs = {"threads": threads} if artifact.format == "tflite" else runtime_kwargs(args, threads)
    return artifact, open_decoder(artifact, **kwargs), TextTokenizer(artifact.root)


def cmd_generate(args) -> int:
    from slmedge.runtimes.generation import SamplingConfig, generate

    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _, decoder, tokenizer = _open_decoder(args.artifact, args.threads, args)
    if args.chat:
        prompt_ids = tokenizer.encode_chat(args.prompt, system=args.system)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UsageError("the prompt encodes to no tokens; give some text")
    stream = not args.json and not args.no_stream

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(
        decoder,
        prompt_ids,
        args.max_new_tokens,
        sampling=sampling,
        stop_ids=set() if args.ignore_eos else tokenizer.stop_ids,
        tokenizer=tokenizer,
        on_text=on_text if stream else None,
    )
    if args.json:
        _print_json(
            {
                "prompt_tokens": result.prompt_tokens,
                "prompt_ids": list(prompt_ids),
                "tokens": result.tokens,
                "text": tokenizer.decode(result.tokens),
                "stop_reason": result.stop_reason,
                "ttft_ms": round(result.ttft_s * 1000, 3),
                "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
            }
        )
    elif stream:
        sys.stdout.write("\n")
    else:
        print(tokenizer.decode(result.tokens))
    return EXIT_OK


# -- eval ----------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    from slmedge.runtimes.evaluate import perplexity

    _, decoder, tokenizer = _open_decoder(args.artifact, args.threads, args)
    if args.text is None:
        from slmedge.runtimes.texts import default_eval_text

        args.text = str(default_eval_text())
    text_path = Path(args.text)
    if not text_path.is_file():
        raise UsageError(f"--text {args.text}: no such file")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(text)[: args.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"--text {args.text} has fewer than 2 tokens; nothing to score")
    progress = Progress()
    try:
        result = perplexity(
            decoder.logits,
            ids,
            window=args.window,
            stride=args.stride,
            progress=lambda done, total: progress.count(done, total, "perplexity windows"),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        progress.close()
    doc = {"text": str(text_path), **result.to_dict()}
    if args.json:
        _print_json(doc)
    else:
        print(
            f"perplexity {result.perplexity:.3f} over {result.tokens} tokens "
            f"({result.windows} windows of {result.window}, stride {result.stride})"
        )
    return EXIT_OK


# -- bench ---------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    from slmedge.runtimes.bench.runner import BenchConfig, run_bench

    from slmedge.tools.cli.runner import bench_options, bench_text, run_on_target

    try:
        config = BenchConfig(
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            threads=args.threads,
            warmup=args.warmup,
            repeats=args.repeats,
            **bench_options(args),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if getattr(args, "fleet", None):  # several devices at once: tools/cli/fleet.py
        from slmedge.tools.cli.fleet import cmd_bench_fleet

        return cmd_bench_fleet(args, config)
    if getattr(args, "more_artifacts", None):
        raise UsageError("several artifacts need --fleet FLEET.yaml; bench one artifact at a time "
                         "otherwise")
    from slmedge.tools.cli.profiles import memory_gate

    refused = memory_gate(args, args.artifact, args.profile)
    if refused is not None:
        return refused
    progress = Progress()
    try:
        from slmedge.tools.cli.profiles import bench_session_kwargs

        if args.target:  # the profile's providers and --strict apply on the target too
            result = run_on_target(args, config, progress.say, **bench_session_kwargs(args))
        else:
            result = run_bench(args.artifact, config, progress=progress.say,
                               **bench_session_kwargs(args))
    finally:
        progress.close()
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_record:
        _record_last_bench(args.artifact, result)
    from slmedge.tools.cli.results import store_bench

    store_bench(args, result)  # the results store, unless --no-store
    if args.json:
        _print_json(result)
    else:
        print(
            f"load {result['load_s']:.2f} s | TTFT {result['ttft_ms']:.1f} ms "
            f"({result['prompt_tokens']} prompt tokens) | decode "
            f"{result['decode_tokens_per_s']:.1f} tok/s (p50 {result['decode_ms_p50']:.1f} ms, "
            f"p99 {result['decode_ms_p99']:.1f} ms) | peak RSS {result['peak_rss_mb']:.0f} MB | "
            f"size {result['model_size_mb']:.1f} MB"
        )
        print(bench_text(result))
    return EXIT_OK


def _record_last_bench(artifact: str, result: dict) -> None:
    """Keep the result as ARTIFACT/bench.json for ``slmedge bundle`` (a notice, not an error,
    where the directory is read-only)."""
    from slmedge.runtimes.bench.runner import record_last_bench

    try:
        written = record_last_bench(artifact, result)
    except OSError as e:
        print(f"notice: could not record the result in {artifact} ({e.strerror}); "
              "slmedge bundle will not carry it", file=sys.stderr)
        return
    if written:
        print(f"recorded as {written} (the bundle's last_bench)", file=sys.stderr)


# -- parser --------------------------------------------------------------------------------


#: Modules that add their own subcommands: each has ``register(subparsers)`` which adds
#: parsers whose ``func(args) -> int`` runs the command. Keeps this file thin as commands grow.
COMMAND_MODULES: list[str] = ["slmedge.tools.cli.quantize", "slmedge.tools.cli.runner", "slmedge.tools.cli.profiles", "slmedge.tools.cli.bundle", "slmedge.tools.cli.fleet", "slmedge.tools.cli.results", "slmedge.tools.cli.sweep", "slmedge.tools.cli.fuse"]


#: Commands that run an artifact: their process holds the model, so it imports only what a run
#: needs (issue 15, RSS after load). ``export``'s and ``quantize``'s flags import pydantic, the
#: schemas and the recipes (~13 MB resident), so :func:`main` leaves those two commands out of
#: the parser when the command line runs one of these.
RUN_COMMANDS = ("generate", "eval", "bench")

#: What a parser for :data:`RUN_COMMANDS` leaves out: it adds only ``slmedge quantize``.
_NOT_FOR_RUN_COMMANDS = ("slmedge.tools.cli.quantize",)


def build_parser(for_run_command: bool = False) -> argparse.ArgumentParser:
    """The ``slmedge`` parser; ``for_run_command``: without ``export`` and ``quantize`` (the
    other commands' flags are the same)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="slmedge", description=DESCRIPTION, epilog=EXIT_CODES_HELP,
                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if not for_run_command:
        _add_export_parser(sub, fmt)
    _add_run_parsers(sub, fmt)
    import importlib

    for module in COMMAND_MODULES:
        if not (for_run_command and module in _NOT_FOR_RUN_COMMANDS):
            importlib.import_module(module).register(sub)
    _add_verbose(parser, sub)
    return parser


def _add_export_parser(sub, fmt) -> None:
    p = sub.add_parser("export", help="export a model to ONNX with KV cache",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    p.add_argument("--model", help="HF directory, hub id (owner/name), .gguf file, or "
                   "embedded:smollm2-135m-instruct (the default)")
    p.add_argument("--output", "-o", type=Path, help="artifact directory to write")
    p.add_argument("--dtype", choices=["fp32", "fp16"], help="precision (default fp32)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    p.add_argument("--parity-atol", type=float, help="override the parity tolerance")
    p.add_argument("--external-data", action="store_true",
                   help="store weights in model.onnx.data (automatic above 2 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep standard ONNX ops (default: fuse attention into GroupQueryAttention "
                   "with a shared KV buffer, norms, GELU; fp32 only)")
    p.add_argument("--padding-mask", action="store_true",
                   help="fused graphs: keep the attention mask inside GroupQueryAttention so "
                   "left-padded batches stay exact (slower decode); default: exact for one "
                   "sequence or right-padded rows, as ONNX Runtime GenAI")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="fused graphs: the longest sequence (prompt + generated tokens) the "
                   "artifact runs; its rotary tables, which ONNX Runtime computes at load, cover "
                   "N positions instead of the model's maximum (Gemma 3 270M: 67 MB at 32768). "
                   "Longer sequences are refused at run time. Default: the model's maximum")
    p.add_argument("--profile", help="device profile (name or YAML): its recipe sets dtype, "
                   "quantization, static shapes, formats (slmedge profiles list)")
    p.add_argument("--device-card", choices=["full", "short", "off"],
                   help="with a quantized static-shape --profile: how much of the quality card "
                   "runs on the profile's accelerator when it is here (the QNN HTP emulator on "
                   "x86 Linux: minutes per 64-token chunk). full (default): 256-token perplexity "
                   "window + 3 greedy prompts x 16 tokens (~1 h for SmolLM2-135M); short: one "
                   "prefill chunk + 1 prompt x 4 tokens; off: none, the CPU card gates. "
                   "Recorded in the manifest")
    p.add_argument("--config", help="read the export config from a JSON file (see --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    from slmedge.tools.cli.quantize import add_quant_flags
    from slmedge.tools.cli.tflite import TFLITE_QUANT_CHOICES, TFLITE_QUANT_HELP, add_tflite_flags

    add_quant_flags(p, extra_choices=TFLITE_QUANT_CHOICES, extra_help=TFLITE_QUANT_HELP)
    add_tflite_flags(p)  # --format, --context-length, --prefill-chunks, --from-artifact
    p.set_defaults(func=cmd_export)


def _add_run_parsers(sub, fmt) -> None:
    """generate, eval and bench."""
    def runtime_flags(p, threads_default=None):
        p.add_argument("artifact", help="artifact directory written by slmedge export")
        p.add_argument("--threads", type=int, default=threads_default,
                       help="intra-op threads (default: ONNX Runtime's choice)"
                       if threads_default is None else f"intra-op threads (default {threads_default})")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.add_argument("--profile", help="device profile (name or YAML): execution providers "
                       "in order, with options (slmedge profiles list)")
        p.add_argument("--strict", action="store_true", help="any provider fallback or CPU "
                       "fallback is an error (exit 4)")

    p = sub.add_parser("generate", help="generate text from a prompt",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    runtime_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-turn/EOS")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity on a text file",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    runtime_flags(p)
    p.add_argument("--text", help="UTF-8 text file (default: the packaged "
                   "eval_mansfield_park.txt, the export quality card's text)")
    p.add_argument("--max-tokens", type=int, default=4096, help="score the first N tokens")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measure load time, TTFT, decode speed, memory, size",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    runtime_flags(p, threads_default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", "-o", help="also write the JSON result to this file")
    p.add_argument("--no-record", action="store_true",
                   help="do not keep the result as ARTIFACT/bench.json (what slmedge bundle "
                   "carries as last_bench)")
    p.add_argument("--target", help="run there: ssh://[user@]host[:port][/dir] or "
                   "adb://[SERIAL][/dir] (default: here); more flags: tools/cli/runner.py")
    from slmedge.tools.cli.profiles import add_context_flag

    add_context_flag(p)  # with --profile: weights + KV cache vs its ram_budget_mb
    p.set_defaults(func=cmd_bench)


def _add_verbose(parser: argparse.ArgumentParser, sub) -> None:
    """``-v/--verbose`` before or after the command: the dependencies' own warnings, logs and
    progress bars reach the terminal (slmedge.exporter.quiet silences them by default)."""
    text = "show the dependencies' warnings and logs (hidden by default)"
    parser.add_argument("-v", "--verbose", action="store_true", help=text)
    for command in sub.choices.values():
        try:  # SUPPRESS: a command without -v keeps the value given before it
            command.add_argument("-v", "--verbose", action="store_true",
                                 default=argparse.SUPPRESS, help=text)
        except argparse.ArgumentError:  # a command that uses -v itself keeps its meaning
            pass


def _runs_an_artifact(argv: list[str]) -> bool:
    """Whether the command of ``argv`` is one of :data:`RUN_COMMANDS` (only ``-v`` before it:
    ``slmedge -h``, another command or a typo get the whole parser)."""
    for arg in argv:
        if arg not in ("-v", "--verbose"):
            return arg in RUN_COMMANDS
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(for_run_command=_runs_an_artifact(argv))
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["slmedge", *argv])
    if args.verbose:  # read by slmedge.exporter.quiet, here and in the processes it starts
        os.environ["SLMEDGE_VERBOSE"] = "1"
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except SlmEdgeError as e:
        print(f"slmedge {args.command}: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            # --json promises one document on stdout: on failure it is the error, so a
            # script reads the exit code's reason (and a gate's figures) without parsing stderr.
            _print_json({"error": {"command": args.command, "exit_code": e.exit_code,
                                   "type": type(e).__name__, "message": str(e),
                                   **({"figures": e.figures} if getattr(e, "figures", None) else {}),
                                   **({"partial": e.partial} if getattr(e, "partial", None) else {})}})
        return e.exit_code
    except KeyboardInterrupt:
        print(f"slmedge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `slmedge generate ... | head`: the reader went away; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
