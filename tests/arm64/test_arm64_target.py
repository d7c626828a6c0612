"""The runner and the quality card on an emulated arm64 target (issue 18).

Tiny llama artifacts exported here (x86) record, in their manifest's quality card, the greedy
tokens of a fixed prompt and a 256-token window's perplexity as x86 ONNX Runtime computes them
(``quality.replay``). The same artifacts go to Debian arm64 under qemu-user over ``ssh://``
(the runner's own transport, venv and caches) and replay there with ONNX Runtime's aarch64
wheel: its ARM kernels (MLAS NEON; MatMulNBits' int8-activation path) do the arithmetic.
"""

from __future__ import annotations

import json

import pytest

from slmedge.device_profiles import load_profile
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.runtimes.check.remote_card import manifest_spec, recorded_replay, run_remote_card
from slmedge.runtimes.check.target_card import compare
from slmedge.tools.cli.app import main

RECIPES = {
    "fp32": None,
    "int8": QuantRecipe(scheme="int8"),
    "int4": QuantRecipe(scheme="int4"),  # the default: HQQ, folded zero points, accuracy level 4
    # the ARM profiles' int4 (recipe.int4_accuracy_level: 1)
    "int4-arm": QuantRecipe(scheme="int4",
                            accuracy_level=load_profile("rpi5").recipe.int4_accuracy_level),
}


@pytest.fixture(scope="module")
def artifacts(tiny_artifact, tmp_path_factory):
    """fp32 exported here; int8 / int4 quantized from it (``slmedge quantize``'s path)."""
    from slmedge.exporter.quantize.pipeline import quantize_artifact

    fp32 = tiny_artifact("llama")
    out = {"fp32": fp32}
    for name, recipe in RECIPES.items():
        if recipe is not None:
            out[name] = tmp_path_factory.mktemp(f"arm64-{name}") / "artifact"
            quantize_artifact(fp32, out[name], recipe)
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bench_on_the_target_reports_aarch64(arm64_target, artifacts, capsys):
    code, out, err = run(capsys, "bench", artifacts["fp32"], "--target", arm64_target.url,
                         "--json", "--prompt-tokens", "8", "--new-tokens", "4", "--warmup", "0",
                         "--repeats", "1", "--prompt-buckets", "8", "--depths", "8",
                         "--threads", "1", "--no-record", "--no-store")
    assert code == 0, err
    result = json.loads(out)
    assert result["target"] == arm64_target.url
    assert result["environment"]["arch"] == "aarch64"
    assert result["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("name", ["fp32", "int8", "int4-arm"])
def test_same_greedy_tokens_and_perplexity_as_x86(arm64_target, artifacts, name):
    art = artifacts[name]
    recorded, _gate = recorded_replay(art)
    assert recorded["machine"] == "x86_64"
    measured = run_remote_card(arm64_target.url, art, manifest_spec(art))
    assert measured["platform"]["machine"] == "aarch64"
    report = compare(recorded, measured)
    assert report["tokens_equal"], report
    assert report["greedy_agreement"] == 1.0
    # float arithmetic in another order (NEON vs AVX2 kernels): a rounding difference, no more
    assert abs(report["ppl_diff_pct"]) < 0.05, report


def test_int4_recorded_behaviour(arm64_target, artifacts):
    # The default int4 (HQQ, zero points folded away: MatMulNBits nodes without zero points,
    # accuracy level 4). On ARM with dot-product instructions such nodes run ONNX Runtime's
    # KleidiAI kernel, which quantizes activations per row where x86 quantizes per block of 32
    # (test_matmulnbits_arm.py): another model, slightly. Measured on this tiny llama (qemu
    # 7.2, CPU "max", onnxruntime 1.32.0): the 16 greedy tokens equal x86's (its logits are far
    # apart: a random model), window perplexity 159.842 vs 160.066 on x86 (-0.14%), where fp32
    # and int8 agree to < 0.05%; with the correction M stored fp16 (e0e94c2) the same window
    # differs by -0.02%: how far the kernels part depends on the graph, so only the bound is
    # asserted here (the kernels' difference itself: test_matmulnbits_arm.py). SmolLM2-135M,
    # whose tokens are close calls, left x86's greedy text after 8 tokens (issue 18).
    art = artifacts["int4"]
    recorded, _gate = recorded_replay(art)
    measured = run_remote_card(arm64_target.url, art, manifest_spec(art))
    report = compare(recorded, measured)
    assert report["tokens_equal"], report
    assert abs(report["ppl_diff_pct"]) < 0.5, report


def test_check_target_replays_the_card(arm64_target, artifacts, capsys):
    code, out, err = run(capsys, "check", artifacts["int8"], "--target", arm64_target.url,
                         "--json", "--strict")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["platform"]["machine"] == "aarch64"
    assert doc["recorded_on"]["machine"] == "x86_64"
    assert doc["tokens_equal"] and doc["greedy_agreement"] == 1.0 and doc["within_gate"]
    assert doc["kl_mean"] < 1e-6  # same arithmetic up to rounding
    # text output names the comparison
    code, out, err = run(capsys, "check", artifacts["int8"], "--target", arm64_target.url)
    assert code == 0, err
    assert "greedy tokens of 'It is a truth universally acknowledged that': identical" in out


def test_check_target_strict_fails_outside_the_gate(arm64_target, artifacts, capsys, tmp_path):
    # A copy of the int4 artifact whose recorded reference perplexity is 10% lower than its
    # fp32 graph's: on the target the replay is then ~+11% from it, outside the 5% gate.
    import shutil

    art = tmp_path / "int4-tight"
    shutil.copytree(artifacts["int4"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    replay = manifest["quality"]["replay"]
    replay["reference_perplexity"] = replay["reference_perplexity"] * 0.9
    (art / "manifest.json").write_text(json.dumps(manifest))
    code, _out, err = run(capsys, "check", art, "--target", arm64_target.url, "--strict")
    assert code == 3, err
    assert "outside the gate of +5%" in err
    assert run(capsys, "check", art, "--target", arm64_target.url)[0] == 0  # without --strict


@pytest.fixture(scope="module")
def int8_bundle(artifacts, tmp_path_factory):
    """The int8 artifact bundled for arm64-cpu here: the bundle records x86's greedy tokens."""
    out = tmp_path_factory.mktemp("arm64-bundle") / "bundle"
    assert main(["bundle", str(artifacts["int8"]), "--profile", "arm64-cpu", "-o", str(out)]) == 0
    return out


def test_verify_target_checks_the_bundle_on_the_device(arm64_target, int8_bundle, capsys):
    code, out, err = run(capsys, "verify", int8_bundle, "--target", arm64_target.url, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["platform"]["machine"] == "aarch64" and doc["ok"]
    assert doc["bundle"] == str(int8_bundle)
    assert doc["parity"]["tokens_match"] and doc["files_checked"] >= 3
    code, out, err = run(capsys, "verify", int8_bundle, "--target", arm64_target.url)
    assert code == 0, err
    assert "greedy tokens match" in out and "aarch64" in out


def test_verify_target_reports_the_devices_failure_as_here(arm64_target, int8_bundle, capsys,
                                                          tmp_path):
    import shutil

    from slmedge.runtimes.bench.remote import DEFAULT_SSH_DIR, artifact_files

    bundle = tmp_path / "bundle-on-device"
    shutil.copytree(int8_bundle, bundle)
    # the runner's upload cache on the target (an earlier run's copy would be reused)
    copy = arm64_target.root / "root" / DEFAULT_SSH_DIR / "artifacts" / \
        f"{bundle.name}-{artifact_files(bundle)[0]}"
    shutil.rmtree(copy, ignore_errors=True)
    assert run(capsys, "verify", bundle, "--target", arm64_target.url)[0] == 0
    # the copy on the device goes bad (the one here stays intact): the device's check says so
    model = next(copy.rglob("*.onnx"))
    model.write_bytes(model.read_bytes()[:-100])
    code, _out, err = run(capsys, "verify", bundle, "--target", arm64_target.url)
    assert code == 1, err
    assert f"on {arm64_target.url}" in err and "(aarch64)" in err
    assert f"{bundle}/" in err and model.name in err and "truncated" in err
    shutil.rmtree(copy)
    # a bad copy here is found here, before anything is copied
    model = next(bundle.rglob("*.onnx"))
    model.write_bytes(b"")
    code, _out, err = run(capsys, "verify", bundle, "--target", arm64_target.url)
    assert code == 1 and "aarch64" not in err and model.name in err, err
    code, _out, err = run(capsys, "verify", bundle, "--target", arm64_target.url, "--no-parity")
    assert code == 2 and "--no-parity" in err


def test_verify_target_parity_failure_exits_3(arm64_target, int8_bundle, capsys, tmp_path):
    # A bundle whose recorded greedy tokens are not the model's (its manifest edited): the
    # checks here pass (files, versions), the device's parity replay does not.
    import shutil

    bundle = tmp_path / "bundle-wrong-tokens"
    shutil.copytree(int8_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    tokens = manifest["parity"]["greedy_tokens"]
    tokens[-1] = (tokens[-1] + 1) % 100
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, _out, err = run(capsys, "verify", bundle, "--target", arm64_target.url)
    assert code == 3, err
    assert "(aarch64)" in err and "parity check failed" in err and str(bundle) in err
