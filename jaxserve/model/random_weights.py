"""Random weights in a real model's shapes: `model="random:llama-7b"` (or `random:llama-13b`, or
`random:PATH` for a folder holding an HF config.json) — S-LoRA's serving experiments at Llama-7B
and -13B sizes without their checkpoints (no downloads here). Speed does not depend on the
values; outputs are meaningless and there is no tokenizer (prompts are token ids).
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

PREFIX = "random:"
_LLAMA2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2}
CONFIGS = {  # the shapes of meta-llama/Llama-2-7b-hf and -13b-hf (S-LoRA's base models)
    "llama-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40},
}


def is_random(model) -> bool:
    return str(model).startswith(PREFIX)


def random_config(model: str) -> dict:
    """The HF config dict a `random:` model argument names."""
    name = str(model)[len(PREFIX):]
    if name in CONFIGS:
        return dict(CONFIGS[name])
    path = Path(name).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if path.name != "config.json" or not path.is_file():
        raise FileNotFoundError(f"model={model!r} is invalid; allowed: {', '.join(PREFIX + n for n in CONFIGS)} "
                                f"or {PREFIX}PATH to an HF config.json (or its folder)")
    return json.loads(path.read_text())


class RandomTensors(Mapping):
    """HF-named tensors ([out, in] linears, as a checkpoint has them) drawn on the device in
    `dtype` when asked for — normal(0, 0.02), norms 1 — each from a key of its own name, so a
    tensor is the same whichever order they are read in."""

    def __init__(self, cfg, dtype, seed: int = 0):
        h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        per_layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                     "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                     "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
                     "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        if cfg.attention_bias:
            per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                              "self_attn.v_proj.bias": (kv,)})
        self._shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
                        "lm_head.weight": (cfg.vocab_size, h)}
        self._shapes.update({f"model.layers.{n}.{k}": s for n in range(cfg.num_layers) for k, s in per_layer.items()})
        self.dtype, self.seed = dtype, seed

    def __getitem__(self, name: str):
        shape = self._shapes[name]
        if name.endswith("norm.weight"):
            return jnp.ones(shape, self.dtype)
        key = jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(name.encode()))
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)
