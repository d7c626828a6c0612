"""Quantization recipes: typed, validated, and written into the manifest as they were applied.

A recipe says *what* to do (scheme, bits, block size, algorithm, which tensors keep a
higher precision); :mod:`.weight_only` and :mod:`.qdq` turn it into calls of
``onnxruntime.quantization``. The scheme names are the one :class:`QuantScheme` of
``device_profiles/schema.py`` (profiles and the TFLite path name the same type).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmedge.device_profiles.schema import ONNX_SCHEMES, QuantScheme, require_scheme

class Int4Algorithm(str, Enum):
    """How 4-bit weights are chosen: ``onnxruntime.quantization.matmul_nbits_quantizer``'s
    algorithms, and ``gptq-act`` (gptq.py) on nodes that quantizer writes."""

    rtn = "rtn"  # round to nearest, min/max per block (MLAS C++ kernel)
    hqq = "hqq"  # half-quadratic quantization: optimizes scale/zero per block, no data
    k_quant = "k_quant"  # llama.cpp-style search of the scale per block, no data
    gptq = "gptq"  # Hessian-aware rounding from calibration activations (slow)
    # GPTQ with activation order on min/max grids fixed up front, integer zero points
    # (gptq.py): keeps a Q4_1 source's grid, runs the fast kernels with no correction
    gptq_act = "gptq-act"


class Int8Format(str, Enum):
    """The int8 kernel family."""

    nbits = "nbits"  # MatMulNBits bits=8, block-wise weights; int8 compute at accuracy level 4
    qoperator = "qoperator"  # quantize_dynamic: DynamicQuantizeMatMul / MatMulInteger, per-channel


class TensorPrecision(str, Enum):
    """Precision of the embedding table or the ``lm_head`` weight."""

    float = "float"  # as exported (fp32 / fp16)
    int8 = "int8"
    int4 = "int4"


#: the automatic ``int8_block_size`` of a GGUF source with a large table (QuantRecipe)
SOURCE_INT8_BLOCK = 128


class ZeroPointStorage(str, Enum):
    """How the folded float zero points' correction ``M`` is stored (fold_zero_points.py)."""

    float16 = "float16"  # fp16 M (2 bytes per block), one Cast folded at load (default)
    float32 = "float32"  # fp32 M: the zero points as computed, 4 bytes per block
    uint12 = "uint12"  # a 12-bit code per block (1.5 bytes), rebuilt (and folded by ORT) at load
    uint8 = "uint8"  # an 8-bit code per block: smaller, SmolLM2's KL 0.0033 -> 0.0038
    # blocksum(x) @ M as one 8-bit MatMulNBits (M^T int8 in blocks of 16 along K/32), kept
    # int8 in memory: compute fp32 (accuracy level 1) or int8 block sums too (level 4)
    int8 = "int8"
    int8_a8 = "int8-a8"

    @property
    def code_bits(self) -> int:
        """fold_zero_points' ``code_bits``: 0 for fp32 ``M``, 16 for fp16 ``M``, -level for
        the 8-bit MatMulNBits."""
        return {"uint12": 12, "uint8": 8, "float16": 16, "float32": 0, "int8": -1,
                "int8-a8": -4}[self.value]


class WeightKind(str, Enum):
    """A decoder layer weight by role (gguf_blocks.MODULE_KINDS maps module names to these)."""

    q = "q"
    k = "k"
    v = "v"
    o = "o"
    gate = "gate"
    up = "up"
    down = "down"


class BlockKind(str, Enum):
    """A weight MatMul by role, for a block size of its own (QuantRecipe.block_sizes)."""

    q = "q"
    k = "k"
    v = "v"
    o = "o"
    gate = "gate"
    up = "up"
    down = "down"
    lm_head = "lm_head"


#: the int8 scheme's default block sizes by kind (the others: ``block_size``, 32): none. On
#: SmolLM2-135M (README "int8 block size per kind"; tools/bench/results/bench_int8_blocks.json)
#: block 64 costs KL per kind (4096 tuning tokens vs fp32: o +0.0001, down +0.0004, gate/up,
#: q/k/v +0.0006, lm_head +0.0007 over block 32's 0.0036) and no mix measured both decoded
#: >= 1.1x GenAI int8 and stayed within +0.5% perplexity on the tuning text
INT8_BLOCK_SIZES: dict[BlockKind, int] = {}


class CalibrationMethod(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class CalibrationPrefix(str, Enum):
    """What the layered MinMax calibration (qdq_layered.py) feeds each decoder layer."""

    float = "float"  # the float graph's activations (ORT's calibrator's ranges, bit for bit)
    quantized = "quantized"  # the activations of the earlier layers already QDQ'd (issue 15)


class QdqWriter(str, Enum):
    """Who writes the static QDQ graph (int8-static, a16w8) from the calibrated ranges."""

    segments = "segments"  # quantize_static per calibration segment, joined (qdq_writer.py)
    whole = "whole"  # quantize_static on the whole graph (ORT's own pass; more memory)


class CalibrationConfig(BaseModel):
    """Calibration text and how much of it the reader feeds (static QDQ and GPTQ)."""

    model_config = ConfigDict(extra="forbid")

    text: Path | None = Field(None, description="UTF-8 text file; default: the packaged calib_emma.txt")
    method: CalibrationMethod = Field(CalibrationMethod.minmax, description="range estimator")
    percentile: float = Field(99.999, gt=90, le=100, description="for method=percentile")
    prefill_samples: int = Field(8, ge=1, description="prompt chunks fed with an empty cache")
    decode_samples: int = Field(24, ge=0, description="one-token steps fed with a real cache")
    prefill_tokens: int = Field(128, ge=2, description="length of each prompt chunk")
    max_past: int = Field(384, ge=1, description="longest KV cache a decode sample carries")
    seed: int = Field(0, description="picks the text offsets and cache lengths")
    prefix: CalibrationPrefix = Field(
        CalibrationPrefix.float,
        description="static QDQ, minmax: each layer's ranges from the float graph's activations "
        "(float) or from those of the earlier layers already quantized, weights and activations "
        "fake-quantized by the same QDQ (quantized)")
    writer: QdqWriter = Field(
        QdqWriter.segments,
        description="static QDQ: write the graph one calibration segment at a time, each by "
        "quantize_static, joined into the same nodes and initializers as the whole graph's "
        "(segments; Qwen2.5-0.5B int8-static write step 3.8 vs 5.9 GB) or by quantize_static "
        "on the whole graph (whole). Segments needs minmax ranges: entropy / percentile write "
        "whole (the recipe then says so); so does an onnxruntime that takes no precomputed ranges")

    @model_validator(mode="after")
    def _check_prefix(self):
        if self.prefix is CalibrationPrefix.quantized and self.method is not CalibrationMethod.minmax:
            raise ValueError("prefix quantized calibrates layer by layer, which is minmax only; "
                             f"got method {self.method.value} (use minmax or prefix float)")
        if self.method is not CalibrationMethod.minmax:
            # ORT's histogram calibrators run inside quantize_static, on the whole graph; not an
            # error when segments was asked: a dumped config (segments, the default) read back
            # with another method must load. The recipe (manifest) records the writer used.
            self.writer = QdqWriter.whole
        return self


class QuantRecipe(BaseModel):
    """Everything one quantization run needs; recorded verbatim in the manifest."""

    model_config = ConfigDict(extra="forbid")

    scheme: QuantScheme = Field(..., description="int4 | int8 | int8-static | a16w8")

    @field_validator("scheme", mode="before")
    @classmethod
    def _onnx_scheme(cls, value) -> QuantScheme:
        return require_scheme(value, ONNX_SCHEMES, "the ONNX quantizer")
    # int4
    block_size: int = Field(32, description="int4/nbits weights per scale (16/32/64/128/256)")
    mlp_block_size: int | None = Field(
        None, description="int4: block size of the MLP input projections (gate/up), the "
        "largest weights; a coarser grid there is the cheapest speed (SmolLM2 gptq-act: 64 "
        "decodes ~5% faster for +0.7% perplexity); default: block_size",
    )
    symmetric: bool = Field(False, description="int4: no zero point (signed 4-bit)")
    algorithm: Int4Algorithm | None = Field(
        None, description="int4 weight rounding; default hqq (rtn when symmetric: hqq needs a "
        "zero point)",
    )
    accuracy_level: int = Field(
        4, ge=0, le=4,
        description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "activations; the int4 scheme's 8-bit nodes (lm_head, kept layers) are level 4 whatever "
        "this says (level_for)",
    )
    # int8
    int8_format: Int8Format = Field(Int8Format.nbits, description="int8 kernel family")
    block_sizes: dict[BlockKind, int] | None = Field(
        None, description="int8 nbits: a block size per weight kind (q/k/v/o/gate/up/down, "
        "lm_head), the others at block_size; a packed MatMul (q/k/v, gate/up) takes the "
        "smallest of its kinds'. Default: INT8_BLOCK_SIZES unless block_size is given; {}: "
        "block_size everywhere",
    )
    # tensors chosen separately
    lm_head: TensorPrecision | None = Field(
        None, description="lm_head weight precision; default: int8 (int4/int8), float (static)"
    )
    lm_head_int8_tokens: int = Field(
        0, ge=0, description="with lm_head int4: the rows of up to this many tokens, the most "
        "frequent in the calibration text, stay int8 and the rest are symmetric int4 RTN (a split "
        "lm_head: head_split.py); 0: none",
    )
    embedding: TensorPrecision = Field(
        TensorPrecision.float, description="embedding table precision (int8, int4: "
        "GatherBlockQuantized; int8 symmetric per block, exact for a Q8_0 GGUF table)"
    )
    large_table: bool = Field(
        True, description="int4/int8 weight-only with the embedding float: a table of at least "
        "64M values (Qwen2.5-0.5B's, Llama-3.2-1B's; not SmolLM2's) is not kept float: tied to "
        "an 8-bit lm_head it is looked up in the lm_head's int8 table (Gathers of its bytes, "
        "scales and zero points as stored: held once), else it is int8 of its own (as --embedding int8) "
        "(streaming quantizer)",
    )
    large_table_bits: int = Field(
        8, description="int4 scheme, large_table: the bits of a large table tied to the "
        "lm_head. 8: the lm_head int8, the lookup reads its table. 4: the lm_head (unless "
        "--lm-head names a precision) is int4 RTN with integer zero points (none when "
        "symmetric) and the lookup reads those bytes: ONNX Runtime GenAI's layout, half the "
        "table's bytes (Qwen2.5-0.5B: 85 instead of 157 MB). An untied table stays int8",
    )
    large_table_int8_tokens: int = Field(
        0, ge=0, description="with large_table_bits 4 (int4 scheme, the lm_head's precision not "
        "named): the large tied table is split by token frequency (tied_split.py): the rows of "
        "up to this many tokens, the most frequent in the calibration text (in aligned groups "
        "of 64 ids), stay 8-bit RTN and the others are 4-bit, rounded by GPTQ on the lm_head "
        "input's Hessian (the fp32 graph's final hidden states over the calibration text; "
        "quantizing on write, with no fp32 graph, RTN); the "
        "lm_head and the lookup read the same bytes. 0: one int4 table. A table below the "
        "large-table threshold (SmolLM2's) is not touched (streaming quantizer)",
    )
    zero_point_storage: ZeroPointStorage = Field(
        ZeroPointStorage.float16, description="int4 with float zero points (HQQ, a Q4_K "
        "source): the folded correction's M per block as float16 (2 bytes, one Cast ONNX "
        "Runtime folds at load: the load peak and RSS of float32's; zero points moved by "
        "|8 - zp| * 2**-11 <= ~0.004 step; the default), float32 (4 bytes, the zero points "
        "as computed), or a 12-bit (uint12, 1.5 bytes) or 8-bit (uint8) code of the zero "
        "point on one grid per matrix, rebuilt from the node's scales by ~15 ops ORT folds at "
        "load (the manifest's quantization.zero_points says folded-f16 / folded-u12 / "
        "folded-u8, zero_point_error the largest rounding in steps). A source's own blocks "
        "(Q4_K) keep float32. uint12's folding raises the loading process's peak RSS "
        "(Qwen2.5-0.5B-shaped int4: 1155 vs 791 MB; the heap it frees goes back only with "
        "malloc_trim). int8 / int8-a8 (folded-i8 / folded-i8a8): blocksum(x) @ M as one 8-bit "
        "MatMulNBits, M int8 in blocks of 16 in the file and in memory; int8-a8 (accuracy "
        "level 4) the fast one, int8 (level 1) several times slower; both cost SmolLM2 "
        "+0.4% held-out perplexity (README), so not the default",
    )
    keep_source_bits: bool = Field(
        True, description="int4: a weight the source holds in exact integer blocks of more "
        "than 4 bits (a GGUF's Q5_0, Q6_K, Q8_0: gguf_blocks.py) keeps them as 8-bit "
        "MatMulNBits instead of being rounded to 4 bits: never fewer bits than the file. "
        "Gemma 3 270M's Q4_K_M holds its 640-wide q/k/gate/up as Q5_0 (no 256-value "
        "super-blocks) and half its ffn_down as Q6_K; a source of 4-bit blocks (SmolLM2's "
        "Q4_1, Q4_0) is unchanged; an lm_head precision given explicitly (--lm-head int4) is "
        "kept. Only the streaming quantizer of an export from the GGUF sees the source's blocks",
    )
    int8_block_size: int | None = Field(
        None, description="int4 scheme: block size of its 8-bit MatMulNBits (the int8 lm_head, "
        "kept layers, and a source's wider blocks kept by keep_source_bits, which are then "
        "rounded again at 8 bits, symmetric, on this coarser grid instead of copied: one fp32 "
        "scale per 128 values instead of per 32, or 16 for Q6_K). Default: block_size, except "
        "for a GGUF source with a large table (large_table's threshold) whose rows are whole "
        "blocks of 128: SOURCE_INT8_BLOCK (128). Measured on Gemma 3 270M's Q4_K_M (253.1 MB; "
        "1024 tokens of the tuning text vs the fp32 graph of the file): block 32 (the file's "
        "own blocks) 295.5 MB = 1.17x the GGUF, KL 0.0021; 64: 281.3 MB, KL 0.0049; 128: "
        "272.4 MB = 1.08x, KL 0.0077, +0.99% perplexity, top-1 95.0%; 256: the 640-wide "
        "table cannot be shared with the head, 986 MB (tools/bench/results/"
        "bench_gguf_int4_gemma3_270m.json)",
    )
    keep_source_bits_kinds: list[WeightKind] = Field(
        default_factory=lambda: list(WeightKind),
        description="with keep_source_bits: the decoder weights (by kind; a packed MatMul "
        "such as GQA's q/k/v keeps them only when all its parts are listed) that keep the "
        "source's wider blocks; the others are rounded to 4 bits from the dequantized values "
        "(HQQ, as any weight). Default: all kinds. Measured on Gemma 3 270M's Q4_K_M (1024 "
        "tokens of the tuning text vs the fp32 graph of the file; all kept: 295.5 MB, KL "
        "0.0021): q/k/v to 4 bits -6.6 MB, KL 0.085; gate/up -17.7 MB, KL 0.072; the Q6_K "
        "down -5.9 MB, KL 0.031 (top-1 81-89%), where int8_block_size 128 saves 23 MB for KL "
        "0.0077: so no kind is rounded by default",
    )
    keep_layers: list[int] = Field(
        default_factory=list,
        description="decoder layers whose weights stay at int8 (int4 scheme) or float (others)",
    )
    # static
    per_channel: bool = Field(True, description="static: one weight scale per output channel")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _check(self):
        for name in ("block_size", "mlp_block_size", "int8_block_size"):
            value = getattr(self, name)
            if value is not None and value not in (16, 32, 64, 128, 256):
                raise ValueError(f"{name} must be one of 16, 32, 64, 128, 256, got {value}")
        nbits8 = self.scheme is QuantScheme.int8 and self.int8_format is Int8Format.nbits
        if self.block_sizes is None:
            # resolved here, so that the manifest's recipe (model_dump) reloads as the same
            # recipe; a block_size given explicitly means that block everywhere
            explicit = "block_size" in self.model_fields_set
            self.block_sizes = dict(INT8_BLOCK_SIZES) if nbits8 and not explicit else {}
        elif self.block_sizes and not nbits8:
            raise ValueError("block_sizes applies to the int8 scheme's MatMulNBits (int8_format "
                             f"nbits), not {self.scheme.value}"
                             + (f" {self.int8_format.value}" if self.scheme is QuantScheme.int8 else "")
                             + ": use block_size / mlp_block_size / int8_block_size")
        for kind, value in self.block_sizes.items():
            if value not in (16, 32, 64, 128, 256):
                raise ValueError(f"block_sizes[{kind.value}] must be one of 16, 32, 64, 128, "
                                 f"256, got {value}")
        if self.large_table_bits not in (4, 8):
            raise ValueError(f"large_table_bits must be 4 or 8, got {self.large_table_bits}")
        if self.large_table_int8_tokens and not self.tied_head_int4:
            raise ValueError(
                "large_table_int8_tokens splits the 4-bit large tied table: it needs scheme "
                "int4, large_table_bits 4 and no lm_head precision named, got scheme "
                f"{self.scheme.value}, large_table_bits {self.large_table_bits}, lm_head "
                f"{self.lm_head.value if self.lm_head else 'the default'}")
        if self.mlp_block_size is not None and self.scheme is not QuantScheme.int4:
            raise ValueError(f"mlp_block_size applies to int4 only, not {self.scheme.value}")
        if self.int8_block_size is not None and self.scheme is not QuantScheme.int4:
            raise ValueError("int8_block_size applies to the int4 scheme's 8-bit weights, not "
                             f"{self.scheme.value} (use block_size)")
        if self.scheme is not QuantScheme.int4:
            if self.lm_head is TensorPrecision.int4:
                raise ValueError(f"lm_head int4 needs scheme int4, not {self.scheme.value}")
            if self.algorithm not in (None, Int4Algorithm.rtn):
                raise ValueError(f"algorithm {self.algorithm.value} applies to int4 only")
        if self.lm_head_int8_tokens and self.lm_head is not TensorPrecision.int4:
            raise ValueError("lm_head_int8_tokens splits an int4 lm_head: it needs lm_head int4 "
                             f"(scheme int4), not {self.lm_head.value if self.lm_head else 'the default'}")
        if self.algorithm in (Int4Algorithm.hqq, Int4Algorithm.gptq_act) and self.symmetric:
            raise ValueError(f"{self.algorithm.value} computes a zero point per block: it cannot "
                             "be symmetric")
        return self

    @property
    def int4_algorithm(self) -> Int4Algorithm:
        """The algorithm used: HQQ by default. Its float zero points fit each block's grid
        (SmolLM2-135M from a Q4_1 GGUF: +0.1% perplexity where RTN's integer zero points
        gave +20%); symmetric recipes have no zero point, so they round to nearest.

        Speed: float zero points would take MatMulNBits' generic path on ORT's CPU provider
        (SmolLM2-135M, ORT 1.32: 6.5 tok/s decode, ~15x slower than integer zero points).
        So after HQQ each node is rewritten (fold_zero_points.py) as the same weights with
        the default zero point plus ``blocksum(x) @ M``, ``M = scale * (default - zp)`` per
        block: the fast kernels run, the weights and the result are unchanged (up to the
        int8 activations of ``accuracy_level`` 4). The report says ``zero_points:
        folded-f16`` (the default's fp16 ``M``), ``folded`` (fp32 ``M``) or ``folded-u12`` /
        ``folded-u8`` (``M`` as codes).
        The correction's small nodes cost decode speed (SmolLM2: ~0.67x GenAI's int4);
        ``gptq-act`` (needs calibration text) keeps integer zero points and no correction
        at a similar quality (tools/bench/bench_quant.py's ``int4``)."""
        if self.algorithm is not None:
            return self.algorithm
        return Int4Algorithm.rtn if self.symmetric else Int4Algorithm.hqq

    def level_for(self, bits: int) -> int:
        """The ``accuracy_level`` a MatMulNBits node of ``bits`` bits is written with.

        The recipe's ``accuracy_level`` applies to the scheme's own nodes (every node of the
        int8 scheme; the 4-bit ones of the int4 scheme). The int4 scheme's 8-bit nodes (the
        lm_head, kept layers, a source's wider blocks) are always level 4: ONNX Runtime 1.32
        has a fast 8-bit kernel only there and dequantizes an 8-bit node on every call at
        levels 0-3 (one 576 x 1536 node, x86, 2 threads: ~30 us at level 4, ~3 ms at level
        1; SmolLM2's int4 at level 1 decoded at ~0.11x the level-4 default with its int8
        lm_head at level 1)."""
        if bits == 8 and self.scheme is QuantScheme.int4:
            return 4
        return self.accuracy_level

    def block_for(self, kinds: tuple[str, ...] | None, lm_head: bool = False) -> int:
        """The block size of a MatMulNBits of the scheme's own bits whose weight has the roles
        ``kinds`` (WeightKind values; several for a packed MatMul, None when unknown) or is
        the ``lm_head``: the smallest of ``block_sizes`` over them, else ``block_size``."""
        blocks = self.block_sizes or {}
        if lm_head:
            return blocks.get(BlockKind.lm_head, self.block_size)
        if not kinds:
            return self.block_size
        return min(blocks.get(BlockKind(k), self.block_size) for k in kinds)

    @property
    def tied_head_int4(self) -> bool:
        """Whether a large tied table (and so the lm_head it is shared with) goes to 4 bits:
        ``large_table_bits`` 4 on the int4 scheme, the lm_head's precision not named."""
        return (self.large_table_bits == 4 and self.scheme is QuantScheme.int4
                and self.lm_head is None)

    def int8_block_for(self, gguf_table_width: int | None) -> int | None:
        """The block size of the int4 scheme's 8-bit MatMuls when it is not ``block_size``
        (None): ``int8_block_size`` when given, else :data:`SOURCE_INT8_BLOCK` for a GGUF
        source (its blocks kept) with a large table of rows ``gguf_table_width`` wide (None:
        no such table) that are whole blocks of it (else the lookup could not share the
        lm_head's bytes), else None."""
        if self.scheme is not QuantScheme.int4:
            return None
        if self.int8_block_size is not None:
            return None if self.int8_block_size == self.block_size else self.int8_block_size
        if gguf_table_width and self.keep_source_bits and not gguf_table_width % SOURCE_INT8_BLOCK:
            return SOURCE_INT8_BLOCK
        return None

    @property
    def lm_head_precision(self) -> TensorPrecision:
        if self.lm_head is not None:
            return self.lm_head
        if self.scheme in (QuantScheme.int4, QuantScheme.int8):
            return TensorPrecision.int8
        return TensorPrecision.float

    def label(self) -> str:
        """A short human name, e.g. ``int4-rtn-b32-asym-head8``."""
        parts = [self.scheme.value]
        if self.scheme is QuantScheme.int4:
            parts += [self.int4_algorithm.value, f"b{self.block_size}",
                      "sym" if self.symmetric else "asym"]
            if self.mlp_block_size and self.mlp_block_size != self.block_size:
                parts.insert(-1, f"mlp{self.mlp_block_size}")
        elif self.scheme is QuantScheme.int8:
            parts.append(self.int8_format.value)
            if self.int8_format is Int8Format.nbits:
                parts.append(f"b{self.block_size}")
                by_size: dict[int, list[str]] = {}
                for kind in BlockKind:  # e.g. b32-gate_up64: gate and up at 64, the rest 32
                    size = (self.block_sizes or {}).get(kind, self.block_size)
                    if size != self.block_size:
                        by_size.setdefault(size, []).append(kind.value)
                parts += [f"{'_'.join(kinds)}{size}" for size, kinds in sorted(by_size.items())]
        else:
            parts.append(self.calibration.method.value)
            if self.calibration.prefix is CalibrationPrefix.quantized:
                parts[-1] += "-qprefix"
        head = self.lm_head_precision
        parts.append({"float": "headf", "int8": "head8", "int4": "head4"}[head.value])
        if self.tied_head_int4:  # a large tied table (and its head) goes to 4 bits
            parts[-1] += "tab4"
            if self.large_table_int8_tokens:  # its frequent tokens' rows at 8 bits
                parts[-1] += f"s{self.large_table_int8_tokens}"
        if self.lm_head_int8_tokens:
            parts[-1] += f"x8top{self.lm_head_int8_tokens}"
        if self.embedding is not TensorPrecision.float:
            parts.append(f"emb{self.embedding.value[3:]}")
        if self.keep_layers:
            parts.append("keep" + "_".join(map(str, self.keep_layers)))
        if self.int8_block_size and self.int8_block_size != self.block_size:
            parts.append(f"i8b{self.int8_block_size}")
        if self.zero_point_storage is not ZeroPointStorage.float16:
            parts.append({"uint8": "zpu8", "uint12": "zpu12", "float32": "zpf32", "int8": "zpq8",
                          "int8-a8": "zpq8a8"}[self.zero_point_storage.value])
        if set(self.keep_source_bits_kinds) != set(WeightKind):
            parts.append("src8" + "".join(sorted(k.value for k in self.keep_source_bits_kinds)))
        return "-".join(parts)
