"""A device profile's ``recipe.int4_accuracy_level`` (issue 18): ARM profiles choose MatMulNBits'
accuracy level 1, which computes on ARM the model the x86 quality card describes (level 4 runs a
per-row int8-activation kernel on dot-product ARM cores; README, arm64 section)."""

from __future__ import annotations

import json

import onnx
import pytest

from slmedge.device_profiles import load_profile
from slmedge.exporter.onnx.export import ExportConfig
from slmedge.exporter.onnx.profile import _derived
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.runtimes.errors import UsageError

ARM = ["rpi4", "rpi5", "arm64-cpu", "android-cpu"]


@pytest.mark.parametrize("name", ARM)
def test_arm_profiles_choose_level_1(name):
    assert load_profile(name).recipe.int4_accuracy_level == 1


def test_other_profiles_keep_the_quantizer_default():
    assert load_profile("x86-cpu").recipe.int4_accuracy_level is None
    derived = _derived(ExportConfig(output="o", profile="x86-cpu", quant={"scheme": "int4"}),
                       load_profile("x86-cpu"))
    assert derived.quant.accuracy_level == QuantRecipe(scheme="int4").accuracy_level == 4


@pytest.mark.parametrize("value", [5, -1, "fast"])
def test_out_of_range_level_is_a_usage_error(tmp_path, value):
    path = tmp_path / "p.yaml"
    path.write_text(f"extends: rpi5\nrecipe: {{int4_accuracy_level: {value}}}\n")
    with pytest.raises(UsageError) as info:
        load_profile(path)
    assert "recipe.int4_accuracy_level" in str(info.value) and str(path) in str(info.value)


def test_profile_level_reaches_the_quant_recipe():
    # no --quant: the profile's scheme and level
    derived = _derived(ExportConfig(output="o", profile="rpi5"), load_profile("rpi5"))
    assert derived.quant == QuantRecipe(scheme="int4", accuracy_level=1)
    # --quant int4 with the profile: the profile's level still applies ...
    derived = _derived(ExportConfig(output="o", profile="rpi5", quant={"scheme": "int4",
                                                                       "block_size": 64}),
                       load_profile("rpi5"))
    assert (derived.quant.accuracy_level, derived.quant.block_size) == (1, 64)
    # ... unless --accuracy-level says otherwise; other schemes are left alone
    derived = _derived(ExportConfig(output="o", profile="rpi5",
                                    quant={"scheme": "int4", "accuracy_level": 4}),
                       load_profile("rpi5"))
    assert derived.quant.accuracy_level == 4
    derived = _derived(ExportConfig(output="o", profile="rpi5", quant={"scheme": "int8"}),
                       load_profile("rpi5"))
    assert derived.quant == QuantRecipe(scheme="int8")


def test_a_profile_extending_an_arm_one_with_another_scheme_still_loads(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: pi-fp32\nextends: rpi5\nrecipe: {quantization: none}\n")
    profile = load_profile(path)
    assert profile.recipe.int4_accuracy_level == 1  # inherited, unused
    assert _derived(ExportConfig(output="o", profile=str(path)), profile).quant is None


def test_profile_export_writes_level_1_on_4_bit_nodes_and_4_on_8_bit_ones(tiny_dir, tmp_path):
    """The profile's level 1 is the 4-bit nodes'; the int8 lm_head stays at level 4, ONNX
    Runtime's only fast 8-bit kernel (QuantRecipe.level_for). The manifest says what runs."""
    from slmedge.exporter.pipeline import run_export

    out = tmp_path / "arm"
    manifest = run_export(ExportConfig(model=str(tiny_dir("llama")), output=out,
                                       profile="arm64-cpu"))
    assert manifest["quantization"]["recipe"]["accuracy_level"] == 1
    assert manifest["profile"]["recipe"]["int4_accuracy_level"] == 1
    assert manifest["quantization"]["lm_head"] == "int8"
    model = onnx.load(out / "model.onnx", load_external_data=False)
    levels = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            levels.setdefault(a["bits"], []).append(a["accuracy_level"])
    assert sorted(levels) == [4, 8], levels
    assert set(levels[4]) == {1} and set(levels[8]) == {4}, levels
    written = json.loads((out / "manifest.json").read_text())["quantization"]
    assert written["recipe"]["accuracy_level"] == 1
    assert written["accuracy_levels"] == [
        {"bits": 4, "accuracy_level": 1, "nodes": len(levels[4])},
        {"bits": 8, "accuracy_level": 4, "nodes": len(levels[8])}]
