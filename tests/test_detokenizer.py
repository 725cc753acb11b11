"""Incremental detokenization (tokenizers' DecodeStream) against full decodes: random token
streams of a byte-level BPE (SmolLM2's: tokens that split multi-byte characters) and of a
SentencePiece-style tokenizer (the tiny fixture's), chunk by chunk; stop strings spanning
tokens are cut and their possible prefixes held back from streaming."""
import functools

import numpy as np
import pytest

from conftest import TINY

from jaxserve.detokenizer import IncrementalDetokenizer
from jaxserve.model import gguf_file, weights
from jaxserve.tokenizer import Tokenizer


@functools.lru_cache(maxsize=None)
def tokenizer(name: str) -> Tokenizer:
    if name == "smollm2":
        model = gguf_file.read_gguf(weights.resolve_model("smollm2"), load_tensors=False)
        return Tokenizer(model.tokenizer, None, model.bos_token, model.eos_token)
    return Tokenizer.from_hf_folder(TINY)


def stream(tok, ids, skip=True, stop=()):
    detok = IncrementalDetokenizer(tok, skip, list(stop))
    seen, outputs = [], []
    for token in ids:
        seen.append(token)
        hit = detok.add(seen)
        outputs.append(detok.stable_text(False))
        if hit is not None:
            return detok, hit, outputs
    detok.flush(seen)
    return detok, None, outputs


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
@pytest.mark.parametrize("seed", range(4))
def test_streamed_text_is_the_full_decode(name, seed):
    tok = tokenizer(name)
    rng = np.random.default_rng(seed)
    text = "Héllo wörld — 日本語のテキスト 🙂 and plain words, 1234." * 2
    ids = tok.encode(text, add_special_tokens=False)
    ids = ids + rng.integers(0, tok.vocab_size, 40).tolist()  # random tokens: partial characters too
    for skip in (True, False):
        detok, hit, outputs = stream(tok, ids, skip)
        assert hit is None and detok.text == tok.decode(ids, skip_special_tokens=skip)
        assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:]))  # shown text only grows


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_stop_string_spanning_tokens_is_cut_and_never_shown(name):
    tok = tokenizer(name)
    ids = tok.encode("The answer is forty-two. STOP here and more text", add_special_tokens=False)
    detok, hit, outputs = stream(tok, ids, stop=["two. ST", "never"])
    assert hit == "two. ST" and detok.text == tok.decode(ids)[:tok.decode(ids).index("two. ST")]
    # What was shown along the way is always a prefix of the final text: the stop string's
    # beginning ("two. S") was held back, never shown and then taken back.
    assert all(detok.text.startswith(shown) for shown in outputs)
