"""An adapter merged into the base weights, W' = W + A^T B (scaling folded into B): the way
PEFT's users serve one fine-tune (merge_and_unload), kept as the `merged` benchmark baseline —
one adapter at a time, every request of a batch on it, a merge at each switch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.lora.peft import PeftAdapter


def stacked_factors(adapter: PeftAdapter, cfg: ModelConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per adapted module, A [L, r, in] and B^T [L, r, out] over every layer (a layer the adapter
    leaves alone, or a lower rank there, is zero rows)."""
    factors = {}
    for module in adapter.target_modules:
        fan_in, fan_out = cfg.module_shape(module)
        rank = max(w.rank for (_, m), w in adapter.weights.items() if m == module)
        a = np.zeros((cfg.num_layers, rank, fan_in), np.float32)
        b = np.zeros((cfg.num_layers, rank, fan_out), np.float32)
        for (layer, m), w in adapter.weights.items():
            if m == module:
                a[layer, :w.rank], b[layer, :w.rank] = w.a, w.b
        factors[module.removesuffix("_proj")] = (a, b)  # params are keyed "q", PEFT's modules "q_proj"
    return factors


@jax.jit
def _merged_layers(layers: dict, factors: dict) -> dict:
    merged = dict(layers)
    for name, (a, b) in factors.items():
        w = layers[name]
        merged[name] = (w.astype(jnp.float32) + jnp.einsum("lri,lro->lio", a, b)).astype(w.dtype)
    return merged


def merge_adapter(params: dict, adapter: PeftAdapter | None, cfg: ModelConfig) -> dict:
    """The params with the adapter merged in (new arrays for the adapted projections; `params`
    is left as it is, so the base stays for the next switch). None: the base itself."""
    if adapter is None:
        return params
    return {**params, "layers": _merged_layers(params["layers"], stacked_factors(adapter, cfg))}
