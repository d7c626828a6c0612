"""One quantization scheme type (device_profiles.schema.QuantScheme) for the CLI, the ONNX
recipe, the TFLite config and the profiles; each still offers exactly its own names."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slmedge.device_profiles.schema import (
    ONNX_SCHEMES,
    PROFILE_SCHEMES,
    TFLITE_SCHEMES,
    QuantScheme,
    Recipe,
)
from slmedge.exporter.quantize.recipe import QuantRecipe
from slmedge.exporter.tflite.options import TfliteExportConfig, parse_quant
from slmedge.runtimes.errors import UsageError


def test_every_consumer_names_the_same_type():
    assert QuantRecipe(scheme="a16w8").scheme is QuantScheme.a16w8
    assert Recipe(quantization="a16w8").quantization is QuantScheme.a16w8
    assert TfliteExportConfig(output="x", quant="int8-static").quant is QuantScheme.int8_static


def test_each_format_offers_the_names_it_always_did():
    assert [s.value for s in ONNX_SCHEMES] == ["int4", "int8", "int8-static", "a16w8"]
    assert [s.value for s in PROFILE_SCHEMES] == ["none", "int4", "int8", "int8-static", "a16w8"]
    assert [s.value for s in TFLITE_SCHEMES] == ["fp32", "fp16", "int8-dynamic", "int8-weight",
                                                "int4-block32", "int8-static"]
    assert set(QuantScheme) == {*PROFILE_SCHEMES, *TFLITE_SCHEMES}


@pytest.mark.parametrize("name, scheme", [("int8", "int8-dynamic"), ("int4", "int4-block32"),
                                          ("none", "fp32"), (None, "fp32"), ("fp16", "fp16")])
def test_tflite_takes_the_onnx_names_as_aliases(name, scheme):
    assert parse_quant(name) is QuantScheme(scheme)
    assert parse_quant(QuantScheme(name or "none")) is QuantScheme(scheme)


def test_a_scheme_of_another_format_is_refused_with_the_formats_own_list():
    with pytest.raises(ValidationError, match="ONNX quantizer does not offer quantization "
                       "'int8-dynamic'; choose one of int4, int8, int8-static, a16w8"):
        QuantRecipe(scheme="int8-dynamic")
    with pytest.raises(ValidationError, match="recipe does not offer quantization 'fp16'; "
                       "choose one of none, int4, int8, int8-static, a16w8"):
        Recipe(quantization="fp16")
    with pytest.raises(UsageError, match="--format tflite does not offer --quant a16w8"):
        parse_quant("a16w8")


def test_the_qdq_subset_is_named_once_and_every_consumer_agrees():
    """QDQ_SCHEMES (int8-static, a16w8): the calibrated QDQ schemes. The quantizer sends them
    to its QDQ strategy, their lm_head is float or int8, a profile's float_ops needs one."""
    from slmedge.device_profiles.schema import QDQ_SCHEMES
    from slmedge.exporter.quantize.core import STRATEGIES, strategy_for

    assert set(QDQ_SCHEMES) < set(ONNX_SCHEMES)
    qdq = {type(STRATEGIES[(s, None)]) for s in QDQ_SCHEMES}
    assert len(qdq) == 1  # one strategy for both
    for scheme in ONNX_SCHEMES:
        takes_qdq = type(strategy_for(QuantRecipe(scheme=scheme))) in qdq
        assert takes_qdq == (scheme in QDQ_SCHEMES), scheme
        head = "int4" if scheme is QuantScheme.int4 else None
        if scheme in QDQ_SCHEMES:
            with pytest.raises(ValidationError, match=f"lm_head int4 needs scheme int4, not "
                               f"{scheme.value}"):  # QDQ keeps lm_head float or int8
                QuantRecipe(scheme=scheme, lm_head="int4")
            assert Recipe(quantization=scheme, float_ops=["Softmax"]).float_ops == ["Softmax"]
        else:
            QuantRecipe(scheme=scheme, lm_head=head)
            with pytest.raises(ValidationError, match="float_ops applies to static QDQ "
                               r"\(int8-static, a16w8\) only"):
                Recipe(quantization=scheme, float_ops=["Softmax"])


@pytest.mark.parametrize("quantization, precision, quant", [
    ("none", "fp32", None), ("none", "fp16", "fp16"), ("int8", "fp32", "int8-dynamic"),
    ("int4", "fp32", "int4-block32"), ("int8-static", "fp32", "int8-static"),
    ("a16w8", "fp32", "refused")])
def test_a_litert_profile_names_its_tflite_scheme(tmp_path, quantization, precision, quant):
    from slmedge.exporter.tflite.options import profile_fields

    path = tmp_path / "pixel-litert.yaml"
    path.write_text(
        "name: pixel-litert\nextends: android-cpu\n"
        "runtime:\n  engine: litert\n  providers:\n    - name: CPUExecutionProvider\n"
        "shapes:\n  policy: static\n  context_length: 32\n  prefill_chunk: 8\n"
        f"recipe:\n  precision: {precision}\n  quantization: {quantization}\n"
        "artifact:\n  formats: [tflite]\n  required_operators_config: false\n")
    if quant == "refused":
        with pytest.raises(UsageError, match="a16w8 has no TFLite recipe here; use int8-static"):
            profile_fields(str(path))
        return
    fields = profile_fields(str(path))
    assert fields.get("quant") == quant
    if quant:
        assert TfliteExportConfig(output="x", quant=fields["quant"]).quant is QuantScheme(quant)
