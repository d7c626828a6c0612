"""Sizes of bundles per file type and in total, as the README's Markdown table.

    python tools/bench/bundle_sizes.py artifacts/bundles/android-cpu artifacts/bundles/ios-coreml ...

Reads each bundle's manifest (the sizes slmedge bundle recorded and verify re-checked) and
the ``.zip`` beside it when there is one. MB = 10^6 bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: Column -> how a file is recognised (first match wins; order is the table's).
KINDS = (
    ("graph .onnx", lambda rel, m: rel.endswith(".onnx")),
    ("weights .onnx.data", lambda rel, m: rel.endswith(".onnx.data") or rel.endswith(".data")),
    (".ort", lambda rel, m: rel.endswith(".ort")),
    (".tflite", lambda rel, m: rel.endswith(".tflite")),
    ("tokenizer", lambda rel, m: m.get("role") == "tokenizer"),
    ("snippets", lambda rel, m: m.get("role") == "snippet"),
    ("other (genai_config, ops config)", lambda rel, m: True),
)


def sizes(bundle: Path) -> dict[str, float]:
    """MB per kind, the total of the listed files plus manifest.json, and the zip's size."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    out = {name: 0.0 for name, _ in KINDS}
    for rel, meta in manifest["files"].items():
        kind = next(name for name, match in KINDS if match(rel, meta))
        out[kind] += meta["size"] / 1e6
    out["manifest.json"] = (bundle / "manifest.json").stat().st_size / 1e6
    out["total"] = sum(out.values())
    zipped = bundle.parent / f"{bundle.name}.zip"
    out["zip"] = zipped.stat().st_size / 1e6 if zipped.exists() else float("nan")
    return out


def label(bundle: Path) -> str:
    """The bundle's name with the model format it ships and how often it holds the weights
    (``slmedge bundle --format``; bundles written before the choice existed: name only)."""
    shipped = json.loads((bundle / "manifest.json").read_text()).get("model_format")
    if not shipped:
        return bundle.name
    return f"{bundle.name} ({shipped['shipped']}, weights x{shipped['weights_copies']})"


def table(bundles: list[Path]) -> str:
    rows = {label(b): sizes(b) for b in bundles}
    cols = [name for name, _ in KINDS] + ["manifest.json", "total", "zip"]
    cols = [c for c in cols if any(r[c] for r in rows.values())]  # drop all-zero columns
    lines = ["| bundle | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[c]:.1f}" if r[c] >= 0.05 else f"{r[c]:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table([Path(p) for p in sys.argv[1:]]))
