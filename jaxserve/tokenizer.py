"""Tokenizer: the `tokenizers` library plus the model's chat template and stop tokens.

Built from an HF folder (tokenizer.json + tokenizer_config.json) or from GGUF metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
import tokenizers


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         **special_tokens) -> str:
    """Render a chat template as transformers' apply_chat_template does (sandboxed Jinja2,
    trim_blocks and lstrip_blocks on, bos_token/eos_token available to the template)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as a string or as {"content": ...}.
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str | None,
                 bos_token: str | None, eos_token: str | None, eos_token_ids: tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        ids = set(eos_token_ids)
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            ids.add(tokenizer.token_to_id(eos_token))
        self.eos_token_ids = tuple(sorted(ids))

    @classmethod
    def from_hf_folder(cls, folder: Path, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (pass prompt_token_ids instead of text)")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        return cls(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), template,
                   _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                   eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat message {m!r} is invalid; allowed: a dict with 'role' and 'content'")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise ValueError(f"chat message {m!r:.120} is invalid; allowed: 'role' and 'content' strings")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so (as transformers does) add no special tokens here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
