"""Read a GGUF file (llama.cpp's format) into what the HF loader path expects.

`read_gguf` returns an HF config.json-style dict, float32 numpy tensors under HF names and shapes,
and a `tokenizers.Tokenizer` rebuilt from the metadata. The reference is transformers'
`from_pretrained(..., gguf_file=...)`: same tensors, same token ids. Only llama and qwen2
architectures with a byte-level BPE ("gpt2") vocabulary are supported.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# GGUF architecture -> (HF architecture, HF model_type).
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# llama.cpp's `tokenizer.ggml.pre` names -> the split regex their merges were learned with. Any other
# name gets the plain GPT-2 ByteLevel regex, as transformers does (for "smollm" that only differs from
# llama.cpp on runs of 2+ spaces before a digit, since SmolLM's merges never touch digits).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
_GPT2_LIKE_PRE = {"default", "gpt-2", "gpt2", "smollm", "starcoder", "refact"}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map: it slices the map once per string
    (~100k times for a vocabulary), and numpy.memmap's per-slice Python overhead makes that 3x slower."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = np.asarray(value)  # same mapping, no copy


@dataclasses.dataclass
class GGUFModel:
    config: dict                      # HF config.json-style
    tensors: dict[str, np.ndarray]    # HF names and shapes, float32, q/k un-permuted
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


def read_gguf(path: str | os.PathLike, load_tensors: bool = True) -> GGUFModel:
    """Read `path`; with load_tensors=False only the (cheap) config and tokenizer are built."""
    path = os.fspath(path)
    try:
        reader = _Reader(path)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # GGUFReader signals a bad magic/version/layout with bare ValueErrors etc.
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    meta = {name: field.contents() for name, field in reader.fields.items()}

    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; "
                         f"allowed: {', '.join(_ARCHITECTURES)}")
    config = _config(path, meta, arch, reader)
    names = {t.name: _hf_name(path, t.name) for t in reader.tensors}
    # llama.cpp interleaves llama's q/k rows per head for its rotary kernel; qwen2 (NeoX rope) is as HF.
    permuted = {"attn_q": config["num_attention_heads"],
                "attn_k": config["num_key_value_heads"]} if arch == "llama" else {}
    tensors = {}
    for t in reader.tensors if load_tensors else ():
        if names[t.name] is None:
            continue
        w = _dequantize(path, t)
        n_head = permuted.get(t.name.split(".")[-2])
        tensors[names[t.name]] = w if n_head is None else _unpermute(w, n_head)
    tokenizer, special = _tokenizer(path, meta)
    return GGUFModel(config, tensors, tokenizer, meta.get("tokenizer.chat_template"),
                     special.get("bos"), special.get("eos"))


def _hf_name(path: str, name: str) -> str | None:
    """HF name of a GGUF tensor; None for rope_freqs (folded into the config)."""
    stem, _, suffix = name.rpartition(".")
    if stem == "rope_freqs":
        return None
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m[2] in _LAYER_TENSORS:
        return f"model.layers.{m[1]}.{_LAYER_TENSORS[m[2]]}.{suffix}"
    raise ValueError(f"{path}: tensor {name!r} has no HF counterpart (MoE or unknown layer?)")


def _dequantize(path: str, t) -> np.ndarray:
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}") from e
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        w = w.copy()  # a view of the memory-mapped file otherwise
    # GGUF lists dims fastest-first; numpy order is the reverse, which is HF's [out, in].
    return w.reshape([int(d) for d in reversed(t.shape)])


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp's convert_hf_to_gguf permute: rows (head, half, pair) -> (head, pair, half).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float32_value(x: float) -> float:
    # Metadata floats are float32: 1e-5 reads back as 9.99999974e-06. The shortest float32 repr
    # recovers the value the original config.json had.
    return float(str(np.float32(x)))


def _config(path: str, meta: dict, arch: str, reader) -> dict:
    def key(name, default=KeyError):
        value = meta.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{name}")
        if isinstance(value, list):
            raise ValueError(f"{path}: per-layer {arch}.{name} is not supported")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    rope_dim = key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    tensor_names = {t.name for t in reader.tensors}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    hf_arch, model_type = _ARCHITECTURES[arch]
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": key("vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(key("rope.freq_base", 10000.0)),  # llama.cpp's default
        "max_position_embeddings": key("context_length", 2048),
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        # End-of-turn (llama.cpp's eot) also ends generation, so list it with eos when it differs.
        "eos_token_id": eos if eot in (None, eos) else [eos, eot],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(path, meta, arch, reader, config)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(path: str, meta: dict, arch: str, reader, config: dict) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        # llama3-style scaling is stored as per-frequency divisors, not parameters: recover the
        # parameters (Llama 3.1/3.2 defaults besides the factor) and check they reproduce the tensor.
        factors = _dequantize(path, freqs).astype(np.float64)
        scaling = {"rope_type": "llama3", "factor": float(round(factors.max(), 4)),
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings":
                       meta.get(f"{arch}.rope.scaling.original_context_length", 8192)}
        expected = _llama3_divisors(config["head_dim"], config["rope_theta"], scaling)
        if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-3):
            raise ValueError(f"{path}: rope_freqs.weight does not match llama3 rope scaling")
        return scaling
    if kind == "none":
        return None
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":  # passed through; ModelConfig decides whether it is supported
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings":
                meta.get(f"{arch}.rope.scaling.original_context_length")}
    raise ValueError(f"{path}: rope scaling type {kind!r} is not supported")


def _llama3_divisors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """inv_freq / llama3-scaled inv_freq, per rotary frequency (what llama.cpp stores)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    orig = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    # smooth is 0 for long wavelengths (divide by factor) and 1 for short ones (unchanged).
    return 1.0 / ((1 - smooth) / s["factor"] + smooth)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tokenizer(path: str, meta: dict) -> tuple[tokenizers.Tokenizer, dict[str, str | None]]:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; allowed: gpt2 (byte-level BPE)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    # Every byte-level token should be spelled in the byte alphabet; respell any that is not
    # (llama.cpp sometimes stores specials raw) so ids still line up with the model.
    vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", ())]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))

    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", "default"))
    if split is None:
        if meta.get("tokenizer.ggml.pre", "default") not in _GPT2_LIKE_PRE:
            warnings.warn(f"{path}: unknown tokenizer.ggml.pre {meta['tokenizer.ggml.pre']!r}; "
                          "splitting text with the GPT-2 regex")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must match whole in text, as special tokens; user-defined
    # ones too, but as ordinary text. A control token outside the alphabet is a llama.cpp mislabel.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                            if ty == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                    if ty == _USER_DEFINED and t in vocab])

    special = {name: tokens[meta[f"tokenizer.ggml.{name}_token_id"]]
               for name in ("bos", "eos") if f"tokenizer.ggml.{name}_token_id" in meta}
    # BOS/EOS are added only where the file says so (byte-level files default to neither).
    bos = [special["bos"]] if meta.get("tokenizer.ggml.add_bos_token") and "bos" in special else []
    eos = [special["eos"]] if meta.get("tokenizer.ggml.add_eos_token") and "eos" in special else []
    tok.post_processor = processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)],
        special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(bos + eos)])
    return tok, special
