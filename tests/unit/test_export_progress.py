"""Progress of a long export (issue 15: "progress with ETA per layer"): the library's progress
callback hears every decoder layer, with an ETA, while the model is traced, while its weights
are written and while they are quantized, and the card reports its greedy prompts with an
ETA; the manifest splits quantize_and_card into its parts."""

from __future__ import annotations

import re

import pytest

from slmedge.exporter.pipeline import ExportConfig, run_export
from slmedge.exporter.quantize.recipe import QuantRecipe


@pytest.fixture(scope="module")
def int4_run(tiny_dir, tmp_path_factory):
    messages: list[str] = []
    out = tmp_path_factory.mktemp("progress") / "artifact"
    manifest = run_export(ExportConfig(model=str(tiny_dir("llama")), output=out,
                                       quant=QuantRecipe(scheme="int4"),
                                       quality={"eval_tokens": 64, "new_tokens": 4}),
                          progress=messages.append)
    return manifest, messages


def _matching(messages: list[str], pattern: str) -> list[re.Match]:
    return [m for m in (re.search(pattern, msg) for msg in messages) if m]


def test_trace_reports_each_layer_with_an_eta(int4_run):
    _, messages = int4_run  # the tiny llama has 2 decoder layers
    found = _matching(messages, r"^tracing: layer (\d+)/2 reached(, forward pass ETA \d+ s)?")
    assert [int(m.group(1)) for m in found] == [1, 2]
    # the ETA from the layers after the first (before it: torch.export's setup)
    assert found[0].group(2) is None and found[1].group(2)
    assert any(m.startswith("traced in ") for m in messages)
    # the trace's messages come before the weights are written
    first_write = next(i for i, m in enumerate(messages) if m.startswith("writing weights"))
    assert max(messages.index(m.string) for m in found) < first_write


def test_write_and_quantize_report_each_layer_with_an_eta(int4_run):
    _, messages = int4_run
    writes = _matching(messages, r"^writing weights: layer (\d+)/2, .* ETA \d+ s")
    assert [int(m.group(1)) for m in writes] == [1, 2]
    quantized = _matching(messages, r"^layer (\d+): (\d+)/(\d+) tensors quantized")
    assert [int(m.group(1)) for m in quantized] == [0, 1]  # HF's 0-based layer names
    # from the second layer on, an ETA from the tensors done so far
    assert re.search(r", ~\d+ s left$", quantized[-1].string)


def test_card_reports_greedy_prompts_with_an_eta(int4_run):
    manifest, messages = int4_run
    prompts = manifest["quality"]["greedy"]["prompts"]
    for who in ("quality reference", "quality"):
        found = _matching(messages, rf"^{who}: greedy prompt (\d+)/{prompts}(, ETA \d+ s)?$")
        assert [int(m.group(1)) for m in found] == list(range(1, prompts + 1))
        # every prompt after the first has an ETA from the prompts done (the first has none)
        assert found[0].group(2) is None and all(m.group(2) for m in found[1:])


def test_manifest_splits_quantize_and_card(int4_run):
    manifest, _ = int4_run
    timings = manifest["timings_s"]
    parts = timings["quantize_and_card_parts"]
    assert set(parts) == {"quantize", "one_file", "card_reference", "card_candidate"}
    assert all(v >= 0 for v in parts.values())
    assert parts["quantize"] == manifest["quantization"]["seconds"]
    # the parts are quantize_and_card's seconds (each rounded to 0.01 s; the gate's
    # bookkeeping between them is not timed)
    assert sum(parts.values()) <= timings["quantize_and_card"] + 0.05
    assert sum(parts.values()) >= timings["quantize_and_card"] * 0.9 - 0.05
    assert "timings_s" not in manifest["quantization"]
