"""Export memory on a checkpoint with Qwen2.5-0.5B's real shapes (0.49B parameters, tied,
151936-token vocabulary), random bf16 weights written shard by shard: ``slmedge export``
runs in a child process and its own peak RSS (``os.wait4``) must stay within the issue's
bound, peak <= output size + 2 GB, verification (parity gate, quality card) included. Before
streaming, an export peaked at about twice the fp32 model (issue 15: 13.5 GB for a 1.5B fp32
export writing 6 GB).

fp16 is not asserted here: writing the graph peaks at ~1.1 GB, but verifying it runs ONNX
Runtime's CPU session, which on x86 keeps fp32 copies of fp16 weights (2.2 GB held for this
1 GB graph with external data, 2.4 GB while created; the whole export peaked at 3.33 GB, was
5.5 GB in the first tools/bench/bench_scale.py run: over output + 2 GB by ~0.35 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # an export of a 0.5B model: minutes here

GB = 1e9


@pytest.fixture(scope="module")
def qwen_shaped(tmp_path_factory):
    from helpers.bench_scripts import bench_scale

    return bench_scale.write_random_checkpoint("qwen2.5-0.5b", tmp_path_factory.mktemp("q05"))


def _export_in_child(hf_dir: Path, out: Path, *flags: str) -> tuple[int, dict, str]:
    cmd = [sys.executable, "-m", "slmedge.tools.cli", "export", "--model", str(hf_dir),
           "--output", str(out), "--json", "--eval-tokens", "64", *flags]
    with open(out.with_suffix(".stderr"), "w") as err, open(out.with_suffix(".json"), "w") as so:
        proc = subprocess.Popen(cmd, stdout=so, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.with_suffix(".stderr").read_text()[-2000:]
    manifest = json.loads(out.with_suffix(".json").read_text())
    return usage.ru_maxrss * 1024, manifest, out.with_suffix(".stderr").read_text()


def _model_bytes(manifest: dict) -> int:
    return sum(f["size"] for f in manifest["files"].values() if f["role"] == "model")


def test_fp32_export_peak_well_below_twice_the_model(qwen_shaped, tmp_path):
    peak, manifest, _ = _export_in_child(qwen_shaped, tmp_path / "fp32")
    size = _model_bytes(manifest)
    assert 1.9e9 < size < 2.1e9
    assert manifest["recipe"]["external_data"] is True  # from 1 GiB of weights
    # The old path held the traced model and its exported copy: >= 2x the fp32 weights.
    assert peak <= size + 2 * GB, f"peak RSS {peak / GB:.2f} GB for a {size / GB:.2f} GB output"
