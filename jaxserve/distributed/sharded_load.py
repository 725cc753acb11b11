"""Sharded start-up: under tensor parallelism every param is read from its file straight into its
shards — each device's block of the laid-out param is read as a slice of the file
(safetensors' get_slice), laid out (heads.py's index maps) and cast on the host, and placed with
jax.make_array_from_callback. Neither a whole param nor the whole model passes through one
device, and the host holds one device's block at a time (replicated params, such as the norms,
are read whole once per device).

Two sources of params in jaxserve's layout (layers stacked [L, in, out]):
- `CachedParams`: the GGUF params cache (weights.gguf_params_cache writes it: already jaxserve's
  layout, float32);
- `HFParams`: an HF folder's safetensors (per-layer [out, in] tensors: each layer's slice read
  transposed, then stacked).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open

from jaxserve.config import ModelConfig
from jaxserve.distributed.heads import take_index
from jaxserve.distributed.tensor_parallel import TensorParallel
from jaxserve.model.weights import LAYER_LINEARS, LAYER_VECTORS


class CachedParams:
    """The GGUF params cache: one safetensors file keyed "embed", "layers.q", ..."""

    def __init__(self, path: Path):
        self._file = safe_open(path, framework="numpy")

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def read(self, key: str, region: tuple[slice, ...]) -> np.ndarray:
        return self._file.get_slice(key)[region]


class HFParams:
    """An HF folder's safetensors (sharded or not) under jaxserve's param keys."""

    def __init__(self, folder: Path, cfg: ModelConfig):
        index = folder / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                 else sorted(p.name for p in folder.glob("*.safetensors")))
        self._where = {}
        for name in files:
            f = safe_open(folder / name, framework="numpy")
            self._where.update(dict.fromkeys(f.keys(), f))
        self.cfg = cfg
        vectors = {k: v for k, v in LAYER_VECTORS.items() if cfg.attention_bias or not k.endswith(".bias")}
        self._layer = {key: suffix for suffix, key in {**LAYER_LINEARS, **vectors}.items()}

    def _slice(self, name: str):
        if name not in self._where:
            raise ValueError(f"checkpoint lacks tensor {name!r} needed by {self.cfg.architecture}")
        return self._where[name].get_slice(name)

    def keys(self) -> list[str]:
        keys = ["embed", "final_norm"] + [f"layers.{k}" for k in self._layer]
        return keys + ([] if self.cfg.tie_word_embeddings else ["lm_head"])

    def _hf(self, key: str, layer: int = 0) -> tuple[str, bool]:
        """(HF tensor name, stored transposed)."""
        if key.startswith("layers."):
            suffix = self._layer[key[len("layers."):]]
            return f"model.layers.{layer}.{suffix}", suffix in LAYER_LINEARS
        return {"embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False),
                "lm_head": ("lm_head.weight", True)}[key]

    def shape(self, key: str) -> tuple[int, ...]:
        name, transposed = self._hf(key)
        shape = tuple(self._slice(name).get_shape())[::-1 if transposed else 1]
        return (self.cfg.num_layers, *shape) if key.startswith("layers.") else shape

    def read(self, key: str, region: tuple[slice, ...]) -> np.ndarray:
        def one(name, transposed, part):
            return self._slice(name)[part[::-1]].T if transposed else self._slice(name)[part]
        if not key.startswith("layers."):
            return one(*self._hf(key), region)
        layers = range(*region[0].indices(self.cfg.num_layers))
        return np.stack([one(*self._hf(key, i), region[1:]) for i in layers])


def restore_params(tp: TensorParallel, source, model_cfg: ModelConfig, dtype) -> dict:
    """The params pytree read from `source` straight into tp's shards, laid out, in dtype."""
    params: dict = {"layers": {}}
    for key in source.keys():
        name = key[len("layers."):] if key.startswith("layers.") else key
        target = params["layers"] if key.startswith("layers.") else params
        target[name] = _restore(tp, key, name, source, model_cfg, dtype)
    return params


def _restore(tp: TensorParallel, key: str, name: str, source, model_cfg: ModelConfig, dtype):
    shape = list(source.shape(key))
    index = tp.layout_index(name, model_cfg)
    axis, positions = (0, np.arange(shape[0])) if index is None else (index[0] % len(shape), index[1])
    shape[axis] = len(positions)

    def block(where: tuple[slice, ...]) -> np.ndarray:
        """The device's block: read the covering slice of the source, then lay it out."""
        wanted = positions[where[axis]]
        real = wanted[wanted >= 0]
        lo, hi = (int(real.min()), int(real.max()) + 1) if len(real) else (0, 1)
        region = list(where)
        region[axis] = slice(lo, hi)
        part = np.asarray(source.read(key, tuple(region)))
        return take_index(part, np.where(wanted >= 0, wanted - lo, -1), axis, xp=np).astype(dtype)

    sharding = tp.sharding(tp.spec(name, len(shape)))
    return jax.make_array_from_callback(tuple(shape), sharding, lambda where: block(_full(where, shape)))


def _full(where: tuple, shape: list[int]) -> tuple[slice, ...]:
    """make_array_from_callback's index with every slice's bounds filled in."""
    return tuple(slice(*s.indices(n)) for s, n in zip(where, shape))
