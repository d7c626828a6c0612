"""``slmedge check``: where would this artifact's nodes run on the profile's target, without
the device?

- QNN: an actual session on the HTP backend of ``onnxruntime-qnn`` (an emulator on x86
  Linux), CPU fallback allowed so that every node the HTP does not take can be listed.
- NNAPI / CoreML: ONNX Runtime's mobile usability checker (the partitioning logic of
  ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``), on the graph as
  exported, with shapes inferred: supported nodes, partitions, unsupported ops. This
  needs the ``onnx`` package.
- CPU profiles: a CPU session (ONNX Runtime's own fusions applied) and the nodes that have
  no optimized kernel for the profile's recipe (float MatMuls where int4 is expected,
  unfused attention or norms).

The result is one table of node / op / reason for everything that would not run where the
profile wants it, plus per-graph coverage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmedge.runtimes.artifact import Artifact, open_artifact
from slmedge.runtimes.errors import MissingDependency
from .memory_budget import estimate_memory

QNN = "QNNExecutionProvider"
NNAPI = "NnapiExecutionProvider"
COREML = "CoreMLExecutionProvider"
CPU = "CPUExecutionProvider"
#: CPU kernels that are the fast path for a decoder (MLAS / contrib fusions).
FUSED_ATTENTION = {"com.microsoft.GroupQueryAttention", "com.microsoft.MultiHeadAttention",
                   "com.microsoft.Attention"}
FUSED_NORMS = {"com.microsoft.SimplifiedLayerNormalization", "SimplifiedLayerNormalization",
               "com.microsoft.SkipSimplifiedLayerNormalization", "RMSNormalization",
               "LayerNormalization", "com.microsoft.SkipLayerNormalization"}
BIG_WEIGHT_ELEMENTS = 1 << 16  # a MatMul weight this large is a projection worth quantizing


@dataclass
class Row:
    graph: str
    node: str
    op: str
    reason: str


@dataclass
class GraphCheck:
    """Coverage of one graph file on the profile's target."""

    file: str
    method: str
    total_nodes: int | None = None
    target_nodes: int | None = None  # nodes the accelerator (or fast CPU path) takes
    partitions: int | None = None
    nodes_by_provider: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def coverage(self) -> float | None:
        if not self.total_nodes or self.target_nodes is None:
            return None
        return self.target_nodes / self.total_nodes


@dataclass
class CheckReport:
    profile: str
    artifact: str
    target: str
    graphs: list[GraphCheck]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    #: weights + KV cache + runtime vs the profile's device.ram_budget_mb (memory_budget.py)
    memory: dict | None = None

    @property
    def fits_memory(self) -> bool:
        return self.memory is None or bool(self.memory["fits"])

    @property
    def ops(self) -> dict[str, int]:
        """Op types of the table with their counts, most frequent first."""
        return dict(Counter(r.op for r in self.rows).most_common())

    @property
    def fully_placed(self) -> bool:
        return not self.rows and all(g.error is None for g in self.graphs)

    def to_dict(self, max_rows: int | None = None) -> dict:
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        return {
            "profile": self.profile,
            "artifact": self.artifact,
            "target": self.target,
            "fully_placed": self.fully_placed,
            "graphs": [{**asdict(g), "coverage": None if g.coverage is None
                        else round(g.coverage, 4)} for g in self.graphs],
            "ops": self.ops,
            "rows": [asdict(r) for r in rows],
            "rows_truncated": len(self.rows) - len(rows),
            "notes": self.notes,
            "memory": self.memory,
        }


def graph_files(artifact) -> list[Path]:
    """The graphs to place: a static export's prefill + decode, else the model file."""
    info = artifact.info
    if info and info.static:
        return [artifact.root / info.static.prefill_file, artifact.root / info.static.decode_file]
    return [artifact.model_path]


def check_artifact(path: str | Path | Artifact, profile,
                   context: int | None = None) -> CheckReport:
    """Placement of every graph of the artifact at ``path`` on ``profile``'s target, and its
    memory (weights + KV cache at ``context`` tokens) against the profile's RAM budget.
    ``path`` may be an :class:`Artifact` already in hand (an export checks its staging
    directory with the manifest it is about to write)."""
    artifact = path if isinstance(path, Artifact) else open_artifact(path)
    target = profile.accelerator or profile.runtime.providers[0].name
    shown = artifact.root if isinstance(path, Artifact) else path
    report = CheckReport(profile.name, str(shown), target, [], [])
    memory = estimate_memory(artifact, profile, context)
    report.memory = memory.to_dict()
    if not memory.fits:
        report.notes.append(memory.message())
    for file in graph_files(artifact):
        if target == QNN:
            _check_qnn(file, profile, report)
        elif target in (NNAPI, COREML):
            _check_mobile(file, profile, target, report)
        else:
            _check_cpu(file, profile, report)
    if profile.shapes.policy.value == "static" and not (artifact.info and artifact.info.static):
        report.notes.append(
            f"profile {profile.name} wants static shapes but this artifact is a dynamic-shape "
            f"export: export it with `slmedge export --profile {profile.name}`")
    return report


# -- QNN: a real session on the HTP backend ----------------------------------------------------


def _check_qnn(file: Path, profile, report: CheckReport) -> None:
    from slmedge.runtimes.sessions.onnx_decoder import make_session
    from slmedge.runtimes.sessions.providers import availability, placement_of, selection_of

    check = GraphCheck(file.name, "onnxruntime-qnn session (HTP emulator on x86 Linux)")
    report.graphs.append(check)
    reason = availability(QNN)
    if reason is not None:
        check.error = reason
        report.rows.append(Row(file.name, "(graph)", "-", f"cannot check: {reason}"))
        return
    specs = [(n, o) for n, o in profile.provider_specs() if n in (QNN, CPU)]
    if CPU not in [n for n, _ in specs]:
        specs.append((CPU, {}))
    session = make_session(file, providers=specs, allow_cpu_fallback=True, threads=1)
    sel = selection_of(session)
    skipped = [s for s in (sel.skipped if sel else []) if s["provider"] == QNN]
    if skipped:
        check.error = skipped[0]["reason"]
        report.rows.append(Row(file.name, "(graph)", "-", f"HTP rejected the graph: "
                               f"{skipped[0]['reason']}"))
        return
    place = placement_of(session)
    check.total_nodes = place.total_nodes
    check.target_nodes = place.nodes_by_provider.get(QNN, 0)
    check.nodes_by_provider = place.nodes_by_provider
    for name, op in place.cpu_nodes:
        report.rows.append(Row(file.name, name, op, "QNN HTP has no kernel for this op with "
                               "these types/shapes: runs on CPU (an error with CPU fallback off)"))
    try:
        import onnx
    except ImportError:
        return
    model = onnx.load(str(file), load_external_data=False)  # read once for both notes
    _flag_quantized_sensitive_ops(file.name, model, report)
    _flag_fp16_norms(file.name, model, profile, report)


#: Op types of RMSNorm / LayerNorm and attention whose quantization diverged on the HTP.
SENSITIVE_OPS = ("Softmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Div",
                 "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
SENSITIVE_WHY = ("quantized RMSNorm and Softmax diverged on the HTP emulator (8-bit QDQ: logit "
                 "cosine 0.52 vs 0.97 for the same file on CPU)")


def _flag_quantized_sensitive_ops(name: str, model, report: CheckReport) -> None:
    """QDQ graphs: an 8-bit quantized input of a norm / Softmax op is a row (measured to
    diverge on HTP); the op types the recipe kept in float or 16-bit get a note saying why."""
    import onnx

    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return  # a float graph: nothing quantized to diverge
    producers = {o: n for n in model.graph.node for o in n.output}
    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    int16 = {onnx.TensorProto.INT16, onnx.TensorProto.UINT16}
    zero_point_types = {t.name: t.data_type for t in model.graph.initializer}
    kept: dict[str, Counter] = {"float": Counter(), "16-bit": Counter()}
    for node in model.graph.node:
        if node.op_type not in SENSITIVE_OPS:
            continue
        src = producers.get(node.input[0])
        bits = None
        if src is not None and src.op_type == "DequantizeLinear" and len(src.input) > 2:
            bits = zero_point_types.get(src.input[2])
        if bits in int8:
            report.rows.append(Row(name, node.name, node.op_type,
                                   f"8-bit QDQ input: {SENSITIVE_WHY}; keep it in 16-bit or "
                                   "float (recipe.float_ops, or a16w8)"))
        elif bits in int16:
            kept["16-bit"][node.op_type] += 1
        elif node.op_type in ("Softmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal",
                              "SimplifiedLayerNormalization"):
            kept["float"][node.op_type] += 1
    for how, ops in kept.items():
        if ops:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
            report.notes.append(f"{name}: {listed} kept in {how} by the recipe: {SENSITIVE_WHY}")


def _flag_fp16_norms(name: str, model, profile, report: CheckReport) -> None:
    """Float RMSNorm (``Pow(x, 2)`` -> ``ReduceMean``) runs in fp16 on the HTP: it overflows on
    models with large residual activations. A note, since the graph alone cannot tell."""
    qnn = next((p for p in profile.runtime.providers if p.name == QNN), None)
    if qnn is None or not getattr(qnn.options, "enable_htp_fp16_precision", False):
        return
    producers = {o: n for n in model.graph.node for o in n.output}
    norms = sum(1 for n in model.graph.node if n.op_type == "ReduceMean"
                and producers.get(n.input[0]) is not None
                and producers[n.input[0]].op_type == "Pow")
    if norms:
        report.notes.append(
            f"{name}: {norms} RMSNorms (Pow -> ReduceMean) in float run in fp16 on the HTP "
            "(enable_htp_fp16_precision): x^2 overflows fp16 above |x| 256. Measured: "
            "SmolLM2-135M's residual reaches 23,138; its fp16 graph, fully on the HTP emulator, "
            "gave perplexity 724,025 where the same file on CPU (fp32 norm kernels) gave 53.2. "
            "Export with a profile that sets recipe.fuse_norms: true (the built-in QNN profiles "
            "do): one SimplifiedLayerNormalization per norm, which the HTP runs without overflow")


# -- NNAPI / CoreML: ORT's mobile usability checker ------------------------------------------


def _check_mobile(file: Path, profile, target: str, report: CheckReport) -> None:
    try:
        import onnx
        from onnxruntime.tools.mobile_helpers import usability_checker as uc
    except ImportError as e:
        raise MissingDependency(f"the NNAPI/CoreML check needs the onnx package ({e}): "
                                "pip install onnx") from None
    model = onnx.load(str(file), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    if target == NNAPI:
        method = "ORT mobile usability checker (NNAPI supported ops)"
        info = uc.check_nnapi_partitions(model, require_fixed_input_sizes=True)
        label = "NNAPI"
    else:
        opts = next(p.options for p in profile.runtime.providers if p.name == COREML)
        mlprogram = opts.model_format.value == "MLProgram"
        config = ("coreml_supported_mlprogram_ops.md" if mlprogram
                  else "coreml_supported_neuralnetwork_ops.md")
        method = f"ORT mobile usability checker (CoreML {opts.model_format.value} ops)"
        info = uc.check_coreml_partitions(model, opts.require_static_input_shapes, config)
        label = f"CoreML {opts.model_format.value}"
    check = GraphCheck(file.name, method, total_nodes=info.num_nodes,
                       target_nodes=info.num_supported_nodes, partitions=info.num_partitions,
                       nodes_by_provider={target: info.num_supported_nodes,
                                          CPU: info.num_nodes - info.num_supported_nodes})
    report.graphs.append(check)
    in_partition = {id(n) for group in info.supported_groups for n in group}
    for node in model.graph.node:
        if id(node) in in_partition:
            continue
        op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        if node.domain == "com.microsoft":
            why = "contrib op: ONNX Runtime CPU/GPU kernels only"
        elif not info.supported_ops_checker.is_op_supported(node):
            why = f"{label} has no kernel for this op"
        else:
            why = f"an input shape is not fixed (or rank > 5): {label} needs static shapes"
        report.rows.append(Row(file.name, node.name, op, why))
    if info.num_unsupported_nodes_due_to_rank:
        ops = ", ".join(sorted(info.ops_with_unsupported_rank))
        report.notes.append(f"{info.num_unsupported_nodes_due_to_rank} nodes ({ops}) have "
                            f"tensors of rank > 5, which {label} does not take")
    if info.num_partitions > 1:
        report.notes.append(f"{file.name}: {info.num_partitions} {label} partitions; every "
                            "boundary copies tensors between the accelerator and the CPU")


# -- CPU: what has no fast kernel ---------------------------------------------------------------


def _check_cpu(file: Path, profile, report: CheckReport) -> None:
    from slmedge.runtimes.sessions.onnx_decoder import make_session
    from slmedge.runtimes.sessions.providers import availability, placement_of

    first = profile.runtime.providers[0].name
    if first != CPU and availability(first) is not None:
        report.notes.append(f"{first} is not in this onnxruntime build: the table shows the "
                            "CPU (MLAS) placement; on the device it takes the float ops it has")
    session = make_session(file, providers=[(CPU, {})], threads=1)
    place = placement_of(session)
    ops = place.ops_by_provider.get(CPU, {}) if place else {}
    check = GraphCheck(file.name, "CPU session (ONNX Runtime fusions applied)",
                       total_nodes=place.total_nodes if place else None,
                       nodes_by_provider=place.nodes_by_provider if place else {})
    report.graphs.append(check)
    slow = _cpu_slow_nodes(file, profile, set(ops))
    check.target_nodes = (check.total_nodes - len(slow)) if check.total_nodes else None
    report.rows.extend(Row(file.name, n, op, why) for n, op, why in slow)


def _cpu_slow_nodes(file: Path, profile, optimized_ops: set[str]) -> list[tuple[str, str, str]]:
    try:
        import onnx
    except ImportError:
        return []
    model = onnx.load(str(file), load_external_data=False)
    sizes = {t.name: _elements(t.dims) for t in model.graph.initializer}
    quant = profile.recipe.quantization.value
    rows = []
    if quant in ("int4", "int8"):
        for node in model.graph.node:
            if node.op_type in ("MatMul", "Gemm") and not node.domain and \
                    max((sizes.get(i, 0) for i in node.input), default=0) >= BIG_WEIGHT_ELEMENTS:
                rows.append((node.name, node.op_type, f"float weights: the profile's {quant} "
                             "recipe runs this as MatMulNBits (export with --profile / --quant)"))
    if "Softmax" in optimized_ops and not (optimized_ops & FUSED_ATTENTION):
        for node in model.graph.node:
            if node.op_type == "Softmax":
                rows.append((node.name, "Softmax", "unfused attention: MatMul + Softmax over the "
                             "whole context, no GroupQueryAttention kernel"))
    if "ReduceMean" in optimized_ops and not (optimized_ops & FUSED_NORMS):
        for node in model.graph.node:
            if node.op_type == "ReduceMean":
                rows.append((node.name, "ReduceMean", "unfused norm: Pow/ReduceMean/Sqrt chain, "
                             "no SimplifiedLayerNormalization kernel"))
    return rows


def _elements(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
