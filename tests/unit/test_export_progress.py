"""Progress of a long export (issue 15: "progress with ETA per layer"): the library's progress
callback hears every decoder layer, with an ETA, while the model is traced, while its weights
are written and while they are quantized, and the card reports its greedy prompts with an
ETA; the manifest splits quantize_and_card into its parts."""

from __future__ import annotations

import re

import numpy as np
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


def test_card_reports_its_greedy_prompts(int4_run):
    """The fused graph batches rows (``slmedge.batch_padding: right``), so each side of the
    card decodes its prompts as one batch and says so; one prompt at a time (a graph that does
    not batch) each prompt after the first has an ETA (test_card_progress_one_at_a_time)."""
    manifest, messages = int4_run
    prompts = manifest["quality"]["greedy"]["prompts"]
    steps = manifest["quality"]["greedy"]["new_tokens"]
    for who in ("reference", "candidate"):
        found = _matching(messages, rf"^quality: greedy prompts \({who}\): (\d+) as one batch, "
                          rf"(\d+) steps$")
        assert [(int(m.group(1)), int(m.group(2))) for m in found] == [(prompts, steps)]
    assert not _matching(messages, r"greedy prompt \(\w+\) \d+/")


def test_card_progress_one_at_a_time():
    from slmedge.exporter.quality.card import _decode_rows

    class OneAtATime:  # a decoder that does not batch rows: logits favour token (last + 1) % 5
        def reset(self):
            pass

        def step(self, tokens):
            logits = np.zeros(5, dtype=np.float32)
            logits[(tokens[-1] + 1) % 5] = 1.0
            return logits

    messages: list[str] = []
    tokens, rows = _decode_rows(OneAtATime(), [[0], [1, 2], [3]], 3, progress=messages.append,
                                what="quality: greedy prompt (candidate)")
    assert tokens == [[1, 2, 3], [3, 4, 0], [4, 0, 1]]
    assert [r.shape for r in rows] == [(3, 5)] * 3
    found = _matching(messages, r"^quality: greedy prompt \(candidate\) (\d+)/3(, ETA \d+ s)?$")
    assert [int(m.group(1)) for m in found] == [1, 2, 3]
    assert found[0].group(2) is None  # no ETA before a prompt is done


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
