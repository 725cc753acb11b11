"""What an Engine loads at start-up from its EngineConfig: the model (config, params on the
device in the serving dtype, tokenizer, usable context length) and the unified pool's size."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.distributed import sharded_load
from jaxserve.distributed.tensor_parallel import TensorParallel
from jaxserve.lora.layout import slot_pages
from jaxserve.memory.pool import page_bytes
from jaxserve.model import random_weights, weights
from jaxserve.tokenizer import Tokenizer

CPU_POOL_BYTES_CAP = 1 << 30
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict                  # on the device in the serving dtype (split over tp's mesh if any)
    tokenizer: Tokenizer | None
    max_model_len: int
    dtype: object
    tp: TensorParallel | None = None  # tensor_parallel_size > 1: the mesh and the laid-out config


def resolve_dtype(dtype: str):
    if dtype == "auto":  # float32 where there is no accelerator, bfloat16 where there is
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(config: EngineConfig) -> LoadedModel:
    """Params arrive tensor by tensor; under tensor parallelism files are read straight into
    their shards (distributed/sharded_load.py)."""
    dtype = resolve_dtype(config.dtype)
    max_model_len = config.max_model_len
    path = None if random_weights.is_random(config.model) else weights.resolve_model(config.model)
    is_gguf = path is not None and path.suffix == ".gguf"
    if is_gguf:  # (its metadata is read once: ~1 s for SmolLM2's)
        hf_config, cached, gguf_model = weights.gguf_params_cache(path)
    else:
        hf_config = random_weights.random_config(config.model) if path is None else weights.read_config(path)
    cfg = ModelConfig.from_hf(hf_config)
    tp = TensorParallel.create(config.tensor_parallel_size, cfg) if config.tensor_parallel_size > 1 else None
    tokenizer = None
    if path is None:
        place = (lambda key, w: tp.place(key, w, cfg)) if tp else None
        params = weights.hf_to_params(cfg, random_weights.RandomTensors(cfg, dtype, config.seed), dtype, place)
    elif tp:
        source = sharded_load.CachedParams(cached) if is_gguf else sharded_load.HFParams(path, cfg)
        params = sharded_load.restore_params(tp, source, cfg, dtype)
    elif is_gguf:
        params = _cast(weights.read_params_cache(cached), dtype)
    else:
        params = weights.hf_to_params(cfg, weights.SafetensorsFolder(path), dtype)  # streamed: tensor by tensor, cast on the device
    if is_gguf:
        tokenizer = Tokenizer(gguf_model.tokenizer, gguf_model.chat_template, gguf_model.bos_token,
                              gguf_model.eos_token, cfg.eos_token_ids)
    elif path is not None:
        tokenizer = (Tokenizer.from_hf_folder(path, cfg.eos_token_ids)
                     if (path / "tokenizer.json").exists() else None)
        window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
        if window and (max_model_len is None or max_model_len > window):
            max_model_len = window  # full attention equals sliding-window attention up to the window
    limit = cfg.max_position_embeddings
    if max_model_len is None:
        max_model_len = min(limit, 2048)
    if max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len!r} is invalid for this model; allowed: 1..{limit}")
    return LoadedModel(cfg, params, tokenizer, max_model_len, dtype, tp)


def _cast(params: dict, dtype) -> dict:
    """A loaded params tree cast to dtype, one leaf at a time, each source leaf dropped as soon as
    it is converted."""
    out = {}
    for key in list(params):
        if key == "layers":
            layers = params.pop("layers")
            out["layers"] = {name: jnp.asarray(layers.pop(name), dtype) for name in list(layers)}
        else:
            out[key] = jnp.asarray(params.pop(key), dtype)
    return out


def pool_pages(config: EngineConfig, model: LoadedModel, row_width: int | None = None) -> int:
    """The unified pool's pages: num_pool_pages if given, else pool_bytes, else
    gpu_memory_utilization of an accelerator's free memory, else (CPU) room for 2 x max_num_seqs
    sequences of max_model_len tokens, capped at 1 GiB. Bytes are per device: row_width is one
    device's part of a pool row (under tensor parallelism; default the model's kv_size)."""
    cfg = model.config
    per_page = page_bytes(cfg.num_layers, config.page_size, row_width or cfg.kv_size, model.dtype)
    if config.num_pool_pages is not None:
        return config.num_pool_pages
    pool_bytes = config.pool_bytes
    if pool_bytes is None:
        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and "bytes_limit" in stats:
            pool_bytes = int(stats["bytes_limit"] * config.gpu_memory_utilization) - stats.get("bytes_in_use", 0)
        else:
            pages_per_seq = -(-model.max_model_len // config.page_size)
            pool_bytes = min(CPU_POOL_BYTES_CAP, 2 * config.max_num_seqs * pages_per_seq * per_page)
    if pool_bytes < per_page:
        raise ValueError(f"pool_bytes={pool_bytes!r} is invalid; allowed: at least one page ({per_page} bytes "
                         f"for this model and page_size)")
    return pool_bytes // per_page


def adapter_region(config: EngineConfig, model: LoadedModel, num_pages: int) -> int | None:
    """Pages set apart for adapters: None for the unified pool; for the separate-memory baselines
    adapter_region_pages, by default max_loras slots of the largest adapter (vLLM's sizing)."""
    if config.adapter_memory == "unified":
        return None
    slot = slot_pages(model.config, config.max_lora_rank, config.lora_modules, config.page_size)
    region = config.adapter_region_pages or config.max_loras * slot
    if region >= num_pages:
        source = ("adapter_region_pages" if config.adapter_region_pages
                  else f"max_loras={config.max_loras} slots of {slot} pages")
        raise ValueError(f"adapter_memory={config.adapter_memory!r} sets {region} pages apart for adapters "
                         f"({source}) but the pool has {num_pages}; allowed: fewer than the pool's pages (a "
                         f"larger pool, fewer max_loras or a smaller adapter_region_pages)")
    return region
