"""Incremental detokenization with stop strings that may span tokens.

Decoding only the tail of the output each step (vLLM's prefix/read offsets) keeps the cost per
token constant; a token that ends inside a multi-byte character yields no text until the
character completes. With stop strings, the last (longest stop - 1) characters are held back
from streaming until they cannot begin a stop string, so a stream never shows text the final
output does not contain.
"""
from __future__ import annotations

from jaxserve.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, stop: list[str]):
        self.tokenizer, self.skip, self.stop = tokenizer, skip_special_tokens, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.prefix_offset = self.read_offset = 0
        self.text = ""

    def add(self, ids: list[int]) -> str | None:
        """Take the output ids after a new token; returns the stop string if one now appears
        (the text is then cut before it)."""
        decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=self.skip)
        prefix = decode(ids[self.prefix_offset:self.read_offset])
        full = decode(ids[self.prefix_offset:])
        if full.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next token
            return None
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        if not delta:
            return None
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        hits = [(self.text.find(s, start), s) for s in self.stop if self.text.find(s, start) >= 0]
        if hits:
            cut, stop = min(hits)
            self.text = self.text[:cut]
            return stop
        return None

    def flush(self, ids: list[int]) -> None:
        """At the end, take what is not decoded yet: the tail an unfinished UTF-8 sequence held
        back (as U+FFFD, the way a full decode shows it), or everything if add() never ran."""
        decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=self.skip)
        if self.read_offset < len(ids):
            self.text += decode(ids[self.prefix_offset:])[len(decode(ids[self.prefix_offset:self.read_offset])):]
            self.prefix_offset = self.read_offset = len(ids)

    def stable_text(self, finished: bool) -> str:
        """Text safe to show: all of it when finished, else all but the held-back tail."""
        return self.text if finished or not self.holdback else self.text[:max(0, len(self.text) - self.holdback)]
