"""Tokenizer and chat template for an artifact, on ``tokenizers`` + jinja2 (no transformers).

Reads the files that ``transformers``' ``save_pretrained`` writes: ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja`` (or the template inside the config),
and ``generation_config.json`` for the stop tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .errors import ArtifactError


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from None


class TextTokenizer:
    """Encode, decode, stream-decode and apply the chat template of one model."""

    def __init__(self, root: str | Path):
        root = Path(root)
        tok_path = root / "tokenizer.json"
        if not tok_path.exists():
            raise ArtifactError(
                f"{root} has no tokenizer.json; the artifact is incomplete, export it again"
            )
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ArtifactError(f"{tok_path} could not be read: {e}") from None
        config = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template_file = root / "chat_template.jinja"
        if template_file.exists():
            self.chat_template = template_file.read_text(encoding="utf-8")
        else:
            self.chat_template = config.get("chat_template")
        eos = gen.get("eos_token_id", [])
        self.stop_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        if self.eos_token and (tid := self.tokenizer.token_to_id(self.eos_token)) is not None:
            self.stop_ids.add(tid)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens (e.g. BOS) as the model's tokenizer adds them."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> TokenStream:
        """An incremental decoder: feed ids one by one, get text as soon as it is complete."""
        return TokenStream(self.tokenizer, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the model's chat template (jinja2 sandbox, as transformers does)."""
        if not self.chat_template:
            raise ArtifactError(
                "this model has no chat template; run without --chat, or add chat_template.jinja "
                "to the artifact"
            )
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, prompt: str, system: str | None = None) -> list[int]:
        """Token ids of one user turn with the generation prompt, as ``apply_chat_template`` gives."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        # The rendered template already holds any BOS it wants; transformers encodes it
        # without adding special tokens again.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class TokenStream:
    """Incremental detokenizer (UTF-8 sequences split across tokens come out whole)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, int(token_id)) or ""
