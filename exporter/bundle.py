"""``slmedge bundle``: an exported artifact made ready to drop into an app.

A bundle directory holds the model file(s), the tokenizer files, a ``genai_config.json``
for ONNX Runtime GenAI (when GenAI can express the graphs), integration snippets rendered
from the device profile, and ``manifest.json``: sha256 and size of every file, each graph's
opset / IR version / contrib ops, the minimum ONNX Runtime version that runs it
(``slmedge.runtimes.verify``'s table), the profile, recipe, quality card, and a parity
reference (greedy tokens of a fixed prompt through slmedge's runtime) that
``slmedge verify`` replays.

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
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import numpy as np

from slmedge.device_profiles import DeviceProfile
from slmedge.device_profiles.schema import ShapePolicy
from slmedge.runtimes.artifact import MANIFEST_NAME, open_artifact, sha256_file
from slmedge.runtimes.errors import ArtifactError, UnsupportedError, UsageError
from slmedge.runtimes.verify import minimum_onnxruntime

from .manifest import onnx_facts
from .staging import check_output, staged_directory

BUNDLE_SCHEMA_VERSION = 1
GENAI_CONFIG = "genai_config.json"
#: Tokenizer and generation files an app needs beside the graph (copied when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja", "config.json")
#: model_type values whose graphs use GenAI's decoder contract (input_ids, attention_mask,
#: position_ids, past_key_values.N.key/value -> logits, present.N.key/value). Each was loaded
#: by onnxruntime-genai 0.18.0 with a tiny fused Llama graph; it rejects unknown types
#: ("Unsupported model_type in config.json").
GENAI_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "phi3"})
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


def genai_config(manifest: dict, root: Path, profile: DeviceProfile) -> tuple[dict | None, str]:
    """``(genai_config.json contents, why)`` for the bundle at ``root``; ``(None, reason)``
    when GenAI cannot express the artifact."""
    if manifest.get("static"):
        return None, ("static-shape prefill/decode graphs over a fixed window: "
                      "genai_config.json describes one decoder with a growing KV cache, so "
                      "run this bundle with slmedge's runtime or ONNX Runtime directly")
    if manifest.get("format", "onnx") != "onnx":
        return None, f"format {manifest.get('format')} is not an ONNX decoder"
    model_type = manifest.get("architecture", {}).get("model_type")
    if model_type not in GENAI_MODEL_TYPES:
        return None, (f"model_type {model_type!r} has not been checked with onnxruntime-genai "
                      f"(checked: {', '.join(sorted(GENAI_MODEL_TYPES))})")
    try:
        hf = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        return None, "the artifact has no config.json (hidden size, attention heads)"
    inputs, meta = _graph_meta(root / manifest["model_file"])
    if "logits_to_keep" in inputs:
        return None, "the graph still takes logits_to_keep, which GenAI does not feed"
    arch = manifest["architecture"]
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
    eos = manifest.get("stop_token_ids") or gen.get("eos_token_id") or hf.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    pad = gen.get("pad_token_id", hf.get("pad_token_id"))
    config = {
        "model": {
            "bos_token_id": gen.get("bos_token_id", hf.get("bos_token_id")),
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": manifest["model_file"],
                "head_size": arch["head_dim"],
                "hidden_size": hf["hidden_size"],
                "inputs": names,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": hf["num_attention_heads"],
                "num_hidden_layers": arch["num_layers"],
                "num_key_value_heads": arch["kv_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos[0],
            "type": model_type,
            "vocab_size": arch["vocab_size"],
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": shared,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    why = ("GroupQueryAttention writes the KV cache in place (slmedge.kv_cache = shared_buffer): "
           "past_present_share_buffer true" if shared else
           "KV cache concatenated per step: past_present_share_buffer false")
    return config, why


# -- integration snippets ------------------------------------------------------------------------

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                          lstrip_blocks=True, keep_trailing_newline=True)
_ENV.filters["kstr"] = lambda s: json.dumps(str(s))  # a Kotlin / Swift string literal

_GRADLE = _ENV.from_string("""\
// Generated by slmedge bundle from profile {{ profile.name }}. ONNX Runtime {{ ort_version }} is
// the version this bundle was verified with; it needs at least {{ min_version }}.
dependencies {
    implementation("com.microsoft.onnxruntime:{{ artifact_id }}:{{ ort_version }}")
}
""")

_KOTLIN = _ENV.from_string("""\
// Generated by slmedge bundle from profile {{ profile.name }}: {{ profile.description }}
// Session creation with the profile's execution providers, in the profile's order.
package ai.slmedge.bundle

import android.content.Context
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
{% if nnapi %}
import ai.onnxruntime.providers.NNAPIFlags
import java.util.EnumSet
{% endif %}
import java.io.File

object SlmEdgeModel {
    /** Bundle files to ship in app/src/main/assets/{{ asset_dir }}/. */
    val ASSET_FILES = listOf(
{% for f in files %}
        {{ f | kstr }},
{% endfor %}
    )

    /** ONNX Runtime reads a model (and its external weights) from real files, not from the
     *  compressed APK: copy the assets to filesDir once. */
    fun copyAssets(context: Context): File {
        val dir = File(context.filesDir, {{ asset_dir | kstr }})
        for (name in ASSET_FILES) {
            val target = File(dir, name)
            if (target.exists()) continue
            target.parentFile?.mkdirs()
            context.assets.open({{ asset_dir | kstr }} + "/" + name).use { input ->
                target.outputStream().use { input.copyTo(it) }
            }
        }
        return dir
    }

    fun createSession(context: Context): OrtSession {
        val dir = copyAssets(context)
        val env = OrtEnvironment.getEnvironment()
        val options = OrtSession.SessionOptions()
{% if threads %}
        options.setIntraOpNumThreads({{ threads }})
{% endif %}
{% for p in providers %}
{% if p.name == "XnnpackExecutionProvider" %}
        options.addXnnpack(mapOf({% for k, v in p.options.items() %}{{ k | kstr }} to {{ v | kstr }}{{ ", " if not loop.last }}{% endfor %}))
{% elif p.name == "QNNExecutionProvider" %}
        options.addQnn(mapOf(
{% for k, v in p.options.items() %}
            {{ k | kstr }} to {{ v | kstr }},
{% endfor %}
        ))
{% elif p.name == "NnapiExecutionProvider" %}
        options.addNnapi({% if p.options %}EnumSet.of({% for k in p.options %}NNAPIFlags.{{ k | replace("NNAPI_FLAG_", "") }}{{ ", " if not loop.last }}{% endfor %}){% else %}EnumSet.noneOf(NNAPIFlags::class.java){% endif %})
{% elif p.name == "CPUExecutionProvider" %}
        // CPUExecutionProvider: always present, runs what the providers above do not take.
{% endif %}
{% endfor %}
{% if not allow_cpu_fallback %}
        // The profile makes silent CPU fallback an error.
        options.addConfigEntry("session.disable_cpu_ep_fallback", "1")
{% endif %}
        return env.createSession(File(dir, {{ model_file | kstr }}).path, options)
    }
}
""")

_SWIFT = _ENV.from_string("""\
// Generated by slmedge bundle from profile {{ profile.name }}: {{ profile.description }}
// Swift Package Manager:
//   .package(url: "https://github.com/microsoft/onnxruntime-swift-package-manager", exact: "{{ ort_version }}")
// CocoaPods:
//   pod 'onnxruntime-objc', '{{ ort_version }}'
// ONNX Runtime {{ ort_version }} is the version this bundle was verified with; it needs at least {{ min_version }}.
// Add the bundle files to the app target's resources ({{ files | length }} files).
import Foundation
import onnxruntime_objc

enum SlmEdgeModel {
    static func createSession() throws -> ORTSession {
        let env = try ORTEnv(loggingLevel: ORTLoggingLevel.warning)
        let options = try ORTSessionOptions()
{% if threads %}
        try options.setIntraOpNumThreads({{ threads }})
{% endif %}
{% for p in providers %}
{% if p.name == "CoreMLExecutionProvider" %}
        try options.appendCoreMLExecutionProvider(withOptionsV2: [
{% for k, v in p.options.items() %}
            {{ k | kstr }}: {{ v | kstr }},
{% endfor %}
        ])
{% elif p.name == "CPUExecutionProvider" %}
        // CPUExecutionProvider: always present, runs what the providers above do not take.
{% else %}
        try options.appendExecutionProvider({{ p.short | kstr }}, providerOptions: [
{% for k, v in p.options.items() %}
            {{ k | kstr }}: {{ v | kstr }},
{% endfor %}
        ])
{% endif %}
{% endfor %}
{% if not allow_cpu_fallback %}
        try options.addConfigEntry(withKey: "session.disable_cpu_ep_fallback", value: "1")
{% endif %}
        guard let path = Bundle.main.path(forResource: {{ model_stem | kstr }}, ofType: {{ model_ext | kstr }}) else {
            throw NSError(domain: "SlmEdgeModel", code: 1,
                          userInfo: [NSLocalizedDescriptionKey: "{{ model_file }} is not in the app bundle"])
        }
        return try ORTSession(env: env, modelPath: path, sessionOptions: options)
    }
}
""")

_PYTHON = _ENV.from_string("""\
# Generated by slmedge bundle from profile {{ profile.name }}: {{ profile.description }}
# pip install onnxruntime=={{ ort_version }}  (the bundle needs at least {{ min_version }})
import onnxruntime as ort

options = ort.SessionOptions()
{% if threads %}
options.intra_op_num_threads = {{ threads }}
{% endif %}
{% if not allow_cpu_fallback %}
options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
{% endif %}
providers = [
{% for p in providers %}
    ({{ p.name | kstr }}, {{ p.options | tojson }}),
{% endfor %}
]
session = ort.InferenceSession({{ model_file | kstr }}, options, providers=providers)
""")


def snippet_context(profile: DeviceProfile, model_file: str, files: list[str],
                    ort_version: str, min_version: str) -> dict:
    """Everything the snippet templates read, taken from the profile and the bundle."""
    providers = [{"name": name, "short": name.replace("ExecutionProvider", ""),
                  "options": options} for name, options in profile.provider_specs()]
    return {
        "profile": profile, "providers": providers, "threads": profile.runtime.threads,
        "allow_cpu_fallback": profile.runtime.allow_cpu_fallback,
        "nnapi": any(p["name"] == "NnapiExecutionProvider" for p in providers),
        "artifact_id": "onnxruntime-android-qnn" if profile.accelerator == "QNNExecutionProvider"
        else "onnxruntime-android",
        "model_file": model_file, "model_stem": Path(model_file).stem,
        "model_ext": Path(model_file).suffix.lstrip("."), "files": files,
        "asset_dir": "slmedge", "ort_version": ort_version, "min_version": min_version,
    }


def render_snippets(profile: DeviceProfile, model_file: str, files: list[str],
                    ort_version: str, min_version: str) -> dict[str, str]:
    """``{relative path: text}`` of the integration snippets for the profile's platform, plus
    ``snippets/session.json`` (the same providers and options as data)."""
    ctx = snippet_context(profile, model_file, files, ort_version, min_version)
    os_name = profile.device.os.value
    if os_name == "android":
        out = {"snippets/android/build.gradle.kts": _GRADLE.render(ctx),
               "snippets/android/SlmEdgeModel.kt": _KOTLIN.render(ctx)}
    elif os_name in ("ios", "macos"):
        out = {"snippets/ios/SlmEdgeModel.swift": _SWIFT.render(ctx)}
    else:
        out = {"snippets/python/session.py": _PYTHON.render(ctx)}
    out["snippets/session.json"] = json.dumps({
        "profile": profile.name, "model_file": model_file, "threads": ctx["threads"],
        "allow_cpu_fallback": ctx["allow_cpu_fallback"],
        "providers": [{"name": p["name"], "options": p["options"]} for p in ctx["providers"]],
    }, indent=2) + "\n"
    return out


# -- parity reference -------------------------------------------------------------------------


def parity_reference(root: Path, tokens: int = PARITY_TOKENS) -> dict:
    """Greedy tokens and first-step top logits of a fixed prompt through slmedge's runtime,
    recorded so ``slmedge verify`` can replay them (1 thread, CPU)."""
    import onnxruntime as ort

    from slmedge.runtimes.generation import generate
    from slmedge.runtimes.static_decoder import open_decoder

    artifact = open_artifact(root)
    decoder = open_decoder(artifact, threads=1)
    vocab = artifact.manifest.get("architecture", {}).get("vocab_size") or 2
    ids: list[int] = []
    if (root / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(root / "tokenizer.json")).encode(PARITY_PROMPT).ids
    if not ids or max(ids) >= vocab:  # a tokenizer that does not fit the graph: fixed ids
        ids = [i % vocab for i in range(1, 9)]
    first = np.asarray(decoder.logits(ids)[-1], dtype=np.float64)
    top = np.argsort(-first)[:5]
    result = generate(decoder, ids, tokens)
    scale = float(np.max(np.abs(first)))
    return {"prompt": PARITY_PROMPT, "prompt_ids": [int(i) for i in ids],
            "greedy_tokens": [int(t) for t in result.tokens],
            "first_step": {"top_ids": [int(i) for i in top],
                           "top_logits": [float(first[i]) for i in top]},
            "atol": 1e-3 * max(1.0, scale),
            "runtime": f"slmedge OnnxDecoder, onnxruntime {ort.__version__}, CPU, 1 thread"}


# -- the bundle -----------------------------------------------------------------------------------


def _check_fit(manifest: dict, profile: DeviceProfile, source: Path) -> None:
    static = bool(manifest.get("static"))
    wants_static = profile.shapes.policy is ShapePolicy.static
    if manifest.get("format", "onnx") not in ("onnx", "onnx-static"):
        raise UnsupportedError(
            f"{source} is a {manifest.get('format')} artifact; slmedge bundle packages ONNX "
            "artifacts (onnx, onnx-static); export with the default format")
    if static != wants_static:
        raise UsageError(
            f"profile {profile.name} wants {profile.shapes.policy.value} shapes but {source} has "
            f"{'static' if static else 'dynamic'} shapes; export for this profile first: "
            f"slmedge export --model SRC --profile {profile.name} --output DIR")


def _graph_files(manifest: dict) -> list[str]:
    static = manifest.get("static")
    if static:
        return [static["prefill_file"], static["decode_file"]]
    return [manifest.get("model_file", "model.onnx")]


def build_bundle(source: str | Path, profile: DeviceProfile, output: str | Path, *,
                 make_zip: bool = False, overwrite: bool = False, command: str | None = None,
                 say: Say | None = None) -> dict:
    """Write the bundle of artifact ``source`` for ``profile`` to ``output`` (atomically) and
    return its manifest; with ``make_zip`` also ``output.zip``."""
    import onnxruntime as ort

    say = say or (lambda _m: None)
    source, output = Path(source), Path(output)
    artifact = open_artifact(source)
    if not artifact.files:
        raise ArtifactError(f"{source} has no file table in its manifest; export it again")
    problems = artifact.verify_hashes()
    if problems:
        raise ArtifactError(f"{source} does not match its manifest: {'; '.join(problems)}; "
                            "export it again before bundling")
    src = artifact.manifest
    _check_fit(src, profile, source)
    zip_path = output.parent / f"{output.name}.zip"
    if make_zip and zip_path.exists() and not overwrite:
        raise UsageError(f"'{zip_path}' exists; pass --overwrite to replace it")
    check_output(output, overwrite)
    notes = []
    graphs = _graph_files(src)
    with staged_directory(output, overwrite=overwrite) as stage:
        say(f"copying {len(artifact.files)} files from {source}")
        roles = {}
        for rel, meta in artifact.files.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, stage / rel)
            roles[rel] = "model" if meta.get("role") == "model" else (
                "tokenizer" if rel in TOKENIZER_FILES else "support")
        changes = []
        for g in graphs:
            if pin_logits_to_keep(stage / g):
                changes.append(f"{g}: input logits_to_keep -> initializer 0 (logits of every "
                               "position), because onnxruntime-genai does not feed it")
        config, why = genai_config(src, stage, profile)
        if config is not None:
            (stage / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            roles[GENAI_CONFIG] = "support"
        if "ort" in [f.value for f in profile.artifact.formats] and \
                not src.get("ort_format", {}).get("files"):
            notes.append(f"profile {profile.name} lists the .ort format but the artifact has no "
                         f".ort files; export with --profile {profile.name} to get them")
        facts = {g: graph_facts(stage / g) for g in graphs}
        minimum = minimum_onnxruntime(facts)
        say("recording a parity reference with slmedge's runtime")
        bundle_manifest = {
            "kind": "bundle", "schema_version": BUNDLE_SCHEMA_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "source": {"path": str(source.absolute()),
                       "manifest_sha256": sha256_file(source / MANIFEST_NAME)},
            "format": src.get("format", "onnx"), "model_file": src.get("model_file"),
            **({"static": src["static"]} if src.get("static") else {}),
            **({"ort_format": src["ort_format"]} if src.get("ort_format") else {}),
            "architecture": src.get("architecture"), "stop_token_ids": src.get("stop_token_ids"),
            "profile": {"name": profile.name, **profile.model_dump(mode="json")},
            "recipe": src.get("recipe"), "quality": src.get("quality"),
            "quantization": src.get("quantization"),
            "source_verification": src.get("verification"),
            "onnx": facts,
            "onnxruntime": {"minimum": minimum["version"], "because": minimum["because"],
                            "unknown_ops": minimum["unknown"], "verified_with": ort.__version__},
            "genai_config": GENAI_CONFIG if config is not None else None,
            "genai_config_reason": why,
            "graph_changes": changes,
            "notes": notes,
        }
        # Parity runs on the staged files, through the same loader verify uses.
        (stage / MANIFEST_NAME).write_text(json.dumps({**bundle_manifest, "files": {
            rel: {"sha256": "", "size": (stage / rel).stat().st_size} for rel in roles}}))
        bundle_manifest["parity"] = parity_reference(stage)
        files = sorted(roles)
        for rel, text in render_snippets(profile, src.get("model_file", graphs[-1]), files,
                                         ort.__version__, minimum["version"]).items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
            roles[rel] = "snippet"
        bundle_manifest["files"] = {
            rel: {"sha256": sha256_file(stage / rel), "size": (stage / rel).stat().st_size,
                  "role": roles[rel]} for rel in sorted(roles)}
        (stage / MANIFEST_NAME).write_text(json.dumps(bundle_manifest, indent=2) + "\n")
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
