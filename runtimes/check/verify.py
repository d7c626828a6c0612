"""``slmedge verify``: check a bundle against its manifest where only onnxruntime + numpy exist.

Three checks, in order, each a clear error:

1. every file the bundle manifest lists is there, with its size and sha256
   (missing / truncated / altered -> :class:`ArtifactError`, exit 1, naming the file);
2. the graphs' ONNX IR version, opset and contrib ops are ones the named ONNX Runtime
   version runs (too new -> :class:`UnsupportedOp`, exit 4, naming the opset or op; a TFLite
   bundle has no ONNX graphs, so ``--runtime-version`` is a usage error there); each ``.ort``
   file's header is read (:mod:`slmedge.runtimes.check.ort_format`; not an ORT FlatBuffers file ->
   :class:`~slmedge.runtimes.check.ort_format.OrtFormatError`, exit 1, naming it) and its ORT format
   version must be one the named release loads (exit 4 naming the file, its format version
   and the first release that reads it);
3. a short parity check: the prompt recorded at bundle time through slmedge's own
   runtime (ONNX Runtime, or LiteRT via ai-edge-litert for a ``.tflite``) gives the same
   greedy tokens and first-step logits as were recorded then.

The version table below is what :mod:`slmedge.exporter.bundle.build` uses to write the bundle's
``minimum_onnxruntime`` (raised by the ORT format table of :mod:`.ort_format` for ``.ort``
files); keeping both in torch-free modules means bundle and verify can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slmedge.runtimes.artifact import MANIFEST_NAME, open_artifact, sha256_file
from slmedge.runtimes.errors import ArtifactError, QualityGateFailed, UnsupportedOp, UsageError
from .ort_format import format_problem, format_requirement, ort_file_facts, raise_minimum

if TYPE_CHECKING:
    from slmedge.runtimes.manifest_schema import BundleManifest

# -- what each ONNX Runtime release runs ----------------------------------------------------
#
# ONNX opset and IR version each ONNX Runtime release implements: the "ONNX Runtime
# compatibility" table (https://onnxruntime.ai/docs/reference/compatibility.html), written
# down from it (the stored copy of the repository's docs/Versioning.md here stops at 1.3). ORT
# refuses a model with a newer IR version ("Unsupported model IR version") and an opset it
# does not implement. Rows: (ORT version, highest ai.onnx opset, highest IR version).
ORT_ONNX_SUPPORT: tuple[tuple[tuple[int, int], int, int], ...] = (
    ((1, 10), 15, 8),
    ((1, 11), 16, 8),
    ((1, 12), 17, 8),
    ((1, 13), 17, 8),
    ((1, 14), 18, 8),
    ((1, 15), 19, 9),
    ((1, 16), 19, 9),
    ((1, 17), 20, 9),
    ((1, 18), 21, 10),
    ((1, 20), 21, 10),
    ((1, 21), 22, 10),
    ((1, 23), 23, 11),
)

# First ONNX Runtime release with a CPU kernel for each com.microsoft op slmedge emits
# (the release notes / ContribOperators.md history of microsoft/onnxruntime). A reduced
# build (required-operators config) must also include them. An op missing here is reported
# as unknown rather than guessed.
CONTRIB_OP_MIN_ORT: dict[str, tuple[int, int]] = {
    "com.microsoft.SkipLayerNormalization": (1, 10),
    "com.microsoft.SkipSimplifiedLayerNormalization": (1, 16),
    "com.microsoft.FastGelu": (1, 10),
    "com.microsoft.BiasGelu": (1, 10),
    "com.microsoft.Gelu": (1, 10),
    "com.microsoft.DynamicQuantizeMatMul": (1, 10),
    "com.microsoft.MatMulIntegerToFloat": (1, 10),
    "com.microsoft.RotaryEmbedding": (1, 17),
    "com.microsoft.MatMulNBits": (1, 17),
    # GQA on CPU came in 1.17; graphs exported with --padding-mask feed it position_ids and
    # attention_bias (inputs 10 and 11), which the CPU kernel takes since
    # microsoft/onnxruntime#23944 (March 2025, released in 1.22). Default graphs feed neither;
    # 1.22 is kept for both (the shared-KV-buffer mode was not checked on older releases).
    "com.microsoft.GroupQueryAttention": (1, 22),
    # ORT registers SimplifiedLayerNormalization in the ai.onnx domain, but it is no ONNX
    # standard op (a contrib kernel under the default domain).
    "SimplifiedLayerNormalization": (1, 14),
}


def parse_version(text: str) -> tuple[int, int]:
    """``"1.14"`` or ``"1.14.1"`` -> ``(1, 14)``; a UsageError for anything else."""
    parts = str(text).strip().split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise UsageError(f"--runtime-version {text!r}: expected MAJOR.MINOR such as 1.20") from None
    return major, minor


def format_version(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _support_of(version: tuple[int, int]) -> tuple[int, int] | None:
    """(highest opset, highest IR version) of an ORT release, from the table."""
    rows = [row for row in ORT_ONNX_SUPPORT if row[0] <= version]
    return (rows[-1][1], rows[-1][2]) if rows else None


def graph_requirements(facts: dict) -> list[tuple[tuple[int, int] | None, str]]:
    """``[(minimum ORT version or None if unknown, reason)]`` for one graph's facts
    (``ir_version``, ``opset``, ``contrib_ops`` as the bundle manifest records them)."""
    needs: list[tuple[tuple[int, int] | None, str]] = []
    opset, ir = facts.get("opset"), facts.get("ir_version")
    if opset is not None:
        first = next((v for v, o, _ in ORT_ONNX_SUPPORT if o >= opset), None)
        needs.append((first, f"opset {opset}"))
    if ir is not None:
        first = next((v for v, _, i in ORT_ONNX_SUPPORT if i >= ir), None)
        needs.append((first, f"IR version {ir}"))
    for op in facts.get("contrib_ops", []):
        needs.append((CONTRIB_OP_MIN_ORT.get(op), f"op {op}"))
    return needs


def minimum_onnxruntime(graphs: dict[str, dict]) -> dict:
    """The lowest ORT version that runs every graph, and what decides it."""
    best: tuple[int, int] = ORT_ONNX_SUPPORT[0][0]
    reasons, unknown = [], []
    for name, facts in graphs.items():
        for version, reason in graph_requirements(facts):
            if version is None:
                unknown.append(f"{name}: {reason}")
            elif version > best:
                best, reasons = version, [f"{name}: {reason}"]
            elif version == best:
                reasons.append(f"{name}: {reason}")
    return {"version": format_version(best), "because": sorted(set(reasons)),
            "unknown": sorted(set(unknown))}


def runtime_problems(graphs: dict[str, dict], runtime: tuple[int, int]) -> list[str]:
    """What in the graphs the ORT release ``runtime`` cannot run (empty: all fine)."""
    support = _support_of(runtime)
    problems = []
    for name, facts in graphs.items():
        if support is None:
            problems.append(f"{name}: ONNX Runtime {format_version(runtime)} is older than "
                            f"{format_version(ORT_ONNX_SUPPORT[0][0])}, the oldest slmedge knows")
            continue
        max_opset, max_ir = support
        if facts.get("opset", 0) > max_opset:
            problems.append(f"{name}: opset {facts['opset']} (ONNX Runtime "
                            f"{format_version(runtime)} implements up to opset {max_opset})")
        if facts.get("ir_version", 0) > max_ir:
            problems.append(f"{name}: IR version {facts['ir_version']} (ONNX Runtime "
                            f"{format_version(runtime)} reads up to IR version {max_ir})")
        for op in facts.get("contrib_ops", []):
            first = CONTRIB_OP_MIN_ORT.get(op)
            if first is not None and first > runtime:
                problems.append(f"{name}: op {op} (needs ONNX Runtime {format_version(first)})")
    return problems


# -- the checks -----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``slmedge verify`` checked and found."""

    bundle: str
    files_checked: int = 0
    runtime_version: str | None = None
    minimum_onnxruntime: str | None = None
    #: per ``.ort`` file: format_version, minimum_onnxruntime, ir_version, opset, converted_with
    ort_files: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "ok": True, "files_checked": self.files_checked,
                "runtime_version": self.runtime_version,
                "minimum_onnxruntime": self.minimum_onnxruntime, "ort_files": self.ort_files,
                "parity": self.parity}


def read_bundle_manifest(root: Path) -> BundleManifest:
    """The bundle's typed manifest, or a clear error if ``root`` is not a bundle (or one of
    another schema version: exit 2)."""
    from slmedge.runtimes.manifest_schema import BundleManifest, load_manifest

    if not root.is_dir():
        raise UsageError(f"bundle '{root}' is not a directory; write one with "
                         f"slmedge bundle ARTIFACT --profile NAME -o {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"'{root}' has no {MANIFEST_NAME}, so it is not an slmedge bundle; "
                            "write one with slmedge bundle")
    manifest = load_manifest(path)
    if not isinstance(manifest, BundleManifest):
        raise ArtifactError(f"{path} is an artifact manifest, not a bundle's; verify checks "
                            "what slmedge bundle wrote (slmedge bundle DIR --profile NAME -o OUT)")
    return manifest


def check_files(root: Path, manifest: BundleManifest) -> int:
    """Re-hash every listed file; raise naming each missing, truncated or altered one."""
    problems = []
    for rel, meta in sorted(manifest.files.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != meta.size:
            problems.append(f"{rel}: {p.stat().st_size} bytes, the manifest says {meta.size} "
                            "(truncated or altered)")
        elif sha256_file(p) != meta.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest (altered or corrupt)")
    if problems:
        raise ArtifactError(f"{root}: {len(problems)} of {len(manifest.files)} files "
                            f"fail the check: {'; '.join(problems)} — copy the bundle again or "
                            "rebuild it with slmedge bundle")
    return len(manifest.files)


def check_ort_files(root: Path, manifest: BundleManifest) -> dict[str, dict]:
    """Read the header of every ``.ort`` file the manifest lists: ``{name: {format_version,
    minimum_onnxruntime, ir_version, opset, converted_with}}``. The producing onnxruntime is
    not in the file; it comes from the manifest (``ort_format.graphs``; None in bundles written
    before slmedge recorded it). Raises naming a file that is no ORT FlatBuffers file."""
    recorded = (manifest.ort_format.graphs if manifest.ort_format else None) or {}
    out = {}
    for rel in sorted(manifest.files):
        if not rel.lower().endswith(".ort"):
            continue
        facts = ort_file_facts(root / rel, f"{root / rel}",
                               (recorded.get(rel) or {}).get("converted_with"))
        out[rel] = {k: facts[k] for k in ("format_version", "minimum_onnxruntime",
                                          "ir_version", "opset", "converted_with")}
    return out


def open_bundle_decoder(artifact, threads: int = 1):
    """``(decoder, runtime description)`` for a bundle or artifact: LiteRT for a ``.tflite``,
    else ONNX Runtime (the static prefill/decode graphs or the dynamic KV-cache graph), on CPU.
    Bundle time and verify time use this one loader, so they replay the same way."""
    from slmedge.runtimes.sessions.static_decoder import open_decoder

    decoder = open_decoder(artifact, threads=threads)
    if artifact.format == "tflite":
        return decoder, f"slmedge LiteRTDecoder, {decoder.backend} {decoder.backend_version}"
    import onnxruntime as ort

    return decoder, f"slmedge OnnxDecoder, onnxruntime {ort.__version__}"


def check_parity(root: Path, manifest: BundleManifest, threads: int = 1) -> dict:
    """Run the recorded prompt through slmedge's runtime; compare with the recorded tokens."""
    ref = manifest.parity
    if not ref:
        return {"skipped": "the bundle manifest records no parity reference"}
    from slmedge.runtimes.generation import generate

    decoder, runtime = open_bundle_decoder(open_artifact(root), threads=threads)
    first = np.asarray(decoder.logits(ref.prompt_ids)[-1], dtype=np.float64)
    ids = np.asarray(ref.first_step.top_ids)
    got = first[ids]
    diff = float(np.max(np.abs(got - np.asarray(ref.first_step.top_logits))))
    tokens = generate(decoder, ref.prompt_ids, len(ref.greedy_tokens)).tokens
    result = {"prompt_tokens": len(ref.prompt_ids), "tokens": len(tokens),
              "tokens_match": tokens == ref.greedy_tokens, "max_abs_diff": diff,
              "atol": ref.atol, "runtime": runtime}
    if not result["tokens_match"] or diff > ref.atol:
        pairs = zip(tokens, ref.greedy_tokens, strict=False)
        where = next((i for i, (a, b) in enumerate(pairs) if a != b),
                     min(len(tokens), len(ref.greedy_tokens)))
        said = "match" if result["tokens_match"] else f"differ from token {where}"
        raise QualityGateFailed(
            f"{root}: parity check failed: greedy tokens {said}, first-step logits max |diff| "
            f"{diff:.2e} (allowed {ref.atol:.0e}); this runtime does not reproduce the "
            "bundle's recorded output", figures=result)
    return result


def verify_bundle(path: str | Path, runtime_version: str | None = None,
                  parity: bool = True, threads: int = 1) -> VerifyReport:
    """Run the three checks on a bundle directory; raise on the first that fails."""
    root = Path(path)
    manifest = read_bundle_manifest(root)
    report = VerifyReport(bundle=str(root))
    report.files_checked = check_files(root, manifest)
    graphs = manifest.onnx
    report.ort_files = check_ort_files(root, manifest)
    ort_needs = [format_requirement(rel, facts["format_version"])
                 for rel, facts in report.ort_files.items()]
    report.minimum_onnxruntime = raise_minimum(minimum_onnxruntime(graphs), ort_needs)["version"] \
        if graphs or ort_needs else None
    if runtime_version and manifest.format == "tflite":
        raise UsageError(
            f"--runtime-version names an ONNX Runtime release, and {root} is a TFLite bundle "
            f"(LiteRT {(manifest.litert or {}).get('verified_with', '?')}); "
            "verify it without --runtime-version")
    if runtime_version:
        wanted = parse_version(runtime_version)
        report.runtime_version = format_version(wanted)
        graph_problems = runtime_problems(graphs, wanted)
        ort_problems = [
            problem for rel, facts in report.ort_files.items()
            if (problem := format_problem(rel, facts["format_version"], wanted,
                                          facts["converted_with"]))]
        if graph_problems or ort_problems:
            fixes = (["export with a lower --opset / without fusion"] if graph_problems else []) \
                + (["convert the .ort files with that onnxruntime release, or ship the .onnx "
                    "graphs (slmedge bundle --format onnx)"] if ort_problems else [])
            raise UnsupportedOp(
                f"ONNX Runtime {format_version(wanted)} cannot run this bundle: "
                f"{'; '.join(graph_problems + ort_problems)} — the bundle needs ONNX Runtime "
                f">= {report.minimum_onnxruntime}; update the app's runtime, or "
                f"{' and '.join(fixes)} for an older one")
    if parity:
        report.parity = check_parity(root, manifest, threads=threads)
    return report
