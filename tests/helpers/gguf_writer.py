"""Write tiny GGUF files from tiny Hugging Face models, as llama.cpp's converter lays them out.

A GGUF written here holds the weights of a tiny model of ``tiny_models.py`` under llama.cpp's
tensor names and layouts (Q/K rows permuted for llama, Gemma norms stored as ``w + 1``, GPT-2's
Conv1D weights transposed), the hyper-parameters under llama.cpp's metadata keys, and a
byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``). Loading it back through
transformers must give the original model: the tests compare against that model's logits.

The tiny HF tokenizer of ``tiny_models.py`` is a 128-token Metaspace BPE; a GGUF's gpt2-style
vocabulary must spell every byte, so these models get their own byte-level vocabulary of
``VOCAB`` tokens (256 bytes + a few merges + the special tokens).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from helpers.tiny_models import CHATML, CORPUS, tiny_config

VOCAB = 320
# "<mask>": transformers' GemmaTokenizer adds one when the vocabulary has none (every real
# Gemma vocabulary has it), which would give the tokenizer a token the model does not have.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>"]
ENDOFTEXT, IM_START, IM_END = range(3)

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

#: GGUF ``general.architecture`` of each tiny model type.
GGUF_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
}

# Config values a GGUF cannot state: transformers' GGUF loader (legacy path, 5.24) takes the
# config class's default for them, so the tiny model written to a GGUF must use that default too.
# (Qwen3: `attention.key_length` is not read, head_dim stays 128. Gemma 3: query_pre_attn_scalar
# and the sliding/full layer pattern are not in the file. GPT-2: `context_length` goes to `n_ctx`,
# which sizes nothing; the position table keeps n_positions=1024.) Gemma gets 6 layers so that
# the default pattern (every 6th layer global) has a full-attention layer.
_GGUF_EXPRESSIBLE = {
    "qwen3": dict(head_dim=128),
    "gpt2": dict(n_positions=1024),
    "gemma3_text": dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=256),
}


@dataclass
class GGUFVocab:
    """The tokenizer metadata of a GGUF (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    bos_id: int | None = ENDOFTEXT
    eos_id: int | None = IM_END
    unk_id: int | None = ENDOFTEXT
    pad_id: int | None = ENDOFTEXT
    add_bos: bool | None = True
    chat_template: str | None = CHATML
    model: str = "gpt2"
    pre: str = "gpt-2"
    extra: dict = field(default_factory=dict)  # more metadata keys, written as given

    def with_(self, **changes) -> GGUFVocab:
        return replace(self, **changes)


def byte_level_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on the tiny corpus, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def gguf_vocab(tok) -> GGUFVocab:
    """The GGUF tokenizer metadata of a byte-level ``tokenizers.Tokenizer``."""
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for text, index in vocab.items():
        tokens[index] = text
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [CONTROL if t in SPECIAL_TOKENS else NORMAL for t in tokens]
    return GGUFVocab(tokens=tokens, token_types=types, merges=merges)


def sentencepiece_vocab() -> GGUFVocab:
    """A SentencePiece-BPE vocabulary (``tokenizer.ggml.model = llama``) as llama.cpp stores one:
    <unk> <s> </s>, the 256 ``<0xXX>`` byte-fallback tokens, the corpus's characters, then the
    merged pieces of a Metaspace BPE with scores falling in merge order. No merges: readers
    derive them from the scores."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    chars = sorted({c for word in tok.get_vocab() for c in word if len(word) == 1})
    pieces = [a + b for a, b in merges]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(chars) + len(pieces))
    scores = [0.0] * 259 + [-1e4 - i for i in range(len(chars))] + [-float(i) for i in range(len(pieces))]
    assert len(set(tokens)) == len(tokens)
    return GGUFVocab(tokens=tokens, token_types=types, merges=[], scores=scores, bos_id=1,
                     eos_id=2, unk_id=0, pad_id=None, model="llama", pre="default",
                     chat_template=None)


def tiny_gguf_model(model_type: str, vocab_size: int = VOCAB, seed: int = 0):
    """A tiny model like ``tiny_models.tiny_model``, with this vocabulary size and only config
    values a GGUF can carry."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    config.vocab_size = vocab_size
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ENDOFTEXT, IM_END, ENDOFTEXT
    for key, value in _GGUF_EXPRESSIBLE.get(model_type, {}).items():
        setattr(config, key, value)
    if model_type == "gemma3_text":  # layer_types=None: rebuild the default pattern for 6 layers
        config = type(config)(**{k: v for k, v in config.to_dict().items() if k != "layer_types"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # as tiny_models.tiny_model: widen the logits beyond rounding noise
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval()


# -- weights: HF layout -> llama.cpp layout --------------------------------------------------


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for llama (interleaved rotary halves); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_llama_cpp(arch: str, hf_name: str, w: np.ndarray, config) -> np.ndarray:
    if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
        return _llama_permute(w, config.num_attention_heads)
    if arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
        return _llama_permute(w, config.num_key_value_heads)
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return w + 1.0  # llama.cpp multiplies by w, Gemma's RMSNorm by (1 + w)
    if arch == "gpt2" and w.ndim == 2 and not hf_name.startswith(("transformer.wte", "transformer.wpe")):
        return w.T  # HF's Conv1D stores (in, out); ggml wants (out, in)
    return w


def gguf_tensors(model, arch: str):
    """``{gguf_name: float32 array}`` of a model, named and laid out as llama.cpp writes them."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    config = model.config
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for tied embeddings
        base, _, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise KeyError(f"no GGUF name for {hf_name} ({arch})")
        w = tensor.detach().float().numpy()
        out[f"{mapped}.{suffix}"] = np.ascontiguousarray(_to_llama_cpp(arch, hf_name, w, config))
    return out


# -- metadata --------------------------------------------------------------------------------


def _add_hparams(w, arch: str, config) -> None:
    if arch == "gpt2":
        w.add_context_length(config.n_positions)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3: per layer type; the file has the global one
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(config.vocab_size)
    if arch == "gemma3":
        w.add_sliding_window(config.sliding_window)


def _add_vocab(w, vocab: GGUFVocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for role, value in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("unk", vocab.unk_id),
                        ("pad", vocab.pad_id)):
        if value is not None:
            getattr(w, f"add_{role}_token_id")(value)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    for key, value in vocab.extra.items():
        w.add_key_value(key, value, _value_type(value))


def _value_type(value):
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    return gguf.GGUFValueType.STRING


def write_gguf(
    path: Path,
    model,
    vocab: GGUFVocab,
    *,
    architecture: str | None = None,
    weight_type: str = "f32",
) -> Path:
    """Write ``model`` + ``vocab`` as a GGUF. ``weight_type``: f32 | f16 | q8_0 | q4_0 for the matrices
    (norms and biases stay F32, as llama.cpp keeps them). ``architecture`` overrides the
    ``general.architecture`` written (the tensors stay those of the model)."""
    import gguf

    arch = GGUF_ARCH[model.config.model_type]
    w = gguf.GGUFWriter(str(path), architecture or arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}[weight_type])
    _add_hparams(w, architecture or arch, model.config)
    _add_vocab(w, vocab)
    for name, array in gguf_tensors(model, arch).items():
        if array.ndim < 2 or weight_type == "f32":
            w.add_tensor(name, array.astype(np.float32))
        elif weight_type == "f16":
            w.add_tensor(name, array.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[weight_type.upper()]
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@dataclass
class TinyGGUF:
    """A tiny GGUF on disk with what it was written from."""

    path: Path
    model: object  # the original transformers model (eval mode)
    tokenizer: object  # the tokenizers.Tokenizer its vocabulary came from
    vocab: GGUFVocab


def save_tiny_gguf(
    model_type: str,
    path: Path,
    *,
    seed: int = 0,
    weight_type: str = "f32",
    architecture: str | None = None,
    **vocab_changes,
) -> TinyGGUF:
    """Write the tiny ``model_type`` as a GGUF at ``path``; ``vocab_changes`` edit its metadata."""
    tok = byte_level_tokenizer()
    vocab = gguf_vocab(tok).with_(**vocab_changes)
    model = tiny_gguf_model(model_type, len(vocab.tokens), seed)
    write_gguf(Path(path), model, vocab, architecture=architecture, weight_type=weight_type)
    return TinyGGUF(Path(path), model, copy.deepcopy(tok), vocab)
