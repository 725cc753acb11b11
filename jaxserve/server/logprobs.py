"""Logprobs in OpenAI's two shapes: completions' {tokens, token_logprobs, top_logprobs,
text_offset} and chat's {content: [{token, logprob, bytes, top_logprobs}]}.

A token's text is what it decodes to; a token that is only part of a UTF-8 character (byte-level
BPE splits them) is written "bytes:\\xe2\\x80" as OpenAI does, so such tokens stay distinct.
"""
from __future__ import annotations

import functools
import re

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the printable stand-ins byte-level BPE
    vocabularies use for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenTexts:
    """Token id -> (text, raw bytes), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token: int) -> tuple[str, bytes]:
        found = self._cache.get(token)
        if found is None:
            found = self._cache[token] = self._lookup(token)
        return found

    def _lookup(self, token: int) -> tuple[str, bytes]:
        if self.tokenizer is None:
            return str(token), str(token).encode()
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text, text.encode("utf-8")
        raw = self._raw_bytes(self.tokenizer.tokenizer.id_to_token(token) or "")
        if raw is None:
            return text, text.encode("utf-8")
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    @staticmethod
    def _raw_bytes(piece: str) -> bytes | None:
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match:  # SentencePiece's byte fallback tokens
            return bytes([int(match.group(1), 16)])
        table = _byte_level_decoder()
        if piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return None


def _best(top: dict, n: int) -> list[tuple[int, float]]:
    # The engine's dict holds the n best plus the sampled token: the n best are the n largest.
    return sorted(top.items(), key=lambda kv: -kv[1])[:n]


def completion_logprobs(texts: TokenTexts, token_ids: list, tops: list, n: int, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, top in zip(token_ids, tops):
        text = texts.get(token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(top.get(token))
        out["top_logprobs"].append({texts.get(t)[0]: lp for t, lp in _best(top, n)})
        out["text_offset"].append(offset)
        offset += 0 if text.startswith("bytes:") else len(text)  # (a part of a character: no offset of its own)
    return out


def chat_logprobs(texts: TokenTexts, token_ids: list, tops: list, n: int) -> dict:
    def entry(token, logprob):
        text, raw = texts.get(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**entry(token, top.get(token)), "top_logprobs": [entry(t, lp) for t, lp in _best(top, n)]}
                        for token, top in zip(token_ids, tops)]}
