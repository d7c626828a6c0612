"""``slmedge bundle``: an exported artifact made ready to drop into an app.

A bundle directory holds the model file(s) in the one format the app loads
(:func:`bundle_layout`: the ``.onnx`` graphs + their shared external weights file, or with
``--format ort`` the ``.ort`` graphs, which hold their weights inline, for a minimal ONNX
Runtime build; the ``.tflite`` of a TFLite artifact for a LiteRT profile; the
required-operators config when the profile asks for one), the tokenizer files, a
``genai_config.json`` for ONNX Runtime GenAI (when GenAI can express the graphs),
integration snippets rendered from the device profile (``bundle_snippets``), and
``manifest.json``: sha256 and size of every file, each graph's opset / IR version / contrib
ops, the minimum ONNX Runtime version that runs it (``slmedge.runtimes.check.verify``'s table), the
profile, recipe, quality card, the artifact's last ``slmedge bench`` result (``last_bench``),
and a parity reference (greedy tokens of a fixed prompt through slmedge's runtime) that
``slmedge verify`` replays.

Which artifact goes with which profile: a profile whose ``artifact.formats`` has ``tflite``
(``runtime.engine: litert``; the schema allows no other formats beside it) takes a TFLite
artifact (``slmedge export --format tflite``, or ``--profile`` with that profile); any other
profile takes an ONNX artifact with the profile's shape policy. A bundle holds one runtime's
files: an app loads either ONNX Runtime or LiteRT.

The graph change GenAI needs (measured with onnxruntime-genai 0.18.0): a fused slmedge graph
takes a required ``logits_to_keep`` input that GenAI never feeds ("Missing Input:
logits_to_keep"). The bundle's copy of the graph turns it into an initializer of value 0
(logits of every fed position): GenAI binds a ``logits`` output of shape
``[batch, fed tokens, vocab]``, so value 1 (last position only) fails on the prompt with
"has shape {1,6,128} but the computed output shape for this run is {1,1,128}".
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from slmedge.device_profiles import DeviceProfile
from slmedge.device_profiles.schema import ArtifactFormat, ShapePolicy
from slmedge.runtimes.artifact import (
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_NAME,
    open_artifact,
    sha256_file,
)
from slmedge.runtimes.bench.runner import LAST_BENCH_NAME
from slmedge.runtimes.errors import ArtifactError, UnsupportedError, UsageError
from slmedge.runtimes.manifest_schema import BundleManifest, Manifest
from slmedge.runtimes.check.ort_format import (
    format_requirement,
    ort_file_facts,
    raise_minimum,
    read_ort_header,
)
from slmedge.runtimes.check.verify import minimum_onnxruntime, open_bundle_decoder

from slmedge.exporter.architectures import get_spec, supported_model_types
from slmedge.exporter.bundle.snippets import genai_dependency, litert_version, render_snippets
from slmedge.exporter.manifest import graph_signature, onnx_facts, save_manifest
from slmedge.exporter.staging import check_output, staged_directory

__all__ = ["build_bundle", "genai_config", "last_bench", "parity_reference", "render_snippets"]
GENAI_CONFIG = "genai_config.json"
#: Tokenizer and generation files an app needs beside the graph (copied when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja", "config.json")
#: ORT provider name -> the name onnxruntime-genai 0.18.0 takes in provider_options. NNAPI
#: is not one of them ("Unknown provider name 'NNAPI'"); the CPU provider needs no entry.
GENAI_PROVIDER_NAMES = {"QNNExecutionProvider": "QNN", "XnnpackExecutionProvider": "XNNPACK",
                        "CoreMLExecutionProvider": "CoreML"}
PARITY_PROMPT = "The capital of France is"
PARITY_TOKENS = 8

Say = Callable[[str], None]


# -- graph facts and the GenAI graph change ------------------------------------------------------


def graph_facts(path: Path) -> dict:
    """Opset, IR version and contrib ops of a graph, as the bundle manifest records them.

    Ops in the default domain that ONNX does not define (ORT's SimplifiedLayerNormalization)
    count as contrib ops: a reduced ONNX Runtime build must include them too."""
    import onnx

    facts = onnx_facts(path)
    nonstandard = [op for op in facts["ops"] if "." not in op and not onnx.defs.has(op)]
    return {"ir_version": facts["ir_version"], "opset": facts["opset"],
            "opset_imports": facts["opset_imports"],
            "contrib_ops": sorted(set(facts["contrib_ops"]) | set(nonstandard))}


def pin_logits_to_keep(path: Path) -> bool:
    """Turn a graph's ``logits_to_keep`` input into an initializer of 0 (every position), in
    place; weights in external data are untouched. Returns whether the graph had it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    found = [i for i in model.graph.input if i.name == "logits_to_keep"]
    if not found:
        return False
    model.graph.input.remove(found[0])
    model.graph.initializer.append(
        numpy_helper.from_array(np.array(0, dtype=np.int64), "logits_to_keep"))
    onnx.save(model, str(path))
    return True


def _graph_meta(path: Path) -> tuple[list[str], dict[str, str]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return inputs, {p.key: p.value for p in model.metadata_props}


def _genai_model_type(model_type: str | None) -> str | None:
    """onnxruntime-genai's ``model.type`` for an artifact's ``model_type`` (its spec's)."""
    try:
        return get_spec(model_type).genai_model_type if model_type else None
    except UnsupportedError:  # an artifact of a family this version no longer registers
        return None


def json_of(section) -> dict | None:
    """A manifest section as the JSON it was read from (None stays None)."""
    return section.model_dump(mode="json", exclude_unset=True) if section is not None else None


def genai_config(manifest: Manifest, root: Path, profile: DeviceProfile
                 ) -> tuple[dict | None, str]:
    """``(genai_config.json contents, why)`` for the bundle at ``root``; ``(None, reason)``
    when GenAI cannot express the artifact."""
    if manifest.static:
        return None, ("static-shape prefill/decode graphs over a fixed window: "
                      "genai_config.json describes one decoder with a growing KV cache, so "
                      "run this bundle with slmedge's runtime or ONNX Runtime directly")
    if manifest.format != "onnx":
        return None, f"format {manifest.format} is not an ONNX decoder"
    # The graphs use GenAI's decoder contract (input_ids, attention_mask, position_ids,
    # past_key_values.N.key/value -> logits, present.N.key/value); the spec says whether GenAI
    # has loaded its family (ArchitectureSpec.genai_model_type).
    arch = manifest.architecture
    model_type = arch.model_type
    genai_type = _genai_model_type(model_type)
    if genai_type is None:
        checked = sorted(t for t in map(_genai_model_type, supported_model_types()) if t)
        return None, (f"model_type {model_type!r} has not been checked with onnxruntime-genai "
                      f"(checked: {', '.join(checked)})")
    try:
        hf = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        return None, "the artifact has no config.json (hidden size, attention heads)"
    inputs, meta = _graph_meta(root / manifest.model_file)
    if "logits_to_keep" in inputs:
        return None, "the graph still takes logits_to_keep, which GenAI does not feed"
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    names |= {"past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    shared = meta.get("slmedge.kv_cache") == "shared_buffer"
    context = int(meta.get("slmedge.max_sequence_length", hf.get("max_position_embeddings", 2048)))
    providers = [{GENAI_PROVIDER_NAMES[p.name]: p.ort_options()}
                 for p in profile.runtime.providers if p.name in GENAI_PROVIDER_NAMES]
    session = {"log_id": "slmedge-bundle", "provider_options": providers}
    if profile.runtime.threads:
        session["intra_op_num_threads"] = profile.runtime.threads
    gen = json.loads((root / "generation_config.json").read_text()) \
        if (root / "generation_config.json").exists() else {}
    eos = manifest.stop_token_ids or gen.get("eos_token_id") or hf.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    pad = gen.get("pad_token_id", hf.get("pad_token_id"))
    config = {
        "model": {
            "bos_token_id": gen.get("bos_token_id", hf.get("bos_token_id")),
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": manifest.model_file,
                "head_size": arch.head_dim,
                "hidden_size": hf["hidden_size"],
                "inputs": names,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": hf["num_attention_heads"],
                "num_hidden_layers": arch.num_layers,
                "num_key_value_heads": arch.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos[0],
            "type": genai_type,
            "vocab_size": arch.vocab_size,
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": shared,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    why = ("GroupQueryAttention writes the KV cache in place (slmedge.kv_cache = shared_buffer): "
           "past_present_share_buffer true" if shared else
           "KV cache concatenated per step: past_present_share_buffer false")
    return config, why


# -- parity reference -------------------------------------------------------------------------


def parity_reference(root: Path, tokens: int = PARITY_TOKENS) -> dict:
    """Greedy tokens and first-step top logits of a fixed prompt through slmedge's runtime
    (ONNX Runtime, or LiteRT for a TFLite bundle), recorded so ``slmedge verify`` can replay
    them (1 thread, CPU)."""
    from slmedge.runtimes.generation import generate

    artifact = open_artifact(root)
    decoder, runtime = open_bundle_decoder(artifact, threads=1)
    arch = artifact.info.architecture if artifact.info else None
    vocab = arch.vocab_size if arch else 2
    ids: list[int] = []
    if (root / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(root / "tokenizer.json")).encode(PARITY_PROMPT).ids
    if not ids or max(ids) >= vocab:  # a tokenizer that does not fit the graph: fixed ids
        ids = [i % vocab for i in range(1, 9)]
    first = np.asarray(decoder.logits(ids)[-1], dtype=np.float64)
    if hasattr(decoder, "reset"):  # LiteRT keeps the KV cache between calls
        decoder.reset()
    top = np.argsort(-first)[:5]
    result = generate(decoder, ids, tokens)
    scale = float(np.max(np.abs(first)))
    return {"prompt": PARITY_PROMPT, "prompt_ids": [int(i) for i in ids],
            "greedy_tokens": [int(t) for t in result.tokens],
            "first_step": {"top_ids": [int(i) for i in top],
                           "top_logits": [float(first[i]) for i in top]},
            "atol": 1e-3 * max(1.0, scale), "runtime": f"{runtime}, CPU, 1 thread"}


# -- last bench ------------------------------------------------------------------------------------


def last_bench(source: Path) -> tuple[dict | None, str | None]:
    """``(summary of SOURCE/bench.json, None)``, or ``(None, why not)`` when the artifact has no
    valid recorded bench. The summary keeps the figures and where they were taken; the full
    result stays in the artifact (its sha256 is recorded)."""
    from slmedge.runtimes.bench.schema import validate_result

    path = source / LAST_BENCH_NAME
    if not path.is_file():
        return None, (f"no slmedge bench result recorded in {source} ({LAST_BENCH_NAME}); "
                      f"run slmedge bench {source} to record one")
    try:
        doc = json.loads(path.read_text())
        validate_result(doc, str(path))
    except (json.JSONDecodeError, UnicodeDecodeError, UsageError) as e:
        return None, f"{path} is not a usable bench result ({e}); run slmedge bench again"
    env = doc.get("environment") or {}
    keys = ("label", "target", "started_at", "prompt_tokens", "new_tokens", "repeats",
            "rounds_done", "load_s", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s",
            "decode_ms_p50", "decode_ms_p99", "peak_rss_mb", "model_size_mb")
    summary = {k: doc.get(k) for k in keys}
    summary["stability"] = doc.get("stability", {}).get("verdict")
    summary["warnings"] = doc.get("warnings", [])
    summary["environment"] = {k: env.get(k) for k in ("hostname", "cpu", "arch", "os", "threads",
                                                      "onnxruntime", "litert", "providers")}
    summary["file"] = {"path": str(path.absolute()), "sha256": sha256_file(path)}
    return summary, None


# -- the bundle -----------------------------------------------------------------------------------


def _check_fit(manifest: Manifest, profile: DeviceProfile, source: Path) -> list[str]:
    """Refuse an artifact the profile cannot load; return notes on softer mismatches."""
    fmt = manifest.format
    if fmt not in ("onnx", "onnx-static", "tflite"):
        raise UnsupportedError(
            f"{source} is a {fmt} artifact; slmedge bundle packages ONNX artifacts (onnx, "
            "onnx-static) and TFLite ones (tflite)")
    wants_tflite = ArtifactFormat.tflite in profile.artifact.formats
    if wants_tflite and fmt != "tflite":
        raise UsageError(
            f"profile {profile.name} loads .tflite (engine litert) but {source} is a {fmt} "
            f"artifact; export one first: slmedge export --model SRC --profile {profile.name} "
            "--output DIR (or --format tflite)")
    if not wants_tflite and fmt == "tflite":
        raise UsageError(
            f"{source} is a TFLite artifact but profile {profile.name} loads ONNX with ONNX "
            "Runtime; bundle it with a profile whose artifact.formats is [tflite] (runtime.engine "
            "litert), or export ONNX for this profile")
    if fmt == "tflite":
        have = manifest.tflite.context_length if manifest.tflite else None
        want = profile.shapes.context_length
        if profile.shapes.policy is ShapePolicy.static and want and have != want:
            return [f"profile {profile.name} states context_length {want}; the TFLite graph's "
                    f"KV cache holds {have} (export with --profile {profile.name} to match)"]
        return []
    static = manifest.static is not None
    wants_static = profile.shapes.policy is ShapePolicy.static
    if static != wants_static:
        raise UsageError(
            f"profile {profile.name} wants {profile.shapes.policy.value} shapes but {source} has "
            f"{'static' if static else 'dynamic'} shapes; export for this profile first: "
            f"slmedge export --model SRC --profile {profile.name} --output DIR")
    return []


#: ORT format keeps every initializer inside the ``.ort`` file. Checked with onnxruntime
#: 1.32.0: a graph whose 256x256 weight sat in external data became a 263,600-byte ``.ort``
#: that runs with the data file gone, and the session options that write external
#: initializers (``session.optimized_model_external_initializers_file_name``) had no effect on
#: ORT-format output. So the ``.ort`` of each static graph (prefill, decode) carries its own
#: copy of the weights, where the ``.onnx`` graphs share one external data file.
ORT_FORMAT_INLINES_WEIGHTS = True
BUNDLE_FORMATS = ("onnx", "ort")


@dataclass
class Layout:
    """What a bundle ships of an artifact, for the one model format the app loads."""

    format: str  #: onnx, ort or tflite
    why: str
    files: list[str]  #: artifact files to copy
    graphs: dict[str, str]  #: bundle graph file -> the artifact's .onnx it is or came from
    model_file: str
    static: dict | None  #: the artifact's static section, naming the bundle's graph files
    weights_copies: int  #: how many times the model weights are in the bundle


def bundle_layout(src: Manifest, profile: DeviceProfile,
                  requested: str | None = None) -> Layout:
    """The files of a bundle in the format ``requested`` (``onnx`` or ``ort``), by default the
    first of the profile's ``artifact.formats`` the artifact has. One format only: an app
    loads either the ``.onnx`` graphs (with their shared external weights) or the ``.ort``
    ones, and shipping both put the weights in the bundle three times (static graphs)."""
    files = src.files
    if src.format == "tflite":
        return Layout("tflite", f"profile {profile.name} loads .tflite (engine litert)",
                      sorted(files), {}, src.model_file, None, 1)
    listed = [f.value for f in profile.artifact.formats]
    ort_files = src.ort_format.files if src.ort_format else []
    if requested is not None:
        if requested not in listed:
            raise UsageError(f"profile {profile.name} loads {', '.join(listed)}; --format "
                             f"{requested} is not one of them")
        if requested == "ort" and not ort_files:
            raise UsageError(f"--format ort: the artifact has no .ort files; export with "
                             f"--profile {profile.name} to get them")
        fmt = requested
    else:
        fmt = "ort" if listed[0] == "ort" and ort_files else "onnx"
    onnx_graphs = src.graph_files()
    # the static section as the bundle manifest and the snippets carry it (JSON)
    static = src.static.model_dump(mode="json", exclude_unset=True) if src.static else None
    if fmt == "onnx":
        left_out = f"; left out {', '.join(ort_files)} (--format ort ships those)" \
            if ort_files else ""
        shared = f" share the external weights file {static['weights_file']}" \
            if static and static.get("weights_file") else ""
        chosen = ("chosen with --format" if requested else "the profile's first format"
                  if listed[0] == "onnx" else "the artifact has no .ort files")
        why = f"{chosen}: {', '.join(onnx_graphs)}{shared}{left_out}"
        return Layout("onnx", why, sorted(f for f in files if f not in ort_files),
                      {g: g for g in onnx_graphs}, src.model_file or onnx_graphs[-1],
                      static, 1)
    to_ort = {g: f"{Path(g).stem}.ort" for g in onnx_graphs}  # convert_to_ort's names
    missing = [o for o in to_ort.values() if o not in ort_files]
    if missing:
        raise ArtifactError(f"the artifact's ort_format section lacks {', '.join(missing)}; "
                            f"export it again with --profile {profile.name}")
    ship = sorted(f for f, meta in files.items()
                  if f in ort_files or meta.role != "model")
    if static:
        static = {**static, "prefill_file": to_ort[static["prefill_file"]],
                  "decode_file": to_ort[static["decode_file"]], "weights_file": None}
    copies = len(onnx_graphs) if ORT_FORMAT_INLINES_WEIGHTS else 1
    chosen = "chosen with --format" if requested else "the profile's first format"
    why = (f"{chosen}: ORT format, for an ONNX Runtime build that loads only .ort (minimal "
           "build): "
           f"{', '.join(to_ort.values())}; ORT format keeps the weights inside each .ort file"
           + (f", so the bundle holds them {copies} times" if copies > 1 else ""))
    model_file = to_ort.get(src.model_file, to_ort[onnx_graphs[-1]])
    return Layout("ort", why, ship, {o: g for g, o in to_ort.items()}, model_file, static, copies)


def ort_graph_facts(ort_files: dict[str, Path], converted_with: str | None) -> dict[str, dict]:
    """Per ``.ort`` file of a bundle: :func:`~slmedge.runtimes.check.ort_format.ort_file_facts` (its
    ORT format version and the first release that reads it, IR version, opsets, and the
    onnxruntime that converted it, from the artifact manifest's ``versions``)."""
    return {name: ort_file_facts(path, name, converted_with)
            for name, path in sorted(ort_files.items())}


def _runtime_section(facts: dict, src: Manifest | BundleManifest,
                     ort_files: dict[str, Path] | None = None
                     ) -> tuple[dict | None, dict | None, str | None]:
    """``(onnxruntime, litert, minimum ORT version)`` sections of the bundle manifest;
    ``ort_files``: the bundle's ``.ort`` graphs, whose format version can raise the minimum."""
    if src.format == "tflite":
        return None, {"verified_with": litert_version(),
                      "export_versions": src.tflite.versions if src.tflite else None}, None
    import onnxruntime as ort

    minimum = raise_minimum(minimum_onnxruntime(facts), [
        format_requirement(name, read_ort_header(path, name)["format_version"])
        for name, path in sorted((ort_files or {}).items())])
    return ({"minimum": minimum["version"], "because": minimum["because"],
             "unknown_ops": minimum["unknown"], "verified_with": ort.__version__},
            None, minimum["version"])


def build_bundle(source: str | Path, profile: DeviceProfile, output: str | Path, *,
                 make_zip: bool = False, overwrite: bool = False, command: str | None = None,
                 say: Say | None = None, model_format: str | None = None) -> dict:
    """Write the bundle of artifact ``source`` for ``profile`` to ``output`` (atomically) and
    return its manifest; with ``make_zip`` also ``output.zip``. ``model_format``: ``onnx`` or
    ``ort`` (:func:`bundle_layout`; default: the profile's first format the artifact has)."""
    say = say or (lambda _m: None)
    source, output = Path(source), Path(output)
    artifact = open_artifact(source)
    if not artifact.files:
        raise ArtifactError(f"{source} has no file table in its manifest; export it again")
    problems = artifact.verify_hashes()
    if problems:
        raise ArtifactError(f"{source} does not match its manifest: {'; '.join(problems)}; "
                            "export it again before bundling")
    src = artifact.info
    if src is None or isinstance(src, BundleManifest):
        raise UsageError(f"{source} is {'a bundle' if src else 'a bare model file'}, not an "
                         "artifact directory; bundle what slmedge export wrote")
    notes = _check_fit(src, profile, source)
    layout = bundle_layout(src, profile, model_format)
    zip_path = output.parent / f"{output.name}.zip"
    if make_zip and zip_path.exists() and not overwrite:
        raise UsageError(f"'{zip_path}' exists; pass --overwrite to replace it")
    check_output(output, overwrite)
    bench, bench_note = last_bench(source)
    if bench_note:
        notes.append(bench_note)
    with staged_directory(output, overwrite=overwrite) as stage:
        say(f"copying {len(layout.files)} of {len(artifact.files)} files from {source} "
            f"({layout.format})")
        roles = {}
        for rel in layout.files:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, stage / rel)
            roles[rel] = "model" if src.files[rel].role == "model" else (
                "tokenizer" if rel in TOKENIZER_FILES else "support")
        # The .onnx each graph is (a staged copy, changed below) or was converted from.
        onnx_of = {g: stage / g if layout.format == "onnx" else source / src_g
                   for g, src_g in layout.graphs.items()}
        changes = []
        for g in layout.graphs if layout.format == "onnx" else ():
            if pin_logits_to_keep(stage / g):
                changes.append(f"{g}: input logits_to_keep -> initializer 0 (logits of every "
                               "position), because onnxruntime-genai does not feed it")
        if layout.format == "ort":
            config, why = None, ("the bundle ships ORT format (.ort); genai_config.json is "
                                 "written for .onnx bundles (--format onnx)")
        else:
            config, why = genai_config(src, stage, profile)
        if config is not None:
            (stage / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            roles[GENAI_CONFIG] = "support"
        if ArtifactFormat.ort in profile.artifact.formats and \
                not (src.ort_format and src.ort_format.files):
            notes.append(f"profile {profile.name} lists the .ort format but the artifact has no "
                         f".ort files; export with --profile {profile.name} to get them")
        facts = {g: graph_facts(path) for g, path in onnx_of.items()}
        static = layout.static and {
            **layout.static,
            "io": {kind: graph_signature(onnx_of[layout.static[f"{kind}_file"]])
                   for kind in ("prefill", "decode")}}
        ort_section, litert_section, minimum = _runtime_section(
            facts, src, {g: stage / g for g in layout.graphs} if layout.format == "ort" else None)
        say("recording a parity reference with slmedge's runtime")
        bundle_manifest = {
            "kind": "bundle", "schema_version": BUNDLE_SCHEMA_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "source": {"path": str(source.absolute()),
                       "manifest_sha256": sha256_file(source / MANIFEST_NAME)},
            "format": src.format, "model_file": layout.model_file,
            "model_format": {"shipped": layout.format, "why": layout.why,
                             "profile_formats": [f.value for f in profile.artifact.formats],
                             "weights_copies": layout.weights_copies,
                             "converted_from": {g: s for g, s in layout.graphs.items() if g != s}},
            **({"static": static} if static else {}),
            **({"ort_format": {**json_of(src.ort_format), "graphs": ort_graph_facts(
                {g: stage / g for g in layout.graphs}, src.versions.get("onnxruntime"))}}
               if layout.format == "ort" else {}),
            **({"tflite": json_of(src.tflite)} if src.tflite else {}),
            "architecture": json_of(src.architecture),
            "stop_token_ids": src.stop_token_ids,
            "profile": {"name": profile.name, **profile.model_dump(mode="json")},
            # a quantized static export keeps its card (vs the float graphs) in quantization
            "recipe": json_of(src.recipe),
            "quality": json_of(src.card()),
            "quantization": json_of(src.quantization),
            # the gate the export was held to and whether it passed (since issue 13 a static
            # or TFLite card's gate is the manifest's, no longer inside the card)
            "gate": json_of(src.gate),
            "source_verification": json_of(src.verification),
            "onnx": facts,
            "onnxruntime": ort_section,
            **({"litert": litert_section} if litert_section else {}),
            "genai_config": GENAI_CONFIG if config is not None else None,
            "genai_config_reason": why,
            "last_bench": bench,
            "last_bench_note": bench_note,
            "graph_changes": changes,
            "notes": notes,
        }
        # Parity runs on the staged files, through the same loader verify uses.
        save_manifest(stage, {**bundle_manifest, "files": {
            rel: {"sha256": "", "size": (stage / rel).stat().st_size} for rel in roles}},
            indent=None)
        bundle_manifest["parity"] = parity_reference(stage)
        files = sorted(roles)
        genai = genai_dependency() if config is not None else None
        if genai:
            bundle_manifest["onnxruntime_genai"] = genai
        ort_version = ort_section["verified_with"] if ort_section else ""
        weights = (static or {}).get("weights_file") or next(
            (f for f in files if f.endswith(".data") and roles[f] == "model"), None)
        for rel, text in render_snippets(profile, layout.model_file, files,
                                         ort_version, minimum, genai=genai, genai_reason=why,
                                         tflite=json_of(src.tflite), static=static,
                                         weights_file=weights).items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
            roles[rel] = "snippet"
        bundle_manifest["files"] = {
            rel: {"sha256": sha256_file(stage / rel), "size": (stage / rel).stat().st_size,
                  "role": roles[rel]} for rel in sorted(roles)}
        save_manifest(stage, bundle_manifest)
        if make_zip:
            say(f"writing {zip_path}")
            _write_zip(stage, zip_path)
    return bundle_manifest


def _write_zip(root: Path, zip_path: Path) -> None:
    """Zip the bundle's files (paths relative to the bundle), renamed into place at the end."""
    partial = zip_path.parent / f".{zip_path.name}.partial-{os.getpid()}"
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(root).as_posix())
        os.replace(partial, zip_path)
    finally:
        partial.unlink(missing_ok=True)
