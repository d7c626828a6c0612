"""What integer zero points cost on SmolLM2's weights, without calibration (issue 16 ablation).

    python tools/bench/bench_int_zero.py [--fp32 artifacts/bench/slmedge-fp32] [--json out.json]

For every 4-bit body weight of the fp32 graph (the MatMuls with an initializer, lm_head
excluded), in blocks of ``--block-size`` rows along K, the relative squared weight error
``|W - Q(W)|^2 / |W|^2`` of:

- ``rtn``: asymmetric min/max grid, integer zero point ``round(-min / scale)``
  (ONNX Runtime's RTN with zero points; gptq.py's ``block_grid``);
- ``int_zero``: int_zero.py, the zero point rounded down and up with the scale refit in
  closed form, the better kept per block;
- ``float_zero``: the same min/max grid with the float zero point ``-min / scale`` (what HQQ's
  folded recipe can hold: on a Q4_1 source, whose blocks are ``d * q + m``, this is the
  file's own grid, so ~0).

Numpy only, no ONNX Runtime session: a weight-level answer (perplexity needs a card:
``bench_quant.py --variants abl-rtn-head8 abl-hqqint-head8 --skip-speed --no-genai``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    import onnx
    from onnx import numpy_helper

    from slmedge.exporter.quantize.gptq import block_grid, dequantize
    from slmedge.exporter.quantize.int_zero import int_zero_quantize

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, default=REPO / "artifacts" / "bench" / "slmedge-fp32")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    bs = args.block_size
    model = onnx.load(str(args.fp32 / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    totals = {"rtn": 0.0, "int_zero": 0.0, "float_zero": 0.0}
    norm, count = 0.0, 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if w.ndim != 2 or w.shape[0] % bs or w.shape[1] > 20000:  # lm_head: not a 4-bit body weight
            continue
        scale, zero = block_grid(w, bs)
        rows_s, rows_z = np.repeat(scale, bs, 0), np.repeat(zero, bs, 0)
        j = np.clip(np.round(w / rows_s + rows_z), 0, 15)
        totals["rtn"] += ((w - dequantize(j, scale, zero, bs)) ** 2).sum()
        totals["int_zero"] += ((w - dequantize(*int_zero_quantize(w, bs), bs)) ** 2).sum()
        blocks = w.reshape(-1, bs, w.shape[1])
        lo = blocks.min(axis=1)
        fz = np.repeat(-lo / scale, bs, 0)
        jf = np.clip(np.round(w / rows_s + fz), 0, 15)
        totals["float_zero"] += ((w - rows_s * (jf - fz)) ** 2).sum()
        norm += (w ** 2).sum()
        count += 1
    result = {"weights": count, "block_size": bs,
              "relative_sq_error": {k: float(v / norm) for k, v in totals.items()},
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
