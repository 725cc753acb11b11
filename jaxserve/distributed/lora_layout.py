"""Adapters under tensor parallelism: where each device's part of an adapter sits in the split
pool. Every rank-row is split by features over the N devices — A by its inputs, B^T by its
outputs, slice d on device d — so each device holds 1/N of every resident adapter, in its slice
of the same pool pages (one page list, one free list). Column-parallel modules' B slices are
exactly the device's output columns; row-parallel modules' A slices its input rows; the shrink
over an input slice is a partial sum, all-reduced in the model (llama._tp_lora).

On one device the layout is jaxserve/lora/layout.py's for `lora_view(cfg, n)`: the laid-out model
with every LoRA fan-in and fan-out divided by N and the pool row of one device; the pages of the
N devices' packs are concatenated along the row, which the split pool array hands back out.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.distributed.heads import head_plan, pad_axis, padded_intermediate, take_heads
from jaxserve.lora.layout import AdapterLayout, pack_rows
from jaxserve.lora.peft import LoRAWeights, PeftAdapter


def lora_view(laid_out: ModelConfig, n: int) -> ModelConfig:
    """The shapes one device's adapter slices have (module_shape: fan-in and fan-out / N; kv_size:
    its part of a pool row). Needs the hidden size divisible by N."""
    return dataclasses.replace(laid_out, hidden_size=laid_out.hidden_size // n, num_heads=laid_out.num_heads // n,
                               num_kv_heads=laid_out.num_kv_heads // n,
                               intermediate_size=laid_out.intermediate_size // n)


def _heads(m: np.ndarray, src: tuple[int, ...], head_dim: int) -> np.ndarray:
    return take_heads(m, src, head_dim, axis=1, xp=np)


def _pad(m: np.ndarray, width: int) -> np.ndarray:
    return pad_axis(m, width, axis=1, xp=np)


def lay_out_adapter(adapter: PeftAdapter, cfg: ModelConfig, n: int) -> PeftAdapter:
    """The adapter's factors in the laid-out model's feature order (heads.py's head plan, the
    MLP padded): q/k/v's B by the query / KV head plan, o's A by the query plan, gate/up's B and
    down's A padded with zeros."""
    plan = head_plan(cfg.num_heads, cfg.num_kv_heads, n)
    inter, d = padded_intermediate(cfg.intermediate_size, n), cfg.head_dim
    weights = {}
    for key, w in adapter.weights.items():
        a, b = w.a, w.b
        module = key[1]
        if module == "q_proj":
            b = _heads(b, plan.q_src, d)
        elif module in ("k_proj", "v_proj"):
            b = _heads(b, plan.kv_src, d)
        elif module == "o_proj":
            a = _heads(a, plan.q_src, d)
        elif module in ("gate_proj", "up_proj"):
            b = _pad(b, inter)
        elif module == "down_proj":
            a = _pad(a, inter)
        weights[key] = LoRAWeights(a, b, w.scaling)
    return dataclasses.replace(adapter, weights=weights)


def device_slice(adapter: PeftAdapter, d: int, n: int) -> PeftAdapter:
    """Device d's part: slice d of every rank-row's features, A's and B^T's."""
    def part(m):
        width = m.shape[1] // n
        return m[:, d * width:(d + 1) * width]
    weights = {key: LoRAWeights(part(w.a), part(w.b), w.scaling) for key, w in adapter.weights.items()}
    return dataclasses.replace(adapter, weights=weights)


def pack_split(adapter: PeftAdapter, layout: AdapterLayout, view: ModelConfig, page_size: int, dtype, *,
               model_cfg: ModelConfig, n: int) -> np.ndarray:
    """The adapter's pages for the split pool, [L, 2, pages, page_size, N x view.kv_size]: each
    device's pack (layout.py's, on the view) side by side along the row."""
    laid_out = lay_out_adapter(adapter, model_cfg, n)
    return np.concatenate([pack_rows(device_slice(laid_out, d, n), layout, view, page_size, dtype)
                           for d in range(n)], axis=-1)
