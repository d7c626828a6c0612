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
from slmedge.exporter.tflite_options import TfliteExportConfig, parse_quant
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
