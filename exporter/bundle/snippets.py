"""Integration snippets of a bundle: templates rendered from the device profile.

Every value in a snippet (dependency versions, providers and their options, threads, the
CPU-fallback switch, file names, TFLite signatures) comes from the profile object or the
bundle; nothing is a hand-kept copy. ``snippets/session.json`` holds the same session recipe
as data.

Where the dependencies come from (looked up, not guessed):

- ONNX Runtime: Maven Central ``com.microsoft.onnxruntime:onnxruntime-android`` (an AAR,
  https://central.sonatype.com/artifact/com.microsoft.onnxruntime/onnxruntime-android) and,
  with the QNN execution provider, ``com.microsoft.onnxruntime:onnxruntime-android-qnn``
  (https://central.sonatype.com/artifact/com.microsoft.onnxruntime/onnxruntime-android-qnn).
- ONNX Runtime GenAI on Android has no Maven coordinates to depend on: its Java API page
  says "Package publication is pending" (https://onnxruntime.ai/docs/genai/api/java.html),
  the README marks Java "Requires build from source", and apps that use it vendor the AAR
  that GitHub releases carry as ``onnxruntime-genai-android-X.Y.Z.aar``
  (https://github.com/microsoft/onnxruntime-genai/releases/download/vX.Y.Z/...; the
  maintainers point to the prebuilt release AAR in microsoft/onnxruntime-genai#1254). The
  GenAI AAR loads ``libonnxruntime.so`` from the ONNX Runtime AAR, so both lines are needed.
  The Gradle snippet therefore depends on the release file in ``app/libs/`` and says where to
  download it; a ``com.microsoft.onnxruntime:onnxruntime-genai-android`` line would not
  resolve (microsoft/onnxruntime-genai#806).
- LiteRT: Google Maven ``com.google.ai.edge.litert:litert`` (the TensorFlow Lite Interpreter
  API under its new name; https://ai.google.dev/edge/litert/migration).
- iOS: the Swift package ``microsoft/onnxruntime-swift-package-manager`` or the CocoaPod
  ``onnxruntime-objc``.
"""

from __future__ import annotations

import json
import re

import jinja2

from slmedge.device_profiles import DeviceProfile
from slmedge.device_profiles.schema import Engine

#: onnxruntime-genai release the bundle's genai_config.json is checked against (its test
#: loads a bundle in it); tools/constraints.txt pins the same.
GENAI_CHECKED_VERSION = "0.18.0"
GENAI_AAR_URL = ("https://github.com/microsoft/onnxruntime-genai/releases/download/"
                 "v{version}/onnxruntime-genai-android-{version}.aar")
#: ai-edge-litert release the TFLite export and its tests run with (setup.cfg: >=2.3).
LITERT_CHECKED_VERSION = "2.3.0"

#: Kotlin shared by the ONNX Runtime and LiteRT snippets: assets -> filesDir, copied once.
_KOTLIN_COPY_ASSETS = """\
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
"""

#: How a static-shape bundle's two graphs are used (runtimes/sessions/static_decoder.py runs them the
#: same way); names, dtypes and shapes come from the graphs. ``c``: the comment prefix.
_STATIC_DOC = """\
{{ c }}Static shapes: two graphs over a fixed window of {{ static.context_length }} tokens.
{% if static.weights_file %}
{{ c }}Both read their weights from {{ static.weights_file }}: keep it in the same folder.
{% endif %}
{{ c }}- prefill ({{ static.prefill_file }}): the prompt, {{ static.prefill_chunk }} tokens per run; the last chunk is
{{ c }}  padded (padded tokens are masked out and their KV entries are not written).
{{ c }}- decode ({{ static.decode_file }}): then each generated token, one per run.
{{ c }}Both take the whole KV cache as fixed-size inputs (slot j holds position j) and an
{{ c }}additive validity mask ({{ static.masks | map(attribute="name") | join(", ") }}): 0 where a query may attend (cache slots
{{ c }}below the number of tokens held, and this run's tokens up to itself), the most negative
{{ c }}value elsewhere. They return logits and this run's new KV entries, which the app writes
{{ c }}into their slots.
{% for g in static.graphs %}
{{ c }}{{ g.kind }} inputs:  {{ g.inputs | join(", ") }}
{{ c }}{{ g.kind }} outputs: {{ g.outputs | join(", ") }}
{% endfor %}
"""

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                          lstrip_blocks=True, keep_trailing_newline=True,
                          loader=jinja2.DictLoader({
                              "kotlin_copy_assets": _KOTLIN_COPY_ASSETS,
                              "static_doc": _STATIC_DOC,
                              "static_doc_kotlin": '{% with c = "    // " %}'
                                                   '{% include "static_doc" %}{% endwith %}',
                              "static_doc_swift": '{% with c = "    /// " %}'
                                                  '{% include "static_doc" %}{% endwith %}',
                              "static_doc_python": '{% with c = "# " %}'
                                                   '{% include "static_doc" %}{% endwith %}'}))
_ENV.filters["kstr"] = lambda s: json.dumps(str(s))  # a Kotlin / Swift string literal

_GRADLE = _ENV.from_string("""\
// Generated by slmedge bundle from profile {{ profile.name }}. ONNX Runtime {{ ort_version }} is
// the version this bundle was verified with; it needs at least {{ min_version }}.
dependencies {
    // ONNX Runtime AAR (Maven Central).
    implementation("com.microsoft.onnxruntime:{{ artifact_id }}:{{ ort_version }}")
{% if genai %}
    // ONNX Runtime GenAI {{ genai.version }} runs genai_config.json{% if genai.needs_onnxruntime %} (its release needs
    // onnxruntime {{ genai.needs_onnxruntime }}){% endif %}. It is not on Maven Central: download the release
    // AAR into app/libs/ first:
    //   {{ genai.aar_url }}
    implementation(files("libs/{{ genai.aar_file }}"))
{% else %}
    // No ONNX Runtime GenAI AAR: this bundle has no genai_config.json ({{ genai_reason }}).
{% endif %}
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
{% if static %}

{% include "static_doc_kotlin" %}
    const val PREFILL_FILE = {{ static.prefill_file | kstr }}
    const val DECODE_FILE = {{ static.decode_file | kstr }}
    const val CONTEXT_LENGTH = {{ static.context_length }}
    const val PREFILL_CHUNK = {{ static.prefill_chunk }}
    /** Additive mask inputs -> sliding window in tokens (0: the whole context). */
    val MASK_INPUTS = mapOf({% for m in static.masks %}{{ m.name | kstr }} to {{ m.window or 0 }}{{ ", " if not loop.last }}{% endfor %})
    /** KV cache fed to both graphs, [{{ static.kv_shape | join(", ") }}] {{ static.kv_dtype }} each. */
    val KV_INPUTS = listOf(
{% for n in static.kv_inputs %}
        {{ n | kstr }},
{% endfor %}
    )
    /** New KV entries returned, in KV_INPUTS order; write them into slots [length, length + n). */
    val KV_OUTPUTS = listOf(
{% for n in static.kv_outputs %}
        {{ n | kstr }},
{% endfor %}
    )
{% endif %}

    /** ONNX Runtime reads a model (and its external weights) from real files, not from the
     *  compressed APK: copy the assets to filesDir once. */
{% include "kotlin_copy_assets" %}

    /** The profile's providers and options{% if static %}, the same for both graphs{% endif %}. */
    fun sessionOptions(): OrtSession.SessionOptions {
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
        return options
    }
{% if static %}

    class Sessions(val prefill: OrtSession, val decode: OrtSession)

    fun createSessions(context: Context): Sessions {
        val dir = copyAssets(context)
        val env = OrtEnvironment.getEnvironment()
        val options = sessionOptions()
        // Prompt: chunks of PREFILL_CHUNK tokens, the last one padded.
        val prefill = env.createSession(File(dir, PREFILL_FILE).path, options)
        // Then one generated token per run.
        val decode = env.createSession(File(dir, DECODE_FILE).path, options)
        return Sessions(prefill, decode)
    }
{% else %}

    fun createSession(context: Context): OrtSession {
        val dir = copyAssets(context)
        val env = OrtEnvironment.getEnvironment()
        return env.createSession(File(dir, {{ model_file | kstr }}).path, sessionOptions())
    }
{% endif %}
}
""")

_GRADLE_LITERT = _ENV.from_string("""\
// Generated by slmedge bundle from profile {{ profile.name }}. LiteRT {{ litert_version }} is the
// version this bundle was checked with (ai-edge-litert in Python).
dependencies {
    // LiteRT AAR (Google Maven): the TensorFlow Lite Interpreter API, package org.tensorflow.lite.
    implementation("com.google.ai.edge.litert:litert:{{ litert_version }}")
}
""")

_KOTLIN_LITERT = _ENV.from_string("""\
// Generated by slmedge bundle from profile {{ profile.name }}: {{ profile.description }}
// A LiteRT interpreter on {{ model_file }}; the KV cache lives in the model's variables, so the
// prefill signatures and "decode" share it.
package ai.slmedge.bundle

import android.content.Context
import org.tensorflow.lite.Interpreter
import java.io.File

object SlmEdgeModel {
    /** Bundle files to ship in app/src/main/assets/{{ asset_dir }}/. */
    val ASSET_FILES = listOf(
{% for f in files %}
        {{ f | kstr }},
{% endfor %}
    )

    /** The graph's signatures (runSignature keys): {{ signatures | length }} from the export. */
    val SIGNATURES = listOf(
{% for s in signatures %}
        {{ s | kstr }},
{% endfor %}
    )
    const val CONTEXT_LENGTH = {{ context_length }}

    /** Copy the assets to filesDir once (an uncompressed file the interpreter can map). */
{% include "kotlin_copy_assets" %}

    fun createInterpreter(context: Context): Interpreter {
        val dir = copyAssets(context)
        val options = Interpreter.Options()
{% if threads %}
        options.setNumThreads({{ threads }})
{% endif %}
        val interpreter = Interpreter(File(dir, {{ model_file | kstr }}), options)
        check(interpreter.signatureKeys.toSet() == SIGNATURES.toSet()) {
            "{{ model_file }} does not have the bundle's signatures"
        }
        return interpreter
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
// Add the bundle files to the app target's resources ({{ files | length }} files){% if weights_file %}; {{ weights_file }}
// must sit in the same folder as the graphs that read it{% endif %}.
import Foundation
import onnxruntime_objc

enum SlmEdgeModel {
{% if static %}
{% include "static_doc_swift" %}
    static let prefillFile = {{ static.prefill_file | kstr }}
    static let decodeFile = {{ static.decode_file | kstr }}
    static let contextLength = {{ static.context_length }}
    static let prefillChunk = {{ static.prefill_chunk }}
    /// Additive mask inputs -> sliding window in tokens (0: the whole context).
    static let maskInputs: [String: Int] = [{% for m in static.masks %}{{ m.name | kstr }}: {{ m.window or 0 }}{{ ", " if not loop.last }}{% endfor %}]
    /// KV cache fed to both graphs, [{{ static.kv_shape | join(", ") }}] {{ static.kv_dtype }} each.
    static let kvInputs = [
{% for n in static.kv_inputs %}
        {{ n | kstr }},
{% endfor %}
    ]
    /// New KV entries returned, in kvInputs order; write them into slots [length, length + n).
    static let kvOutputs = [
{% for n in static.kv_outputs %}
        {{ n | kstr }},
{% endfor %}
    ]

{% endif %}
    /// The profile's providers and options{% if static %}, the same for both graphs{% endif %}.
    static func sessionOptions() throws -> ORTSessionOptions {
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
        return options
    }

    static func resourcePath(_ file: String) throws -> String {
        guard let path = Bundle.main.path(forResource: file, ofType: nil) else {
            throw NSError(domain: "SlmEdgeModel", code: 1,
                          userInfo: [NSLocalizedDescriptionKey: "\\(file) is not in the app bundle"])
        }
        return path
    }
{% if static %}

    struct Sessions {
        let prefill: ORTSession
        let decode: ORTSession
    }

    static func createSessions() throws -> Sessions {
        let env = try ORTEnv(loggingLevel: ORTLoggingLevel.warning)
        let options = try sessionOptions()
        // Prompt: chunks of prefillChunk tokens, the last one padded.
        let prefill = try ORTSession(env: env, modelPath: try resourcePath(prefillFile), sessionOptions: options)
        // Then one generated token per run.
        let decode = try ORTSession(env: env, modelPath: try resourcePath(decodeFile), sessionOptions: options)
        return Sessions(prefill: prefill, decode: decode)
    }
{% else %}

    static func createSession() throws -> ORTSession {
        let env = try ORTEnv(loggingLevel: ORTLoggingLevel.warning)
        return try ORTSession(env: env, modelPath: try resourcePath({{ model_file | kstr }}), sessionOptions: try sessionOptions())
    }
{% endif %}
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
{% if static %}
{% include "static_doc_python" %}
prefill = ort.InferenceSession({{ static.prefill_file | kstr }}, options, providers=providers)
decode = ort.InferenceSession({{ static.decode_file | kstr }}, options, providers=providers)
{% else %}
session = ort.InferenceSession({{ model_file | kstr }}, options, providers=providers)
{% endif %}
""")

_PYTHON_LITERT = _ENV.from_string("""\
# Generated by slmedge bundle from profile {{ profile.name }}: {{ profile.description }}
# pip install ai-edge-litert=={{ litert_version }}
from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter(model_path={{ model_file | kstr }}{% if threads %}, num_threads={{ threads }}{% endif %})
SIGNATURES = {{ signatures | tojson }}  # prefill_N and decode share the KV cache variables
assert set(interpreter.get_signature_list()) == set(SIGNATURES)
""")


def genai_dependency(genai_reason: str | None = None) -> dict:
    """The onnxruntime-genai release to depend on: the installed one if any (the bundle's
    genai_config.json is what that release loads), else the checked one; with the ONNX Runtime
    range its Python wheel declares (the same native library the AAR carries)."""
    from importlib import metadata

    try:
        version = metadata.version("onnxruntime-genai")
        requires = metadata.requires("onnxruntime-genai") or []
    except metadata.PackageNotFoundError:
        version, requires = GENAI_CHECKED_VERSION, []
    needs = next((r.split(";")[0][len("onnxruntime"):].strip() for r in requires
                  if r.startswith("onnxruntime") and not r.startswith("onnxruntime-")
                  and not r.startswith("onnxruntime_")), None)
    return {"version": version, "needs_onnxruntime": needs or None,
            "aar_file": f"onnxruntime-genai-android-{version}.aar",
            "aar_url": GENAI_AAR_URL.format(version=version)}


def litert_version() -> str:
    """The installed ai-edge-litert version, else the one slmedge is checked with."""
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return LITERT_CHECKED_VERSION


_KV_TENSOR = re.compile(r"^(?P<prefix>\w+)\.(?P<layer>\d+)\.(?:key|value)$")


def _io_lines(tensors: list[dict]) -> list[str]:
    """``name dtype [shape]`` per graph input / output; a KV cache's per-layer tensors (same
    dtype and shape) are folded into one ``past_key_values.{0..L-1}.key/value`` line."""
    def describe(name: str, t: dict) -> str:
        return f"{name} {t['dtype']} [{', '.join(str(d) for d in t['shape'])}]"

    layers: dict[str, int] = {}
    for t in tensors:
        if m := _KV_TENSOR.match(t["name"]):
            layers[m["prefix"]] = max(layers.get(m["prefix"], 0), int(m["layer"]) + 1)
    lines, seen = [], set()
    for t in tensors:
        m = _KV_TENSOR.match(t["name"])
        if m is None:
            lines.append(describe(t["name"], t))
        elif m["prefix"] not in seen:
            seen.add(m["prefix"])
            n = layers[m["prefix"]]
            lines.append(describe(f"{m['prefix']}.{{0..{n - 1}}}.key/value", t))
    return lines


def static_context(static: dict) -> dict:
    """What the templates show of a static-shape bundle: its two graph files, the window, the
    mask inputs and the graphs' inputs / outputs (``static["io"]``, read from the graphs)."""
    io = static["io"]
    decode = io["decode"]
    kv_inputs = [t for t in decode["inputs"] if t["name"].startswith("past_key_values.")]
    return {
        "prefill_file": static["prefill_file"], "decode_file": static["decode_file"],
        "weights_file": static.get("weights_file"),
        "context_length": static["context_length"], "prefill_chunk": static["prefill_chunk"],
        "masks": [{"name": n, "window": w} for n, w in static["mask_inputs"].items()],
        "kv_inputs": [t["name"] for t in kv_inputs],
        "kv_outputs": [t["name"] for t in decode["outputs"] if t["name"].startswith("kv_new.")],
        "kv_shape": kv_inputs[0]["shape"] if kv_inputs else [],
        "kv_dtype": kv_inputs[0]["dtype"] if kv_inputs else "",
        "graphs": [{"kind": kind, "file": static[f"{kind}_file"],
                    "inputs": _io_lines(io[kind]["inputs"]),
                    "outputs": _io_lines(io[kind]["outputs"])} for kind in ("prefill", "decode")],
    }


def snippet_context(profile: DeviceProfile, model_file: str, files: list[str],
                    ort_version: str, min_version: str | None, *, genai: dict | None = None,
                    genai_reason: str = "", tflite: dict | None = None,
                    static: dict | None = None, weights_file: str | None = None) -> dict:
    """Everything the snippet templates read, taken from the profile and the bundle.
    ``static``: the bundle manifest's ``static`` section (with ``io``) of a static-shape
    bundle; ``weights_file``: the external-data file the graphs read, if any."""
    providers = [{"name": name, "short": name.replace("ExecutionProvider", ""),
                  "options": options} for name, options in profile.provider_specs()]
    tflite = tflite or {}
    return {
        "static": static_context(static) if static else None, "weights_file": weights_file,
        "profile": profile, "providers": providers, "threads": profile.runtime.threads,
        "allow_cpu_fallback": profile.runtime.allow_cpu_fallback,
        "nnapi": any(p["name"] == "NnapiExecutionProvider" for p in providers),
        "artifact_id": "onnxruntime-android-qnn" if profile.accelerator == "QNNExecutionProvider"
        else "onnxruntime-android",
        "model_file": model_file, "files": files,
        "asset_dir": "slmedge", "ort_version": ort_version, "min_version": min_version,
        "genai": genai, "genai_reason": genai_reason,
        "litert_version": litert_version(),
        "signatures": sorted(tflite.get("signatures", [])),
        "context_length": tflite.get("context_length", 0),
    }


def render_snippets(profile: DeviceProfile, model_file: str, files: list[str],
                    ort_version: str, min_version: str | None, *, genai: dict | None = None,
                    genai_reason: str = "", tflite: dict | None = None,
                    static: dict | None = None, weights_file: str | None = None
                    ) -> dict[str, str]:
    """``{relative path: text}`` of the integration snippets for the profile's platform, plus
    ``snippets/session.json`` (the same session recipe as data). ``genai``: the
    :func:`genai_dependency` when the bundle has a genai_config.json; ``tflite``: the
    manifest's ``tflite`` section for a LiteRT bundle; ``static``: the manifest's ``static``
    section (with ``io``) for static-shape graphs, which get a prefill and a decode session."""
    ctx = snippet_context(profile, model_file, files, ort_version, min_version, genai=genai,
                          genai_reason=genai_reason, tflite=tflite, static=static,
                          weights_file=weights_file)
    os_name = profile.device.os.value
    litert = profile.runtime.engine is Engine.litert
    if litert and os_name == "android":
        out = {"snippets/android/build.gradle.kts": _GRADLE_LITERT.render(ctx),
               "snippets/android/SlmEdgeModel.kt": _KOTLIN_LITERT.render(ctx)}
    elif litert:  # no Swift LiteRT template yet: the Python one states the same recipe
        out = {"snippets/python/session.py": _PYTHON_LITERT.render(ctx)}
    elif os_name == "android":
        out = {"snippets/android/build.gradle.kts": _GRADLE.render(ctx),
               "snippets/android/SlmEdgeModel.kt": _KOTLIN.render(ctx)}
    elif os_name in ("ios", "macos"):
        out = {"snippets/ios/SlmEdgeModel.swift": _SWIFT.render(ctx)}
    else:
        out = {"snippets/python/session.py": _PYTHON.render(ctx)}
    session = {"profile": profile.name, "engine": profile.runtime.engine.value,
               "model_file": model_file, "threads": ctx["threads"],
               "allow_cpu_fallback": ctx["allow_cpu_fallback"],
               "providers": [{"name": p["name"], "options": p["options"]}
                             for p in ctx["providers"]]}
    if ctx["static"]:
        session["graphs"] = {"prefill": ctx["static"]["prefill_file"],
                             "decode": ctx["static"]["decode_file"]}
    if litert:
        session |= {"litert": ctx["litert_version"], "signatures": ctx["signatures"]}
    else:
        session |= {"onnxruntime": ort_version,
                    "onnxruntime_genai": genai["version"] if genai else None}
    out["snippets/session.json"] = json.dumps(session, indent=2) + "\n"
    return out
