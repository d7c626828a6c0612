"""torch -> TFLite for a decoder with a static KV cache, through ``litert-torch``.

The Hugging Face model runs its own modeling code inside :class:`StaticCacheDecoder`,
which gives it a fixed-size cache object and a ready-made 4D attention mask, so the
traced graph has only static shapes (what LiteRT and mobile accelerators want). One
``.tflite`` file holds several signatures that share the weights::

    prefill_<T>  tokens [1, T] int32, input_pos [T] int32, kv_cache_{k,v}_<i> [1, kv_heads, C, head_dim]
                 -> logits [1, T, vocab], kv_cache_{k,v}_<i> (same shape)
    decode       the same with T = 1

``input_pos`` holds the positions of the T tokens (consecutive); the new keys and values
are written at those rows of the cache with one ``dynamic_update_slice`` per tensor (the
op LiteRT's own LLM pipeline uses), and every cache row after the last position is masked.
Rows written by padding tokens are therefore harmless: they are masked until a real token
overwrites them. The contract is read back by ``slmedge.runtimes.sessions.litert_decoder``.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from slmedge.runtimes.errors import SlmEdgeError, UnsupportedArchitecture

from slmedge.exporter.architectures import ArchitectureSpec, get_spec, tflite_model_types

DECODE_SIGNATURE = "decode"
PREFILL_PREFIX = "prefill_"
KV_PREFIX = "kv_cache"


def kv_keys(num_layers: int) -> list[str]:
    """Keys of the ``kv_cache`` dict argument; litert-torch names the signature tensors
    ``kv_cache_<key>`` (e.g. ``kv_cache_k_0``), in and out alike."""
    return [f"{kind}_{i}" for i in range(num_layers) for kind in ("k", "v")]


class TfliteConversionFailed(SlmEdgeError):
    """litert-torch could not trace or lower the model."""


# -- which families the static-cache wrapper expresses (the registry's specs say) ----------


def check_family(model_type: str, config=None) -> type[ArchitectureSpec]:
    """The spec of ``model_type`` when ``--format tflite`` takes it (``tflite_unsupported`` is
    None); :class:`UnsupportedArchitecture` (exit 4) with the reason otherwise."""
    try:
        family = get_spec(model_type)
        why = family.tflite_unsupported
    except UnsupportedArchitecture:
        why = "no architecture spec for this model_type"
    if why is not None:
        raise UnsupportedArchitecture(
            f"--format tflite: model_type '{model_type}' is not supported ({why}); TFLite "
            f"supports {', '.join(tflite_model_types())}. Use --format onnx for it"
        )
    if config is not None:
        scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise UnsupportedArchitecture(
                f"--format tflite: rope_type '{rope_type}' picks its frequencies from the "
                "sequence length at run time, which a static graph cannot express"
            )
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedArchitecture(
                "--format tflite: bidirectional attention (embedding Gemma) is not a decoder"
            )
    return family


# -- attention for the static graph --------------------------------------------------------------

ATTENTION_NAME = "slmedge_tflite_grouped"


def grouped_query_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """Attention with grouped query heads instead of repeated key/value heads.

    transformers' SDPA path repeats every key/value head ``n_rep`` times (``repeat_kv``), which
    in a static graph copies the whole KV cache on every call (SmolLM2: 3 -> 9 heads, 30
    layers x 1024 rows). Here the query heads that share a key/value head are stacked along
    the sequence axis instead, ``[b, kv, n_rep*T, d]``, so the cache is read in place; the
    mask rows are tiled to match. Everything stays rank 4: with ONE key/value head (Gemma 3
    270M / 1B) the rank-5 ``[:, :, None].expand().reshape()`` of ``repeat_kv`` was lowered
    wrongly by litert-torch 0.10.0 (tiny Gemma 3, kv_heads=1: every position after the first
    off by up to 0.6; the same model with kv_heads=2: 3e-7), and a rank-4 ``expand`` failed
    in LiteRT's BROADCAST_TO prepare.
    """
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b, kv_heads, rep * t, d)
    scores = torch.matmul(q, key.transpose(2, 3)) * scale
    cap = getattr(module, "attn_logit_softcapping", None) or kwargs.get("softcap")
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if attention_mask is not None:
        mask = attention_mask  # [b, 1, T, C], built by StaticCacheDecoder for the whole cache
        scores = scores + (mask.repeat(1, 1, rep, 1) if rep > 1 else mask)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).reshape(b, heads, t, d)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def grouped_attention(model):
    """Run ``model`` with :func:`grouped_query_attention` (restored afterwards)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, grouped_query_attention)
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        for c, name in zip(configs, before, strict=True):
            c._attn_implementation = name


# -- the wrapper ------------------------------------------------------------------------------


class _SliceCache:
    """The part of transformers' ``Cache`` API the attention layers call: ``update``.

    Writes the step's keys/values at ``start`` with ``dynamic_update_slice`` and returns the
    whole fixed-size cache; the 4D mask decides which rows count.
    """

    is_compileable = True

    def __init__(self, tensors: list[torch.Tensor], start: torch.Tensor):
        from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

        self._dus = dynamic_update_slice
        self.tensors = list(tensors)
        zero = torch.zeros([], dtype=torch.int32)
        self._index = [zero, zero, start, zero]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = self._dus(self.tensors[2 * layer_idx], key_states, self._index)
        v = self._dus(self.tensors[2 * layer_idx + 1], value_states, self._index)
        self.tensors[2 * layer_idx], self.tensors[2 * layer_idx + 1] = k, v
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only read without position_ids
        raise NotImplementedError("the static-cache wrapper always passes position_ids")


class StaticCacheDecoder(torch.nn.Module):
    """``(tokens, input_pos, kv_cache) -> {logits, kv_cache}`` around a HF causal LM."""

    def __init__(self, model, spec: type[ArchitectureSpec], context_length: int):
        super().__init__()
        self.model = model
        self.num_layers, self.kv_heads, self.head_dim = spec.kv_layout(model.config)
        self.context_length = context_length
        self.names = kv_keys(self.num_layers)
        config = model.config
        self.family = check_family(config.model_type, config)
        self.sliding_window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, self.family.tflite_layer_types_attr or "", None)
        self.layer_types = sorted(set(layer_types)) if layer_types else None

    def _masks(self, input_pos: torch.Tensor):
        slots = torch.arange(self.context_length, dtype=torch.int32)[None, :]
        query = input_pos[:, None]
        causal = slots <= query
        neg = torch.tensor(torch.finfo(torch.float32).min)
        zero = torch.tensor(0.0)

        def to_mask(allowed):
            return torch.where(allowed, zero, neg)[None, None]

        if self.layer_types is None:
            return to_mask(causal)
        masks = {}
        for kind in self.layer_types:
            if kind == "sliding_attention":
                # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window
                masks[kind] = to_mask(causal & (slots > query - self.sliding_window))
            elif kind == "full_attention":
                masks[kind] = to_mask(causal)
            else:
                raise UnsupportedArchitecture(
                    f"--format tflite: attention layer type '{kind}' is not supported"
                )
        return masks

    def forward(self, tokens, input_pos, kv_cache):
        cache = _SliceCache([kv_cache[n] for n in self.names], input_pos[0].reshape([]))
        out = self.model(
            input_ids=tokens,
            attention_mask=self._masks(input_pos),
            position_ids=input_pos[None, :],
            use_cache=True,
            cache=cache,
        )
        return {"logits": out.logits, KV_PREFIX: dict(zip(self.names, cache.tensors, strict=True))}


def sample_inputs(wrapper: StaticCacheDecoder, length: int, start: int = 0) -> dict:
    """Tracing inputs of a signature that feeds ``length`` tokens."""
    shape = (1, wrapper.kv_heads, wrapper.context_length, wrapper.head_dim)
    kv = {name: torch.zeros(shape) for name in wrapper.names}
    return {
        "tokens": torch.zeros((1, length), dtype=torch.int32),
        "input_pos": torch.arange(start, start + length, dtype=torch.int32),
        KV_PREFIX: kv,
    }


@dataclass
class TfliteGraphInfo:
    """What the converted graph looks like, for the manifest."""

    signatures: dict[str, dict] = field(default_factory=dict)
    context_length: int = 0
    prefill_chunks: list[int] = field(default_factory=list)
    kv_shape: list[int] = field(default_factory=list)
    kv_dtype: str = "float32"
    prefill_logits: str = "all"  # prefill returns the logits of every fed position
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _param_dtype_guard(model) -> None:
    dtype = next(model.parameters()).dtype
    if dtype is not torch.float32:
        raise TfliteConversionFailed(
            f"the TFLite path converts fp32 weights (got {dtype}); fp16 is a --quant recipe"
        )


def convert_decoder(
    model,
    spec: type[ArchitectureSpec],
    *,
    context_length: int,
    prefill_chunks: list[int],
) -> tuple[bytes, TfliteGraphInfo]:
    """Convert ``model`` (eval mode, fp32) to a TFLite flatbuffer with prefill/decode signatures."""
    import litert_torch

    _param_dtype_guard(model)
    wrapper = StaticCacheDecoder(model, spec, context_length).eval()
    chunks = sorted(set(prefill_chunks))
    if not chunks or chunks[0] < 2 or chunks[-1] > context_length:
        raise TfliteConversionFailed(
            f"prefill chunks {prefill_chunks} must be between 2 and the context length "
            f"({context_length})"
        )
    converter = litert_torch.Converter()
    for t in chunks:
        converter.signature(
            f"{PREFILL_PREFIX}{t}", wrapper, sample_kwargs=sample_inputs(wrapper, t)
        )
    converter.signature(DECODE_SIGNATURE, wrapper, sample_kwargs=sample_inputs(wrapper, 1, 1))
    t0 = time.perf_counter()
    # litert-torch prints its progress and absl logs on stdout; keep stdout for --json.
    with (
        contextlib.redirect_stdout(sys.stderr),
        warnings.catch_warnings(),
        torch.no_grad(),
        grouped_attention(model),
    ):
        warnings.simplefilter("ignore")
        try:
            edge = converter.convert()
            flatbuffer = bytes(edge.model_content())  # prints its progress too
        except Exception as e:  # torch.export / lowering raise many types; keep the last line
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise TfliteConversionFailed(
                f"litert-torch could not convert {type(model).__name__}: {lines[-1][:400]}"
            ) from e
    shape = [1, wrapper.kv_heads, context_length, wrapper.head_dim]
    sigs = {f"{PREFILL_PREFIX}{t}": {"tokens": t} for t in chunks}
    sigs[DECODE_SIGNATURE] = {"tokens": 1}
    info = TfliteGraphInfo(
        signatures=sigs,
        context_length=context_length,
        prefill_chunks=chunks,
        kv_shape=shape,
        seconds=round(time.perf_counter() - t0, 2),
    )
    return flatbuffer, info
