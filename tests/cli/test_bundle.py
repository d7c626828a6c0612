"""``slmedge bundle`` / ``slmedge verify``: the tiny fused Llama bundled, loaded in
onnxruntime-genai, and broken on purpose for verify. One thread everywhere."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from slmedge.device_profiles import load_profile
from slmedge.exporter.bundle.build import render_snippets
from slmedge.tools.cli.app import main

PROMPT = [1, 10, 20, 30, 40, 50]
NEW_TOKENS = 20
# x86-cpu with one thread: the GenAI session must not take both cores of the CI machine.
ONE_THREAD_PROFILE = "name: x86-cpu-1t\nextends: x86-cpu\nruntime:\n  threads: 1\n"


def run(capsys, *argv):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bundle(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny fused Llama bundled for x86-cpu (1 thread), with --zip."""
    root = tmp_path_factory.mktemp("bundle")
    profile = root / "x86-cpu-1t.yaml"
    profile.write_text(ONE_THREAD_PROFILE)
    out = root / "tiny-bundle"
    assert main(["bundle", str(tiny_artifact("llama")), "--profile", str(profile), "-o", str(out),
                 "--zip", "--json"]) == 0
    return out


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    """A copy to break on purpose."""
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


# -- GenAI loads the bundle and agrees with slmedge ---------------------------------------------


def test_bundle_runs_in_onnxruntime_genai_with_slmedge_greedy_tokens(bundle, tiny_artifact):
    og = pytest.importorskip("onnxruntime_genai")
    from slmedge.runtimes.generation import generate
    from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder

    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True  # GQA shared KV buffer
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    manifest = manifest_of(bundle)
    assert any("logits_to_keep -> initializer 0" in c for c in manifest["graph_changes"])
    assert "logits_to_keep" not in manifest["genai_config_reason"]

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    genai_tokens = []
    while not generator.is_done() and len(genai_tokens) < NEW_TOKENS:
        generator.generate_next_token()
        genai_tokens.append(int(generator.get_next_tokens()[0]))

    # slmedge's runtime on the *source* graph (logits_to_keep fed, shared KV buffer).
    decoder = OnnxDecoder(tiny_artifact("llama") / "model.onnx", threads=1)
    assert decoder.has_logits_to_keep
    ours = generate(decoder, PROMPT, NEW_TOKENS).tokens
    assert len(genai_tokens) == NEW_TOKENS  # no stop token in this seed's 20 tokens
    assert genai_tokens == ours


def test_bundle_manifest_lists_every_file_and_runtime_facts(bundle, tiny_artifact):
    manifest = manifest_of(bundle)
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for rel, meta in manifest["files"].items():
        data = (bundle / rel).read_bytes()
        assert meta["size"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "genai_config.json"} <= set(manifest["files"])
    facts = manifest["onnx"]["model.onnx"]
    assert facts["opset"] == 18 and facts["ir_version"] == 10
    assert "com.microsoft.GroupQueryAttention" in facts["contrib_ops"]
    assert "SimplifiedLayerNormalization" in facts["contrib_ops"]  # ORT-only, default domain
    assert manifest["onnxruntime"]["minimum"] == "1.22"
    assert any("GroupQueryAttention" in b for b in manifest["onnxruntime"]["because"])
    source = manifest_of(tiny_artifact("llama"))
    assert manifest["profile"]["name"] == "x86-cpu-1t"
    assert manifest["quality"] == source["quality"] and manifest["recipe"] == source["recipe"]
    assert len(manifest["parity"]["greedy_tokens"]) == 8


def test_zip_matches_the_manifest(bundle):
    manifest = manifest_of(bundle)
    zip_path = bundle.parent / f"{bundle.name}.zip"
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        assert names == set(manifest["files"]) | {"manifest.json"}
        for rel, meta in manifest["files"].items():
            data = z.read(rel)
            assert len(data) == meta["size"]
            assert hashlib.sha256(data).hexdigest() == meta["sha256"], rel
        assert json.loads(z.read("manifest.json")) == manifest


# -- verify --------------------------------------------------------------------------------


def test_verify_passes_on_a_fresh_bundle(capsys, bundle):
    code, out, err = run(capsys, "verify", bundle, "--runtime-version", "1.22", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["files_checked"] == len(manifest_of(bundle)["files"])
    assert report["parity"]["tokens_match"] and report["parity"]["max_abs_diff"] <= 1e-5


def test_verify_catches_a_truncated_model_file(capsys, bundle_copy):
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    code, _, err = run(capsys, "verify", bundle_copy)
    assert code == 1
    one_line_error(err, "model.onnx", "truncated")


def test_verify_catches_a_flipped_byte(capsys, bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", bundle_copy)
    assert code == 1
    one_line_error(err, "model.onnx", "sha256")


def test_verify_catches_a_missing_tokenizer(capsys, bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    code, _, err = run(capsys, "verify", bundle_copy)
    assert code == 1
    one_line_error(err, "tokenizer.json: missing")


def test_verify_refuses_a_runtime_older_than_the_opset(capsys, bundle):
    code, _, err = run(capsys, "verify", bundle, "--runtime-version", "1.13", "--no-parity")
    assert code == 4
    line = one_line_error(err, "ONNX Runtime 1.13", "opset 18", "implements up to opset 17")
    assert "needs ONNX Runtime >= 1.22" in line


def test_verify_names_a_contrib_op_too_new_for_the_runtime(capsys, bundle):
    code, _, err = run(capsys, "verify", bundle, "--runtime-version", "1.20", "--no-parity")
    assert code == 4
    line = one_line_error(err, "com.microsoft.GroupQueryAttention")
    assert "opset" not in line.split("cannot run this bundle:")[1].split("—")[0]


def test_verify_rejects_a_bad_runtime_version(capsys, bundle):
    code, _, err = run(capsys, "verify", bundle, "--runtime-version", "latest")
    assert code == 2
    one_line_error(err, "MAJOR.MINOR")


def test_verify_of_an_artifact_says_it_is_not_a_bundle(capsys, tiny_artifact):
    code, _, err = run(capsys, "verify", tiny_artifact("llama"))
    assert code == 1
    one_line_error(err, "not a bundle", "slmedge bundle")


# -- refusals, atomic output -----------------------------------------------------------------


def test_static_profile_refuses_a_dynamic_artifact_and_writes_nothing(capsys, tiny_artifact,
                                                                       tmp_path):
    out = tmp_path / "b"
    code, _, err = run(capsys, "bundle", tiny_artifact("llama"), "--profile", "ios-coreml",
                       "-o", out)
    assert code == 2
    one_line_error(err, "ios-coreml", "static", "slmedge export")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bundle_refuses_an_altered_artifact(capsys, tiny_artifact, tmp_path):
    src = Path(shutil.copytree(tiny_artifact("llama"), tmp_path / "art"))
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "b"
    code, _, err = run(capsys, "bundle", src, "--profile", "x86-cpu", "-o", out)
    assert code == 1
    one_line_error(err, "tokenizer.json", "export it again")
    assert not out.exists()


# -- snippets: parsed, compared with the profile object ------------------------------------------

_KOTLIN_CALL = r"options\.{call}\((.*?)\)\n"


def _kotlin_map(text: str, call: str) -> dict[str, str]:
    m = re.search(_KOTLIN_CALL.format(call=call), text, re.S)
    assert m, f"no options.{call}(...) in the Kotlin snippet"
    return dict(re.findall(r'"([^"]+)" to "([^"]*)"', m.group(1)))


def _swift_map(text: str, call: str) -> dict[str, str]:
    m = re.search(re.escape(call) + r"\[(.*?)\]\)", text, re.S)
    assert m, f"no {call} in the Swift snippet"
    return dict(re.findall(r'"([^"]+)": "([^"]*)"', m.group(1)))


def _render(name: str) -> tuple[dict, dict[str, str]]:
    profile = load_profile(name)
    snippets = render_snippets(profile, "model.onnx", ["model.onnx", "tokenizer.json"],
                               "1.32.0", "1.22")
    return dict(profile.provider_specs()), snippets


def test_kotlin_snippet_carries_the_qnn_profile_options():
    specs, snippets = _render("android-qnn-htp")
    kotlin = snippets["snippets/android/SlmEdgeModel.kt"]
    assert _kotlin_map(kotlin, "addQnn") == specs["QNNExecutionProvider"]
    assert specs["QNNExecutionProvider"]["soc_model"] == "43"
    assert 'addConfigEntry("session.disable_cpu_ep_fallback", "1")' in kotlin  # no fallback
    gradle = snippets["snippets/android/build.gradle.kts"]
    assert re.search(r'implementation\("com\.microsoft\.onnxruntime:onnxruntime-android-qnn:'
                     r'1\.32\.0"\)', gradle)
    assert json.loads(snippets["snippets/session.json"])["providers"][0]["options"] == \
        specs["QNNExecutionProvider"]


def test_kotlin_snippet_carries_xnnpack_and_nnapi_options():
    specs, snippets = _render("android-cpu")
    kotlin = snippets["snippets/android/SlmEdgeModel.kt"]
    assert _kotlin_map(kotlin, "addXnnpack") == specs["XnnpackExecutionProvider"] == \
        {"intra_op_num_threads": "4"}
    assert "setIntraOpNumThreads(4)" in kotlin and "disable_cpu_ep_fallback" not in kotlin
    assert re.search(r'onnxruntime:onnxruntime-android:1\.32\.0"',
                     snippets["snippets/android/build.gradle.kts"])
    specs, snippets = _render("android-nnapi")
    kotlin = snippets["snippets/android/SlmEdgeModel.kt"]
    call = re.search(r"options\.addNnapi\((.*)\)\n", kotlin).group(1)
    flags = {f"NNAPI_FLAG_{f}": "1" for f in re.findall(r"NNAPIFlags\.(\w+)", call)}
    assert flags == specs["NnapiExecutionProvider"] == {"NNAPI_FLAG_CPU_DISABLED": "1"}


def test_swift_snippet_carries_the_coreml_profile_options():
    specs, snippets = _render("ios-coreml")
    swift = snippets["snippets/ios/SlmEdgeModel.swift"]
    assert _swift_map(swift, "appendCoreMLExecutionProvider(withOptionsV2: ") == \
        specs["CoreMLExecutionProvider"]
    assert specs["CoreMLExecutionProvider"]["ModelFormat"] == "MLProgram"
    assert 'exact: "1.32.0"' in swift and "pod 'onnxruntime-objc', '1.32.0'" in swift
    assert "setIntraOpNumThreads(2)" in swift


def test_android_bundle_of_the_tiny_model_has_kotlin_snippets(capsys, tiny_artifact, tmp_path):
    out = tmp_path / "android"
    code, stdout, err = run(capsys, "bundle", tiny_artifact("llama"), "--profile", "android-cpu",
                            "-o", out)
    assert code == 0, err
    assert "ONNX Runtime >= 1.22" in stdout
    assert "has no .ort files" in err  # the profile wants .ort; a default export has none
    manifest = manifest_of(out)
    assert manifest["files"]["snippets/android/SlmEdgeModel.kt"]["role"] == "snippet"
    kotlin = (out / "snippets/android/SlmEdgeModel.kt").read_text()
    assert _kotlin_map(kotlin, "addXnnpack") == \
        dict(load_profile("android-cpu").provider_specs())["XnnpackExecutionProvider"]
    listed = re.search(r"ASSET_FILES = listOf\((.*?)\)", kotlin, re.S).group(1)
    assert set(re.findall(r'"([^"]+)"', listed)) == {
        rel for rel, m in manifest["files"].items() if m["role"] != "snippet"}
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [
        {"XNNPACK": {"intra_op_num_threads": "4"}}]


# -- static-shape (NPU) artifacts: no genai_config, said so; verify still replays them ----------


def _weight_copies(artifact: Path, bundle: Path) -> set[int]:
    """How many times each external weight tensor of the artifact (>= 1 KB, not a constant
    fill) occurs, byte for byte, across all of the bundle's files."""
    import onnx

    static = manifest_of(artifact)["static"]
    data = (artifact / static["weights_file"]).read_bytes()
    blobs = [p.read_bytes() for p in bundle.rglob("*") if p.is_file()]
    counts = set()
    graph = onnx.load(str(artifact / static["prefill_file"]), load_external_data=False)
    for t in graph.graph.initializer:
        info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        if not info or info["length"] < 1024:
            continue
        weight = data[info.get("offset", 0):info.get("offset", 0) + info["length"]]
        if len(set(weight)) > 16:
            counts.add(sum(blob.count(weight) for blob in blobs))
    assert counts, "no weight tensor to look for"
    return counts


def test_static_bundle_ships_the_onnx_graphs_and_their_weights_once(capsys, static_bundle,
                                                                    tmp_path_factory, tiny_dir):
    """The profile lists [onnx, ort]: the bundle ships the .onnx graphs, which share one
    external weights file; each .ort would carry the weights again."""
    from helpers.static_fixtures import static_artifact_path

    artifact = static_artifact_path(tmp_path_factory, tiny_dir)
    manifest = manifest_of(static_bundle)
    assert manifest["genai_config"] is None and not (static_bundle / "genai_config.json").exists()
    assert "static-shape prefill/decode" in manifest["genai_config_reason"]
    static = manifest["static"]
    assert set(manifest["onnx"]) == {static["prefill_file"], static["decode_file"]}
    source = manifest_of(artifact)
    assert source["ort_format"]["files"] and "ort_format" not in manifest
    assert not [f for f in manifest["files"] if f.endswith(".ort")]
    assert manifest["model_format"]["shipped"] == "onnx"
    assert manifest["model_format"]["weights_copies"] == 1
    model = {rel: m["size"] for rel, m in manifest["files"].items() if m["role"] == "model"}
    assert set(model) == {static["prefill_file"], static["decode_file"], static["weights_file"]}
    assert model[static["weights_file"]] == source["static"]["weights_bytes"]
    assert _weight_copies(artifact, static_bundle) == {1}
    assert _weight_copies(artifact, artifact) == {3}  # the artifact: .onnx.data + two .ort
    code, stdout, err = run(capsys, "verify", static_bundle, "--json")
    assert code == 0, err
    assert json.loads(stdout)["parity"]["tokens_match"]


@pytest.fixture(scope="module")
def static_bundle(tmp_path_factory, tiny_dir) -> Path:
    """The tiny static export (32 / 8, extends android-nnapi) bundled for its profile."""
    from helpers.static_fixtures import static_artifact_path

    artifact = static_artifact_path(tmp_path_factory, tiny_dir)
    out = tmp_path_factory.mktemp("static-bundle") / "npu"
    assert main(["bundle", str(artifact), "--profile", str(artifact.parent / "test-npu.yaml"),
                 "-o", str(out), "--json"]) == 0
    return out


def test_static_bundles_carry_the_quality_card(capsys, static_bundle, tmp_path_factory,
                                              tiny_dir, tmp_path):
    """A float static export's card (vs PyTorch) is its manifest's ``quality``; a quantized
    one's (vs the float graphs) is ``quantization.quality``: the bundle carries either."""
    from helpers.static_fixtures import TEST_PROFILE, static_artifact_path

    float_source = manifest_of(static_artifact_path(tmp_path_factory, tiny_dir))
    assert manifest_of(static_bundle)["quality"] == float_source["quality"]
    assert float_source["quality"]["reference"] == "PyTorch fp32 on CPU"
    profile = tmp_path / "test-npu-int8.yaml"
    profile.write_text(TEST_PROFILE.replace("name: test-npu", "name: test-npu-int8")
                       + "recipe:\n  quantization: int8-static\n"
                       "artifact:\n  formats: [onnx]\n  required_operators_config: false\n")
    artifact, out = tmp_path / "int8", tmp_path / "bundle"
    code, _, err = run(capsys, "export", "--model", tiny_dir("llama"), "--output", artifact,
                       "--profile", profile, "--quant", "int8-static", "--calib-samples", "8")
    assert code == 0, err
    source = manifest_of(artifact)
    assert "quality" not in source and source["quantization"]["label"].startswith("int8-static")
    # an untied lm_head (a constant weight) stays float as the recipe says, and the label
    # read from the graph agrees
    assert source["quantization"]["lm_head"] == {"precision": "float"}
    assert source["quantization"]["label"].endswith("headf")
    # the static section counts the quantized weights, not the float export's
    static = source["static"]
    assert static["weights_bytes"] == (artifact / static["weights_file"]).stat().st_size
    code, _, err = run(capsys, "bundle", artifact, "--profile", profile, "-o", out)
    assert code == 0, err
    quality = manifest_of(out)["quality"]
    assert quality is not None and quality == source["quantization"]["quality"]
    assert quality["judged_on"] == "cpu" and quality["cpu"]["perplexity"] > 0


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
               "tensor(int64)": "int64"}


def _documented_io(text: str, kind: str) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` from a snippet's ``<kind> inputs:`` / ``outputs:`` lines."""
    found = {}
    for side in ("inputs", "outputs"):
        line = re.search(rf"{kind} {side}: +(.*)\n", text).group(1)
        for name, dtype, shape in re.findall(r"(\S+) (\w+) \[([\d, ]+)\]", line):
            found[name] = (dtype, [int(d) for d in shape.split(", ")])
    return found


def _check_static_snippet(text: str, bundle: Path, files: dict[str, str], options_of) -> None:
    """Both graphs' files open in ONNX Runtime, and the names / dtypes / shapes the snippet
    documents and lists are the sessions' own."""
    import onnxruntime as ort

    manifest = manifest_of(bundle)
    static = manifest["static"]
    assert files == {"prefill": static["prefill_file"], "decode": static["decode_file"]}
    for kind, rel in files.items():
        session = ort.InferenceSession(str(bundle / rel), providers=["CPUExecutionProvider"])
        documented = _documented_io(text, kind)
        layers = manifest["architecture"]["num_layers"]
        for t in session.get_inputs() + session.get_outputs():
            folded = re.sub(r"^(\w+)\.0\.key$", rf"\1.{{0..{layers - 1}}}.key/value", t.name)
            if folded in documented:
                assert documented[folded] == (_ORT_DTYPES[t.type], t.shape), t.name
            elif not re.match(r"^\w+\.\d+\.(key|value)$", t.name):
                raise AssertionError(f"{t.name} of {rel} is not documented")
        kv_in = [t.name for t in session.get_inputs() if t.name.startswith("past_key_values.")]
        kv_out = [t.name for t in session.get_outputs() if t.name.startswith("kv_new.")]
        assert options_of("KV_INPUTS", "kvInputs") == kv_in
        assert options_of("KV_OUTPUTS", "kvOutputs") == kv_out
    assert f"a fixed window of {static['context_length']} tokens" in text
    assert f"{static['prefill_chunk']} tokens per run" in text
    assert f"read their weights from {static['weights_file']}" in text


def test_static_kotlin_snippet_opens_prefill_and_decode_with_the_same_options(static_bundle):
    kotlin = (static_bundle / "snippets/android/SlmEdgeModel.kt").read_text()
    consts = dict(re.findall(r'const val (\w+) = "([^"]*)"', kotlin))
    ints = {k: int(v) for k, v in re.findall(r"const val (\w+) = (\d+)\n", kotlin)}
    made = re.findall(r"val (\w+) = env\.createSession\(File\(dir, (\w+)\)\.path, (\w+)\)",
                      kotlin)
    assert [m[0] for m in made] == ["prefill", "decode"]
    assert {m[2] for m in made} == {"options"} and "val options = sessionOptions()" in kotlin
    assert "Sessions(prefill, decode)" in kotlin and "fun createSession(" not in kotlin
    static = manifest_of(static_bundle)["static"]
    assert ints == {"CONTEXT_LENGTH": static["context_length"],
                    "PREFILL_CHUNK": static["prefill_chunk"]}
    call = re.search(r"options\.addNnapi\((.*)\)\n", kotlin).group(1)
    assert {f"NNAPI_FLAG_{f}": "1" for f in re.findall(r"NNAPIFlags\.(\w+)", call)} == \
        dict(load_profile("android-nnapi").provider_specs())["NnapiExecutionProvider"]

    def listed(kotlin_name, _swift_name):
        body = re.search(rf"val {kotlin_name} = listOf\((.*?)\)", kotlin, re.S).group(1)
        return re.findall(r'"([^"]+)"', body)

    _check_static_snippet(kotlin, static_bundle, {m[0]: consts[m[1]] for m in made}, listed)
    session = json.loads((static_bundle / "snippets/session.json").read_text())
    assert session["graphs"] == {"prefill": static["prefill_file"], "decode": static["decode_file"]}


def test_static_swift_snippet_opens_prefill_and_decode_with_the_coreml_options(static_bundle):
    manifest = manifest_of(static_bundle)
    profile = load_profile("ios-coreml")
    files = [rel for rel, m in manifest["files"].items() if m["role"] != "snippet"]
    swift = render_snippets(profile, manifest["model_file"], files, "1.32.0", "1.22",
                            static=manifest["static"],
                            weights_file=manifest["static"]["weights_file"])[
        "snippets/ios/SlmEdgeModel.swift"]
    consts = dict(re.findall(r'static let (\w+) = "([^"]*)"', swift))
    made = re.findall(r"let (\w+) = try ORTSession\(env: env, modelPath: try resourcePath\((\w+)\), "
                      r"sessionOptions: (\w+)\)", swift)
    assert [m[0] for m in made] == ["prefill", "decode"] and {m[2] for m in made} == {"options"}
    assert "let options = try sessionOptions()" in swift and "func createSession()" not in swift
    assert _swift_map(swift, "appendCoreMLExecutionProvider(withOptionsV2: ") == \
        dict(profile.provider_specs())["CoreMLExecutionProvider"]

    def listed(_kotlin_name, swift_name):
        body = re.search(rf"static let {swift_name} = \[(.*?)\]", swift, re.S).group(1)
        return re.findall(r'"([^"]+)"', body)

    _check_static_snippet(swift, static_bundle, {m[0]: consts[m[1]] for m in made}, listed)


def test_verify_fails_parity_when_the_recorded_tokens_differ(capsys, bundle_copy):
    manifest = manifest_of(bundle_copy)
    manifest["parity"]["greedy_tokens"][3] = (manifest["parity"]["greedy_tokens"][3] + 1) % 128
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", bundle_copy)
    assert code == 3
    one_line_error(err, "parity check failed", "differ from token 3")


def test_verify_runs_without_onnx_torch_or_transformers(bundle):
    """verify is for phones and Pis: onnxruntime + numpy only."""
    code = ("import sys\nfrom slmedge.tools.cli.app import main\n"
            f"assert main(['verify', {str(bundle)!r}]) == 0\n"
            "loaded = [m for m in ('onnx', 'torch', 'transformers', 'onnxruntime_genai') "
            "if m in sys.modules]\nassert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr


# -- last bench: slmedge bench records DIR/bench.json, the bundle carries it -------------------


def test_bundle_carries_the_last_bench_or_says_there_is_none(capsys, tiny_artifact, tmp_path):
    src = Path(shutil.copytree(tiny_artifact("llama"), tmp_path / "art"))
    (src / "bench.json").unlink(missing_ok=True)  # other tests bench the shared artifact
    profile = tmp_path / "x86-cpu-1t.yaml"
    profile.write_text(ONE_THREAD_PROFILE)
    out = tmp_path / "b"
    code, _, err = run(capsys, "bundle", src, "--profile", profile, "-o", out)
    assert code == 0, err
    manifest = manifest_of(out)
    assert manifest["last_bench"] is None
    assert f"slmedge bench {src}" in manifest["last_bench_note"]
    assert manifest["last_bench_note"] in manifest["notes"] and "slmedge bench" in err

    bench = ["bench", src, "--prompt-tokens", "8", "--new-tokens", "4", "--prompt-buckets", "8",
             "--depths", "8", "--warmup", "0", "--repeats", "1", "--threads", "1"]
    code, _, err = run(capsys, *bench, "--no-record")
    assert code == 0, err
    assert not (src / "bench.json").exists()
    code, stdout, err = run(capsys, *bench, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    recorded = json.loads((src / "bench.json").read_text())
    assert recorded == result and "bench.json" in err
    assert "bench.json" not in manifest_of(src)["files"]  # the artifact itself is unchanged

    code, stdout, err = run(capsys, "bundle", src, "--profile", profile, "-o", out, "--overwrite")
    assert code == 0, err
    last = manifest_of(out)["last_bench"]
    for key in ("decode_tokens_per_s", "ttft_ms", "peak_rss_mb", "started_at", "target",
                "prompt_tokens", "new_tokens"):
        assert last[key] == result[key], key
    assert last["environment"]["threads"] == 1
    assert last["file"]["sha256"] == hashlib.sha256((src / "bench.json").read_bytes()).hexdigest()
    assert manifest_of(out)["last_bench_note"] is None
    assert f"{result['decode_tokens_per_s']} tok/s decode" in stdout


def test_an_invalid_bench_json_is_noted_not_carried(capsys, tiny_artifact, tmp_path):
    src = Path(shutil.copytree(tiny_artifact("llama"), tmp_path / "art"))
    (src / "bench.json").write_text(json.dumps({"schema_version": 2, "kind": "slmedge.bench"}))
    out = tmp_path / "b"
    code, _, err = run(capsys, "bundle", src, "--profile", "x86-cpu", "-o", out, "--json")
    assert code == 0, err
    manifest = manifest_of(out)
    assert manifest["last_bench"] is None and "not a usable bench result" in \
        manifest["last_bench_note"]


# -- Gradle: the ONNX Runtime AAR and the GenAI release AAR, parsed --------------------------------

_GRADLE_DEP = r'implementation\("([\w.-]+):([\w.-]+):([\w.-]+)"\)'
_GRADLE_FILE = r'implementation\(files\("libs/([^"]+)"\)\)'


def test_gradle_snippet_depends_on_ort_and_the_genai_aar_of_the_bundle(capsys, tiny_artifact,
                                                                       tmp_path):
    import onnxruntime as ort

    og = pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "android"
    code, _, err = run(capsys, "bundle", tiny_artifact("llama"), "--profile", "android-cpu",
                       "-o", out)
    assert code == 0, err
    gradle = (out / "snippets/android/build.gradle.kts").read_text()
    assert re.findall(_GRADLE_DEP, gradle) == [
        ("com.microsoft.onnxruntime", "onnxruntime-android", ort.__version__)]
    assert re.findall(_GRADLE_FILE, gradle) == [f"onnxruntime-genai-android-{og.__version__}.aar"]
    urls = re.findall(r"https://\S+\.aar", gradle)
    assert urls == [f"https://github.com/microsoft/onnxruntime-genai/releases/download/"
                    f"v{og.__version__}/onnxruntime-genai-android-{og.__version__}.aar"]
    manifest = manifest_of(out)
    assert manifest["onnxruntime_genai"]["version"] == og.__version__
    needs = manifest["onnxruntime_genai"]["needs_onnxruntime"]  # from the wheel's metadata
    assert needs and needs.startswith(">=") and f"onnxruntime {needs}" in gradle
    session = json.loads((out / "snippets/session.json").read_text())
    assert session["onnxruntime"] == ort.__version__ and session["onnxruntime_genai"] == \
        og.__version__


def test_gradle_snippet_of_a_bundle_without_genai_config_has_no_genai_aar():
    profile = load_profile("android-qnn-htp")
    gradle = render_snippets(profile, "prefill.onnx", ["prefill.onnx"], "1.32.0", "1.22",
                             genai_reason="static-shape prefill/decode graphs")[
        "snippets/android/build.gradle.kts"]
    assert re.findall(_GRADLE_DEP, gradle) == [
        ("com.microsoft.onnxruntime", "onnxruntime-android-qnn", "1.32.0")]
    assert re.findall(_GRADLE_FILE, gradle) == []
    assert "No ONNX Runtime GenAI AAR" in gradle and "static-shape" in gradle


def test_an_onnx_artifact_is_refused_for_a_litert_profile(capsys, tiny_artifact, tmp_path):
    profile = tmp_path / "pixel-litert.yaml"
    profile.write_text(LITERT_PROFILE)
    out = tmp_path / "b"
    code, _, err = run(capsys, "bundle", tiny_artifact("llama"), "--profile", profile, "-o", out)
    assert code == 2
    one_line_error(err, "pixel-litert", ".tflite", "--format tflite")
    assert not out.exists()


#: An Android LiteRT profile (the schema: engine litert loads tflite only).
LITERT_PROFILE = (
    "name: pixel-litert\nextends: android-cpu\n"
    "runtime:\n  engine: litert\n  threads: 1\n  providers:\n    - name: CPUExecutionProvider\n"
    "shapes:\n  policy: static\n  context_length: 32\n  prefill_chunk: 8\n"
    "recipe:\n  precision: fp32\n  quantization: none\n"
    "artifact:\n  formats: [tflite]\n  required_operators_config: false\n")
