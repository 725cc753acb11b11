"""Tokenizer: the `tokenizers` library plus the model's chat template and stop tokens.

Built from an HF folder (tokenizer.json + tokenizer_config.json) or from GGUF metadata.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII text; chat templates (and
    # transformers) want plain JSON, with indent/separators/sort_keys available.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it for its
    training masks): rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         tools: list[dict] | None = None, documents: list[dict] | None = None,
                         **variables) -> str:
    """Render a chat template as transformers' apply_chat_template does: sandboxed Jinja2 with
    trim_blocks and lstrip_blocks, `{% break %}` / `{% continue %}`, a `tojson` that keeps
    non-ASCII text, `raise_exception`, `strftime_now`; the template sees messages, tools,
    documents, add_generation_prompt, the special tokens and any extra variables."""
    return _compile(template).render(messages=messages, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, **variables)


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as a string or as {"content": ...}.
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str | None,
                 bos_token: str | None, eos_token: str | None, eos_token_ids: tuple[int, ...] = (),
                 unk_token: str | None = None, pad_token: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        # The special tokens a template may use, as transformers passes them (those that are set).
        self.special_tokens = {name: value for name, value in (("bos_token", bos_token), ("eos_token", eos_token),
                                                                ("unk_token", unk_token), ("pad_token", pad_token))
                               if value is not None}
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
                   eos_token_ids, _token_text(config.get("unk_token")), _token_text(config.get("pad_token")))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        """The conversation as the model's template writes it (tools and extra template
        variables — e.g. a date — as transformers' apply_chat_template takes them)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat message {m!r} is invalid; allowed: a dict with 'role' and 'content'")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise ValueError(f"chat message {m!r:.120} is invalid; allowed: 'role' and 'content' strings")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError(f"tools={tools!r:.120} is invalid; allowed: None or a list of dicts (JSON schemas)")
        try:
            return render_chat_template(self.chat_template, messages, add_generation_prompt, tools=tools,
                                        **{**self.special_tokens, **template_kwargs})
        except jinja2.TemplateError as e:  # (raise_exception: the template refuses these messages)
            raise ValueError(f"the model's chat template refused this conversation: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so (as transformers does) add no special tokens here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
