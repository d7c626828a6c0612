"""GGUF files as a model source: validate, dequantize through transformers, and keep
the tokenizer faithful to the file.

Known trap (DESIGN.md): tokenizers that transformers converts from GGUF metadata can
disagree with the file (special-token ids, ``add_bos_token``, the vocabulary itself).
:func:`check_tokenizer` compares the converted tokenizer with the GGUF's own token
list and special-token ids, repairs the special tokens, and refuses a vocabulary that
does not match.
"""

from __future__ import annotations

import struct
from pathlib import Path

from slmedge.runtimes.artifact import sha256_file
from slmedge.runtimes.errors import ModelSourceError

# GGUFReader raises these on a malformed or short file (reshape of a short memmap,
# index past the end, unpacking a cut header).
_GGUF_READ_ERRORS = (ValueError, IndexError, KeyError, struct.error, OSError, UnicodeDecodeError)


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` on ``path``, or a one-line error for a corrupt/truncated file."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except _GGUF_READ_ERRORS as e:
        raise ModelSourceError(
            f"{path} is corrupt or truncated ({path.stat().st_size} bytes; reading it failed: "
            f"{type(e).__name__}: {e}); download the file again"
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


def check_tokenizer(tokenizer, reader) -> list[str]:
    """Make ``tokenizer`` agree with the GGUF metadata; return notes on what was repaired.

    Raises :class:`ModelSourceError` when the vocabulary itself differs (a tokenizer that
    maps text to other ids than the model was trained on generates garbage).
    """
    notes: list[str] = []
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    if tokens:
        converted = tokenizer.convert_ids_to_tokens(list(range(len(tokens))))
        wrong = [i for i, (a, b) in enumerate(zip(tokens, converted)) if a != b]
        if wrong:
            i = wrong[0]
            raise ModelSourceError(
                f"the tokenizer converted from this GGUF disagrees with the file's vocabulary at "
                f"{len(wrong)} of {len(tokens)} ids (first: id {i} is {tokens[i]!r} in the file, "
                f"{converted[i]!r} after conversion); export from the original HF directory instead"
            )
    for role in ("bos", "eos", "unk", "pad"):
        tid = field_value(reader, f"tokenizer.ggml.{role}_token_id")
        if tid is None or not tokens or not 0 <= int(tid) < len(tokens):
            continue
        want = tokens[int(tid)]
        have = getattr(tokenizer, f"{role}_token", None)
        if have != want:
            setattr(tokenizer, f"{role}_token", want)
            notes.append(f"{role}_token set to {want!r} (id {tid}) as in the GGUF (was {have!r})")
    add_bos = field_value(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        if bool(tokenizer.add_bos_token) != bool(add_bos):
            tokenizer.add_bos_token = bool(add_bos)
            notes.append(f"add_bos_token set to {bool(add_bos)} as in the GGUF")
    sentence = "The capital of France is Paris; 3.14 — naïve café."
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    if tokenizer.decode(ids) != sentence:
        raise ModelSourceError(
            "the tokenizer converted from this GGUF does not round-trip text "
            f"({sentence!r} -> {tokenizer.decode(ids)!r}); export from the original HF directory"
        )
    return notes


def load_gguf(path: Path, torch_dtype):
    """Dequantize a GGUF into a transformers model; returns (model, tokenizer, SourceInfo)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sources import SourceInfo

    reader = open_gguf(path)
    directory, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    notes = check_tokenizer(tokenizer, reader)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch_dtype, attn_implementation="sdpa"
    )
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
        sha256={name: sha256_file(path)},
        notes=notes,
    )
    model.generation_config.eos_token_id = sorted({int(t) for t in (eos, eot) if t is not None})
    return model, tokenizer, info
