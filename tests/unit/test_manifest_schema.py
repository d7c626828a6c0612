"""The typed, versioned manifest (runtimes/manifest_schema.py): every manifest the exporters
write validates and round-trips; unknown keys of a newer minor version are kept; another major
version, or none, is refused with exit 2 naming the versions and the command that writes the
artifact again (also by the benchmark runner, which has no pydantic); a missing field is named
with its file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmedge.runtimes.artifact import MANIFEST_NAME, open_artifact
from slmedge.runtimes.errors import EXIT_USAGE, SlmEdgeError, UsageError
from slmedge.runtimes.manifest_schema import (
    BundleManifest,
    Manifest,
    OnnxFacts,
    load_manifest,
    validate_manifest,
)
from slmedge.tools.cli.app import main

ONE_THREAD_PROFILE = "name: x86-cpu-1t\nextends: x86-cpu\nruntime:\n  threads: 1\n"


def _doc(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(root: Path, **changes) -> dict:
    doc = _doc(root)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    return doc


@pytest.fixture(scope="module")
def fp32(tiny_artifact):
    return tiny_artifact("llama")


@pytest.fixture(scope="module")
def written(fp32, tmp_path_factory, tiny_dir):
    """The manifests the test fixtures produce: fp32, int4, int8 (slmedge quantize), a
    static-shape profile export, and bundles of the fp32 and the static export."""
    from helpers.static_fixtures import static_artifact_path

    root = tmp_path_factory.mktemp("manifests")
    out = {"fp32": fp32}
    for scheme in ("int4", "int8"):
        assert main(["quantize", str(fp32), "-o", str(root / scheme), "--quant", scheme,
                     "--max-ppl-increase", "1000", "--eval-tokens", "256", "--no-store"]) == 0
        out[scheme] = root / scheme
    out["static"] = static_artifact_path(tmp_path_factory, tiny_dir)
    profile = root / "x86-cpu-1t.yaml"
    profile.write_text(ONE_THREAD_PROFILE)
    assert main(["bundle", str(fp32), "--profile", str(profile), "-o", str(root / "bundle")]) == 0
    out["bundle"] = root / "bundle"
    assert main(["bundle", str(out["static"]), "--profile",
                 str(out["static"].parent / "test-npu.yaml"), "-o", str(root / "sbundle")]) == 0
    out["static-bundle"] = root / "sbundle"
    return out


def test_every_written_manifest_validates_and_round_trips(written):
    kinds = {}
    for name, root in written.items():
        doc = _doc(root)
        m = load_manifest(root)
        kinds[name] = type(m)
        # nothing lost, nothing added: the typed model writes back the same JSON
        assert m.to_json() == doc, name
        assert validate_manifest(m.to_json(), name).to_json() == doc
        assert sum(f.size for f in m.files.values()) == sum(
            (root / rel).stat().st_size for rel in doc["files"])
    assert kinds == {"fp32": Manifest, "int4": Manifest, "int8": Manifest,
                     "static": Manifest, "bundle": BundleManifest,
                     "static-bundle": BundleManifest}


def test_fields_read_what_the_exporters_wrote(written):
    fp32, int4, static = (load_manifest(written[k]) for k in ("fp32", "int4", "static"))
    assert fp32.architecture.family == "Llama" and fp32.architecture.vocab_size == 128
    assert fp32.recipe.quant is None and int4.recipe.quant == int4.quantization.label
    assert int4.derived_from.artifact == str(written["fp32"].resolve())
    assert int4.gate.passed is True and int4.card().reference_perplexity is not None
    assert isinstance(fp32.onnx, OnnxFacts) and fp32.graph_files() == ["model.onnx"]
    assert "com.microsoft.MatMulNBits" in int4.onnx.contrib_ops
    assert set(static.onnx) == {"prefill", "decode"}
    assert static.graph_files() == [static.static.prefill_file, static.static.decode_file]
    assert static.static.context_length == 32 and static.profile.name == "test-npu"
    # the model files' bytes are the ones on disk
    assert int4.model_bytes() == sum((written["int4"] / f).stat().st_size
                                     for f in int4.model_files())
    bundle = load_manifest(written["bundle"])
    assert bundle.kind == "bundle" and bundle.parity.greedy_tokens
    assert bundle.profile.name == "x86-cpu-1t"


def test_unknown_keys_of_a_newer_minor_version_load_and_are_kept(fp32, tmp_path):
    art = _copy(fp32, tmp_path / "a")
    doc = _doc(art)
    doc["schema_version"] = "1.7"
    doc["energy_card"] = {"mj_per_token": 1.5}                 # a new section
    doc["architecture"]["sliding_window"] = 4096                # a new key inside a known one
    (art / MANIFEST_NAME).write_text(json.dumps(doc))
    m = open_artifact(art).info
    assert m.energy_card == {"mj_per_token": 1.5}
    assert m.architecture.sliding_window == 4096 and m.architecture.num_layers == 2
    assert m.to_json() == doc


@pytest.mark.parametrize("version, found", [(2, "schema version 2"),
                                            ("0.9", "schema version '0.9'"),
                                            (None, "no schema_version")])
def test_another_major_version_exits_2_naming_versions_and_command(fp32, tmp_path, capsys,
                                                                   version, found):
    art = _copy(fp32, tmp_path / "a")
    _rewrite(art, schema_version=version)
    code = main(["bench", str(art), "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1",
                 "--warmup", "0", "--no-store"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    source = _doc(art)["source"]["location"]
    assert found in err and "reads manifest schema version 1" in err
    assert f"slmedge export --model {source} --output {art}" in err


def test_verify_refuses_a_bundle_of_another_major_version(written, tmp_path, capsys):
    bundle = _copy(written["bundle"], tmp_path / "b")
    _rewrite(bundle, schema_version=3)
    code = main(["verify", str(bundle)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "schema version 3" in err and "bundle manifest schema version 1" in err
    assert f"slmedge bundle {written['fp32'].absolute()} --profile x86-cpu-1t -o {bundle}" in err


def test_a_quantized_artifact_names_slmedge_quantize_to_write_it_again(written, tmp_path):
    art = _copy(written["int4"], tmp_path / "q")
    _rewrite(art, schema_version=2)
    with pytest.raises(UsageError) as e:
        open_artifact(art)
    assert f"slmedge quantize {written['fp32'].resolve()} -o {art} --quant int4" in str(e.value)


def test_the_runner_without_pydantic_refuses_another_major_version(fp32, tmp_path):
    """The benchmark runner on a Pi or phone has no pydantic: the plain version check there
    gives the same exit 2 and message."""
    art = _copy(fp32, tmp_path / "a")
    _rewrite(art, schema_version=2)
    code = ("import runpy, sys; sys.modules['pydantic'] = None; "
            "sys.argv = ['bench', sys.argv[1], '--events']; "
            "runpy.run_module('slmedge.runtimes.bench.runner', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "schema version 2" in proc.stdout and "slmedge export --model" in proc.stdout


def test_a_missing_required_field_names_the_field_and_the_file(fp32, tmp_path):
    art = _copy(fp32, tmp_path / "a")
    _rewrite(art, architecture=None)
    with pytest.raises(UsageError) as e:
        load_manifest(art)
    assert "field architecture: required" in str(e.value)
    assert str(art / MANIFEST_NAME) in str(e.value)
    assert e.value.exit_code == EXIT_USAGE
    # a wrong type inside a section names the dotted path
    _rewrite(art, architecture={**_doc(fp32)["architecture"], "num_layers": "two"})
    with pytest.raises(UsageError, match=r"field architecture\.num_layers: "):
        open_artifact(art).info


def test_a_manifest_the_schema_refuses_is_not_written(tmp_path):
    from slmedge.exporter.manifest import write_manifest

    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(SlmEdgeError, match="architecture") as e:
        write_manifest(tmp_path, {"format": "onnx", "recipe": {"dtype": "fp32"}}, {"model.onnx"})
    assert e.value.exit_code == 1 and "bug in slmedge" in str(e.value)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_a_bare_model_file_has_no_typed_manifest(fp32):
    assert open_artifact(fp32 / "model.onnx").info is None


def test_the_recorded_replay_is_the_manifests_own(written):
    """remote_card reads quality.replay and the gate through the typed manifest; what a
    target replays is exactly the JSON the export recorded."""
    from slmedge.runtimes.check.remote_card import manifest_spec, recorded_replay

    replay, gate = recorded_replay(written["int4"])
    doc = _doc(written["int4"])
    assert replay == doc["quality"]["replay"] and gate == doc["gate"]["max_ppl_increase_pct"]
    assert recorded_replay(written["fp32"])[1] is None  # an fp32 export has no gate
    spec = manifest_spec(written["int4"])
    assert spec["reference_tokens"] == doc["quality"]["replay"]["tokens"]


def _old_static_card(card: dict, gate: dict | None = None) -> dict:
    """``card`` (a static export's, written now) as a static export wrote it before issue 13:
    greedy figures and the token count at the top level, rounded, the float card's gate
    inside it (exporter/onnx/static_shapes_qdq.py's static_quality and onnx/profile.py's
    _float_quality at 544db9c)."""
    greedy = card["greedy"]
    old = {"tokens": card["eval"]["tokens"],
           "reference_perplexity": round(card["reference_perplexity"], 4),
           "perplexity": round(card["perplexity"], 4),
           "ppl_increase_pct": round(card["ppl_increase_pct"], 3),
           "cosine_mean": round(card["cosine_mean"], 6), "cosine_min": round(card["cosine_min"], 6),
           "kl_mean": float(f"{card['kl_mean']:.4g}"),
           "greedy_agreement": round(greedy["top1_agreement"], 4),
           "first_divergence": greedy["first_divergence"], "prompts": greedy["prompts"],
           "new_tokens": greedy["new_tokens"]}
    if gate is not None:
        old.update(reference=card["reference"], candidate=card["candidate"],
                   eval={"text": card["eval"]["text"],
                         "text_sha256": card["eval"]["text_sha256"],
                         "window": card["eval"]["tokens"],
                         "prompt_tokens": greedy["prompt_tokens"]},
                   gate={"max_ppl_increase": gate["max_ppl_increase_pct"],
                         "passed": gate["passed"]},
                   seconds=card["seconds"])
    return old


def test_a_static_card_written_before_issue_13_reads_into_the_onnx_cards_fields(
        tmp_path_factory, tiny_dir, tmp_path):
    """Static-shape exports wrote their card with their own keys until issue 13 (``tokens``,
    ``greedy_agreement``, ``first_divergence``, ``prompts``, ``new_tokens``; the float card's
    gate inside it): such a manifest loads with those figures in the ONNX card's fields and its
    gate as the manifest's, and is written back in the new form."""
    from helpers.static_fixtures import static_artifact_path

    root = _copy(static_artifact_path(tmp_path_factory, tiny_dir), tmp_path / "old")
    doc = _doc(root)
    new, gate = doc["quality"], doc.pop("gate")
    old = _old_static_card(new, gate)
    _rewrite(root, quality=old, gate=None)
    info = load_manifest(root)
    card = info.card()
    assert card.eval == {"text": old["eval"]["text"], "text_sha256": old["eval"]["text_sha256"],
                         "window": old["tokens"], "tokens": old["tokens"]}
    assert card.greedy == {"top1_agreement": old["greedy_agreement"],
                           "first_divergence": old["first_divergence"], "prompts": 3,
                           "new_tokens": 16, "prompt_tokens": 16}
    assert (card.perplexity, card.cosine_mean) == (old["perplexity"], old["cosine_mean"])
    assert info.gate.max_ppl_increase_pct == gate["max_ppl_increase_pct"] == 5.0
    assert info.gate.passed is True
    written = info.to_json()
    assert "gate" not in written["quality"] and "greedy_agreement" not in written["quality"]
    assert validate_manifest(written, root / MANIFEST_NAME).to_json() == written
    # open_artifact (bench, verify, check) reads the same fields
    assert open_artifact(root).info.card().greedy["top1_agreement"] == old["greedy_agreement"]

    # a quantized static export's cards (quantization.quality.cpu / qnn_htp_emulator)
    quantized = {k: v for k, v in doc.items() if k != "quality"}
    quantized["quantization"] = {
        "label": "a16w8", "quality": {"cpu": _old_static_card(new),
                                      "qnn_htp_emulator": {**_old_static_card(new),
                                                           "nodes_by_provider": {}},
                                      "device_card": {"setting": "short", "ran": True},
                                      "judged_on": "qnn_htp_emulator"}}
    cards = validate_manifest(quantized, root / MANIFEST_NAME).card()
    assert cards.judged() is cards.qnn_htp_emulator
    assert cards.cpu.eval == {"tokens": old["tokens"]}
    assert cards.judged().greedy["top1_agreement"] == old["greedy_agreement"]
    assert cards.judged().model_extra == {"nodes_by_provider": {}}


def test_a_card_in_the_current_form_is_read_as_it_is():
    """The alias reads only the old static form: a card with ``greedy`` is left alone (the
    ONNX card's ``greedy_agreement``-free keys), so a new card round-trips unchanged."""
    from slmedge.runtimes.manifest_schema import QualityCard

    doc = {"perplexity": 2.0, "eval": {"tokens": 8}, "greedy": {"top1_agreement": 0.5},
           "tokens": [1, 2]}  # an unknown key of a newer minor version
    assert QualityCard.model_validate(doc).model_dump(exclude_unset=True) == doc


def test_a_tflite_gate_written_in_its_card_reads_as_the_manifests_gate(fp32):
    """TFLite exports wrote their gate inside the card until issue 13: it loads as the
    manifest's gate (what remote_card reads), the card without it."""
    doc = _doc(fp32)
    doc["quality"] = {**doc["quality"],
                      "gate": {"max_ppl_increase_pct": 7.5, "passed": True}}
    info = validate_manifest(doc, fp32 / MANIFEST_NAME)
    assert (info.gate.max_ppl_increase_pct, info.gate.passed) == (7.5, True)
    assert "gate" not in info.to_json()["quality"]
    assert info.card().perplexity == doc["quality"]["perplexity"]


def test_a_bundle_carries_the_artifacts_gate(written, tmp_path):
    """Since issue 13 a gated export's gate is its manifest's ``gate`` (no longer inside a
    static or TFLite card): the bundle copies it into its own typed ``gate``, so a bundle still
    says what its artifact was held to and whether it passed; remote_card reads it there."""
    from slmedge.runtimes.check.remote_card import recorded_replay

    # the float static export (gated vs PyTorch) and its bundle from the fixture
    static_gate = _doc(written["static"])["gate"]
    assert static_gate["passed"] is True and static_gate["max_ppl_increase_pct"] > 0
    assert _doc(written["static-bundle"])["gate"] == static_gate
    assert load_manifest(written["static-bundle"]).gate.passed is True
    # an int4 quantization (gated by `slmedge quantize`) bundled: the gate and the replay
    # remote_card reads are the artifact's
    profile = tmp_path / "x86-cpu-1t.yaml"
    profile.write_text(ONE_THREAD_PROFILE)
    assert main(["bundle", str(written["int4"]), "--profile", str(profile),
                 "-o", str(tmp_path / "b4")]) == 0
    bundle = load_manifest(tmp_path / "b4")
    assert isinstance(bundle, BundleManifest)
    assert bundle.to_json()["gate"] == _doc(written["int4"])["gate"]
    assert recorded_replay(tmp_path / "b4") == recorded_replay(written["int4"])
    assert recorded_replay(tmp_path / "b4")[1] == _doc(written["int4"])["gate"][
        "max_ppl_increase_pct"]
    # an fp32 export has no gate: its bundle says none
    assert _doc(written["bundle"])["gate"] is None and load_manifest(written["bundle"]).gate is None


def test_a_bundle_written_with_the_gate_in_its_card_reads_it_as_its_gate(written):
    """A bundle of a static export made before issue 13 carried the gate inside its card: it
    loads as the bundle's gate, the card without it (as an artifact's manifest does)."""
    doc = _doc(written["static-bundle"])
    gate = doc.pop("gate")
    doc["quality"] = {**doc["quality"], "gate": {"max_ppl_increase": gate["max_ppl_increase_pct"],
                                                 "passed": gate["passed"]}}
    info = validate_manifest(doc, written["static-bundle"] / MANIFEST_NAME)
    assert isinstance(info, BundleManifest)
    assert (info.gate.max_ppl_increase_pct, info.gate.passed) == (
        gate["max_ppl_increase_pct"], True)
    assert "gate" not in info.to_json()["quality"]
