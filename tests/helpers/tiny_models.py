"""Tiny random models of the real Hugging Face config classes, one per registered architecture.

2 layers, hidden 64, vocab 128, fixed seed: offline, seconds, megabytes. Each is saved
as an HF directory (weights + a tiny BPE tokenizer with a ChatML template) so the
exporter reads it exactly as it reads a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 128
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
UNK, BOS, EOS, IM_START, IM_END, PAD = range(6)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
    " }}{% endif %}"
)
CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "must be in want of a wife. However little known the feelings or views of such a man may be",
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the",
    "surrounding families, that he is considered the rightful property of some one or other.",
    "The quick brown fox jumps over the lazy dog. 0123456789 Hello world, how are you today?",
]

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, bos_token_id=BOS, eos_token_id=EOS,
               pad_token_id=PAD, max_position_embeddings=512)


def tiny_config(model_type: str):
    """The tiny config of a registered ``model_type`` (raises KeyError for a missing fixture)."""
    import transformers as tf

    factories = {
        "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, **_COMMON),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, **_COMMON),
        "qwen3": lambda: tf.Qwen3Config(hidden_size=64, intermediate_size=128, head_dim=16,
                                        num_attention_heads=4, num_key_value_heads=2, **_COMMON),
        # Sliding window 8 < the test sequences, so the sliding-window mask is exercised.
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], **_COMMON),
        "phi3": lambda: tf.Phi3Config(hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, **_COMMON),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=512, bos_token_id=BOS, eos_token_id=EOS,
                                      pad_token_id=PAD),
    }
    return factories[model_type]()


TINY_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2")


def tiny_tokenizer():
    """A 128-token BPE tokenizer (Metaspace, so text round-trips) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


# Random init gives near-uniform logits, so weights are widened (greedy decoding is then not
# decided by rounding noise between near-ties); and with tied embeddings a random model tends
# to echo its last token. Scale and seed per family are chosen so that 20 greedy tokens from
# the tests' prompt are a varied sequence (the parity tests check that they are).
_INIT = {"gemma3_text": (1.0, 1), "gpt2": (8.0, 0)}
_DEFAULT_INIT = (4.0, 0)


def tiny_model(model_type: str):
    import torch
    from transformers import AutoModelForCausalLM

    scale, seed = _INIT.get(model_type, _DEFAULT_INIT)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model.eval()


def save_tiny(model_type: str, directory: Path) -> Path:
    """Write a tiny HF checkpoint (config, safetensors, tokenizer) to ``directory``."""
    directory = Path(directory)
    model = tiny_model(model_type)
    model.generation_config.eos_token_id = EOS
    from slmedge.exporter.quiet import quiet_libraries

    with quiet_libraries():  # no "Writing model shards" bar in the CLI tests' stderr
        model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
