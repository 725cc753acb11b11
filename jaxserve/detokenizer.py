"""Incremental detokenization with stop strings that may span tokens.

`tokenizers`' DecodeStream turns each new token into its text chunk at a constant cost per token
(it keeps the prefix/read offsets vLLM keeps by hand); a token that ends inside a multi-byte
character yields no text until the character completes. With stop strings, the last (longest stop - 1) characters are held back
from streaming until they cannot begin a stop string, so a stream never shows text the final
output does not contain.
"""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

from jaxserve.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, stop: list[str]):
        self.tokenizer, self.skip, self.stop = tokenizer, skip_special_tokens, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.fed = 0              # output ids given to the stream
        # The ids whose text came out before and with the latest chunk: flush() decodes the
        # rest (an unfinished character) against them, as a full decode would show it.
        self.chunk_start = self.chunk_end = 0
        self.text = ""

    def add(self, ids: list[int]) -> str | None:
        """Take the output ids after a new token; returns the stop string if one now appears
        (the text is then cut before it)."""
        delta = ""
        for i in range(self.fed, len(ids)):
            chunk = self.stream.step(self.tokenizer.tokenizer, ids[i])
            if chunk:
                delta += chunk
                self.chunk_start, self.chunk_end = self.chunk_end, i + 1
        self.fed = len(ids)
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
        if self.chunk_end < len(ids):
            decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=self.skip)  # noqa: E731
            self.text += decode(ids[self.chunk_start:])[len(decode(ids[self.chunk_start:self.chunk_end])):]
            self.chunk_start = self.chunk_end = self.fed = len(ids)
            self.stream = DecodeStream(skip_special_tokens=self.skip)  # (nothing more comes)

    def stable_text(self, finished: bool) -> str:
        """Text safe to show: all of it when finished, else all but the held-back tail."""
        return self.text if finished or not self.holdback else self.text[:max(0, len(self.text) - self.holdback)]
