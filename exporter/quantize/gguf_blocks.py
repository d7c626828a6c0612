"""GGUF Q4_0 / Q8_0 blocks as ``MatMulNBits`` weights: a byte re-layout, no requantization.

Both formats quantize a weight row (``ne0 = K``, the input dimension, fastest in the file)
in blocks of 32 values with one fp16 scale ``d`` each and no offset:

=========  ==============================================  =================================
format     one block in the GGUF file                       value
=========  ==============================================  =================================
Q4_0       ``d`` (fp16) + 16 bytes: value ``j`` in the      ``(q - 8) * d``
           low nibble of byte ``j``, value ``j + 16`` in
           its high nibble
Q8_0       ``d`` (fp16) + 32 signed bytes                   ``q * d``
=========  ==============================================  =================================

``MatMulNBits`` (com.microsoft) stores ``B`` as ``[N, K / block, block * bits / 8]`` uint8,
blocks along ``K`` for each output column, 4-bit values two to a byte with value ``2i`` in
the low nibble of byte ``i``; one scale per block (``[N, K / block]``, the activation's
float type) and, without a ``zero_points`` input, the zero point ``2**(bits - 1)``: 8 for 4
bits, 128 for unsigned 8 bits. So Q4_0 is ``bits=4, block_size=32`` with its nibbles
reordered and no zero points; Q8_0 is ``bits=8, block_size=32`` with ``q + 128`` as uint8.
The fp16 scales widen to fp32 exactly. Nothing is rounded again: the graph computes with
the file's own weights (tests/unit/quantize/test_gguf_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slmedge.runtimes.errors import UnsupportedOp

BLOCK = 32
#: GGML type name -> (bits, bytes per block)
_FORMATS = {"Q4_0": (4, 2 + BLOCK // 2), "Q8_0": (8, 2 + BLOCK)}
#: GGML types wider than 4 bits whose values are ``integer * one float per block`` with no
#: offset, so ``MatMulNBits`` ``bits=8`` holds them exactly:
#: name -> (values per GGML block, bytes per GGML block, MatMulNBits block size)
#: Q5_0: ``d`` (fp16) + 4 bytes of 5th bits + 16 bytes of nibbles, value ``(q - 16) * d``;
#: Q6_K: 256 values: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 sub-block
#: scales, ``d`` (fp16); value ``d * scale[i // 16] * (q - 32)`` (``d * scale`` is exact in
#: fp32: 11 + 8 bits). A Q4_K_M file holds them where its rows are not whole 256-value
#: super-blocks (Gemma 3 270M's 640-wide q/k/gate/up: Q5_0) and for half its ffn_down (Q6_K).
_WIDE = {"Q5_0": (32, 22, 32), "Q6_K": (256, 210, 16)}


@dataclass
class NBitsBlocks:
    """One weight as ``MatMulNBits`` inputs and attributes (``W`` is ``[K, N]``)."""

    k: int
    n: int
    bits: int
    block_size: int
    packed: np.ndarray  # uint8 [N, K / block_size, block_size * bits / 8]
    scales: np.ndarray  # [N, K / block_size], float32 or float16
    zero_points: np.ndarray | None  # None: MatMulNBits' default (8 for 4 bits, 128 for 8)
    source_type: str = ""  # the GGML type the blocks came from ("Q4_0", "Q8_0")
    part_types: tuple[str, ...] = ()  # packed weights (concat_blocks): each part's type, in order
    source_name: str = ""  # the tensor they came from ("blk.0.attn_q.weight")

    def attributes(self, accuracy_level: int = 0) -> dict:
        attrs = {"K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        return attrs


#: Q4_K: 256 values in 8 sub-blocks of 32: ``d``, ``dmin`` (fp16), 12 bytes of 6-bit
#: sub-block scales and mins, 128 bytes of nibbles; value ``d * sc * q - dmin * m``. As
#: MatMulNBits 4-bit, block 32: scale ``d * sc``, float zero point ``dmin * m / (d * sc)``
#: (folded into a correction by fold_zero_points.py): the file's values to fp32 rounding
#: (one rounding in the zero point), not bit for bit.
_Q4_K = (256, 144)


def supported_type(type_name: str) -> bool:
    """Whether a GGML tensor type (its name, e.g. ``"Q4_0"``) maps to MatMulNBits exactly
    (Q4_K: to fp32 rounding)."""
    return type_name in _FORMATS or type_name in _WIDE or type_name == "Q4_K"


def _rows_of_blocks(data: np.ndarray, type_name: str, k: int, n: int, values: int,
                    block_bytes: int) -> np.ndarray:
    """``data``'s bytes as uint8 ``[n, GGML blocks per row, block_bytes]``; a row that is not
    whole blocks or a byte count that does not match ``[n x k]`` is an error naming both."""
    if k % values:
        raise ValueError(f"a {type_name} row of {k} values is not whole blocks of {values}")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if raw.size != n * (k // values) * block_bytes:
        raise ValueError(f"{type_name} [{n} x {k}] needs {n * (k // values) * block_bytes} "
                         f"bytes, got {raw.size}")
    return raw.reshape(n, k // values, block_bytes)


def _q4_k_blocks(data: np.ndarray, k: int, n: int, scale_dtype) -> NBitsBlocks:
    from gguf.quants import Q4_K

    raw = _rows_of_blocks(data, "Q4_K", k, n, *_Q4_K).reshape(-1, _Q4_K[1])  # per super-block
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(raw[:, 4:16].copy())
    scale = d * sc.astype(np.float32)  # [super-blocks, 8], as gguf's dequantizer computes
    offset = dmin * m.astype(np.float32)
    if np.any((scale == 0) & (offset != 0)):
        raise ValueError("a Q4_K sub-block has scale 0 and a nonzero min (a constant block): "
                         "no MatMulNBits scale / zero point gives it")
    zero = np.divide(offset, scale, out=np.zeros_like(scale), where=scale != 0)
    qs = raw[:, 16:].reshape(-1, 4, 1, 32)  # 4 chunks of 64 values: low nibbles, then high
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k // 32, 32)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return NBitsBlocks(k=k, n=n, bits=4, block_size=32, packed=np.ascontiguousarray(packed),
                       scales=scale.reshape(n, k // 32).astype(scale_dtype),
                       zero_points=zero.reshape(n, k // 32).astype(scale_dtype),
                       source_type="Q4_K")


def _wide_codes(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scales)`` of ``raw`` (uint8 ``[rows, GGML blocks, bytes]``): signed codes
    ``[rows, values]`` (int16) and one fp32 scale per ``_WIDE`` MatMulNBits block."""
    rows, nb = raw.shape[:2]
    if type_name == "Q5_0":
        d = raw[..., :2].copy().view(np.float16).reshape(rows, nb).astype(np.float32)
        qh = raw[..., 2:6].copy().view("<u4").reshape(rows, nb, 1)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)  # bit j: value j
        qs = raw[..., 6:]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # values 0..31
        return ((low | (high << 4)) - 16).reshape(rows, -1), d
    # Q6_K: per 128 values, 64 bytes ql, 32 bytes qh; value l + 32 g (g = 0..3) of a half
    ql, qh = raw[..., :128].reshape(rows, nb, 2, 64), raw[..., 128:192].reshape(rows, nb, 2, 32)
    sc = raw[..., 192:208].copy().view(np.int8).astype(np.float32)  # [rows, nb, 16]
    d = raw[..., 208:210].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
    low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4],
                   axis=-2)  # [rows, nb, 2, 4, 32]
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-2)
    q = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
    return q.reshape(rows, -1), (d * sc).reshape(rows, nb * 16)


def _wide_blocks(data: np.ndarray, type_name: str, k: int, n: int, scale_dtype) -> NBitsBlocks:
    values, block_bytes, block = _WIDE[type_name]
    q, scales = _wide_codes(_rows_of_blocks(data, type_name, k, n, values, block_bytes), type_name)
    packed = (q + 128).astype(np.uint8).reshape(n, k // block, block)
    return NBitsBlocks(k=k, n=n, bits=8, block_size=block, packed=packed,
                       scales=scales.astype(scale_dtype), zero_points=None, source_type=type_name)


def blocks_from_bytes(data: np.ndarray, type_name: str, k: int, n: int,
                      scale_dtype=np.float32) -> NBitsBlocks:
    """The ``MatMulNBits`` form of a GGUF tensor's raw bytes.

    ``data``: the tensor's bytes (uint8, any shape, ``n`` rows of ``k / 32`` blocks), as
    ``gguf.GGUFReader`` gives them; ``type_name``: ``"Q4_0"`` or ``"Q8_0"``; ``k``: the row
    length (GGUF ``ne0``, the MatMul's input size); ``n``: the rows (``ne1``, its output
    size); ``scale_dtype``: the graph's float type (fp16 scales widen exactly)."""
    if type_name in _WIDE:
        return _wide_blocks(data, type_name, k, n, scale_dtype)
    if type_name == "Q4_K":
        return _q4_k_blocks(data, k, n, scale_dtype)
    if type_name not in _FORMATS:
        raise UnsupportedOp(
            f"GGUF tensor type {type_name} has no exact MatMulNBits form; exact: "
            f"{', '.join([*_FORMATS, *_WIDE])} (other types are dequantized and quantized again)")
    bits, block_bytes = _FORMATS[type_name]
    if k % BLOCK:
        raise ValueError(f"a {type_name} row of {k} values is not whole blocks of {BLOCK}")
    blocks = k // BLOCK
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if raw.size != n * blocks * block_bytes:
        raise ValueError(f"{type_name} [{n} x {k}] needs {n * blocks * block_bytes} bytes, got "
                         f"{raw.size}")
    raw = raw.reshape(n, blocks, block_bytes)
    scales = raw[:, :, :2].copy().view(np.float16).reshape(n, blocks).astype(scale_dtype)
    qs = raw[:, :, 2:]
    if bits == 4:
        # GGUF: value j (< 16) in the low nibble of byte j, value j + 16 in its high nibble
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [n, blocks, 32] in order
        packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    else:
        packed = qs ^ np.uint8(0x80)  # int8 q -> uint8 q + 128 (two's complement, top bit)
    return NBitsBlocks(k=k, n=n, bits=bits, block_size=BLOCK, packed=np.ascontiguousarray(packed),
                       scales=scales, zero_points=None, source_type=type_name)


def reorder_columns(blocks: NBitsBlocks, order: np.ndarray) -> NBitsBlocks:
    """``W[:, order]``: the output columns (the file's rows) in another order, e.g. the
    Q/K rows that llama.cpp's converter interleaves and a loader puts back. Each column's
    blocks move whole, so the values stay the file's."""
    order = np.asarray(order, dtype=np.int64)
    if order.shape != (blocks.n,) or not np.array_equal(np.sort(order), np.arange(blocks.n)):
        raise ValueError(f"not an order of {blocks.n} columns: shape {order.shape}")
    zp = None if blocks.zero_points is None else blocks.zero_points[order]
    return NBitsBlocks(k=blocks.k, n=blocks.n, bits=blocks.bits, block_size=blocks.block_size,
                       packed=np.ascontiguousarray(blocks.packed[order]),
                       scales=np.ascontiguousarray(blocks.scales[order]), zero_points=zp,
                       source_type=blocks.source_type, source_name=blocks.source_name)


def blocks_from_gguf(tensor, scale_dtype=np.float32) -> NBitsBlocks:
    """``blocks_from_bytes`` of a ``gguf.GGUFReader`` tensor (``ReaderTensor``): its type,
    its shape (``[ne0, ne1]`` = ``[K, N]``) and its bytes. The MatMul it feeds computes
    ``x @ W`` with ``W[k, n]`` the file's row ``n``, value ``k``."""
    shape = [int(d) for d in tensor.shape]
    if len(shape) != 2:
        raise ValueError(f"{tensor.name}: a 2-D weight is needed, GGUF shape {shape}")
    k, n = shape
    name = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
    blocks = blocks_from_bytes(np.asarray(tensor.data), name, k, n, scale_dtype)
    blocks.source_name = str(tensor.name)
    return blocks


def concat_blocks(parts: list[NBitsBlocks]) -> NBitsBlocks:
    """Weights side by side along ``N`` (``[K, N1 + N2 ...]``, a packed gate/up MatMul):
    blocks run along ``K`` per output column, so the rows simply follow each other."""
    first = parts[0]
    if any((p.k, p.bits, p.block_size) != (first.k, first.bits, first.block_size) for p in parts):
        raise ValueError("only blocks of one K, bit width and block size can be packed")
    if any((p.zero_points is None) != (first.zero_points is None) for p in parts):
        raise ValueError("blocks with and without zero points cannot be packed")
    zp = (None if first.zero_points is None
          else np.concatenate([p.zero_points for p in parts], axis=0))
    types = {p.source_type for p in parts}
    return NBitsBlocks(k=first.k, n=sum(p.n for p in parts), bits=first.bits,
                       block_size=first.block_size,
                       packed=np.concatenate([p.packed for p in parts], axis=0),
                       scales=np.concatenate([p.scales for p in parts], axis=0),
                       zero_points=zp, source_type=types.pop() if len(types) == 1 else "mixed",
                       part_types=tuple(p.source_type for p in parts))


def dequantize(blocks: NBitsBlocks) -> np.ndarray:
    """``W`` ``[K, N]`` in fp32 as ``MatMulNBits`` reads ``blocks`` (a reference for tests
    and for the manifest's exactness check)."""
    n, nb = blocks.n, blocks.k // blocks.block_size
    if blocks.bits == 4:
        p = blocks.packed.reshape(n, nb, -1)
        q = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(n, nb, blocks.block_size)
    else:
        q = blocks.packed.reshape(n, nb, blocks.block_size)
    zero = 2 ** (blocks.bits - 1)
    if blocks.zero_points is not None:  # float zero points (Q4_K), one per block
        zero = blocks.zero_points.astype(np.float32).reshape(n, nb)[..., None]
    w = (q.astype(np.float32) - zero) * blocks.scales.astype(np.float32)[..., None]
    return w.reshape(n, blocks.k).T


#: a weight's kinds by the last name of its module (Llama / Qwen / Gemma / Phi-3 layouts; a
#: packed module has several): QuantRecipe.keep_source_bits_kinds names these
MODULE_KINDS = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
                "qkv_proj": ("q", "k", "v"), "gate_proj": ("gate",), "up_proj": ("up",),
                "gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


def module_kinds(module: str) -> tuple[str, ...] | None:
    """The kinds of a decoder module's weight (``...layers.3.mlp.gate_proj`` -> ``("gate",)``),
    None for a module that is none of :data:`MODULE_KINDS` (the lm_head, other layouts)."""
    return MODULE_KINDS.get(module.rsplit(".", 1)[-1])


def narrow_wider_blocks(exact, kinds, bits: int = 4):
    """``exact`` (``streaming.ExactBlocks``) that keeps blocks of more than ``bits`` bits only
    for the modules whose every kind is in ``kinds``: for another module of known kind it gives
    the reason instead, so the quantizer rounds the dequantized values to ``bits`` bits as any
    other weight (a module of unknown kind keeps its blocks: never fewer bits by default)."""
    kinds = frozenset(k.value if hasattr(k, "value") else str(k) for k in kinds)

    def narrowed(module: str):
        found = exact(module)
        if not isinstance(found, NBitsBlocks) or found.bits <= bits:
            return found
        own = module_kinds(module)
        if own is None or set(own) <= kinds:
            return found
        return (f"{'/'.join(own)}: the file's blocks of more than {bits} bits are kept only for "
                f"{', '.join(sorted(kinds)) or 'no kind'} (QuantRecipe.keep_source_bits_kinds): "
                f"rounded to {bits} bits")

    return narrowed
