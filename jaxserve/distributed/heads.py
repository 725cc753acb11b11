"""Attention heads laid out for N tensor-parallel devices: each device gets the same number of
query heads and of KV heads, and every query head stays with the KV head it attends to.

Three cases, by the model's H query heads in Hkv groups of G = H / Hkv:
- Hkv divisible by N: nothing changes (device d holds groups d*Hkv/N ...).
- N divisible by Hkv (GQA with fewer KV heads than devices, e.g. one KV head on 4 devices): each
  KV head is replicated N / Hkv times (as tpu-inference does) and its group's query heads are
  split among the replicas; a group whose G does not split evenly gets zero query heads appended.
- neither (SmolLM2: 3 KV heads on 2 or 4 devices): dummy groups are appended — a zero KV head
  and G zero query heads — up to a multiple of N.
Padding is exact: a zero query head's scores are all 0, its values are zero (or its o rows are),
so it adds nothing to the output. It costs a device the padded heads' compute and KV memory.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig


class HeadPlan(NamedTuple):
    """Source head of each laid-out head (-1: a zero head), query and KV, in device order."""
    q_src: tuple[int, ...]
    kv_src: tuple[int, ...]

    @property
    def identity(self) -> bool:
        return self.q_src == tuple(range(len(self.q_src))) and self.kv_src == tuple(range(len(self.kv_src)))


def head_plan(num_heads: int, num_kv_heads: int, n: int) -> HeadPlan:
    group = num_heads // num_kv_heads
    if num_kv_heads % n == 0:
        return HeadPlan(tuple(range(num_heads)), tuple(range(num_kv_heads)))
    if n % num_kv_heads == 0:
        replicas = n // num_kv_heads
        padded_group = -(-group // replicas) * replicas
        q_src = [j * group + u if u < group else -1 for j in range(num_kv_heads) for u in range(padded_group)]
        kv_src = [j for j in range(num_kv_heads) for _ in range(replicas)]
        return HeadPlan(tuple(q_src), tuple(kv_src))
    kv_heads = -(-num_kv_heads // n) * n
    q_src = [h if h < num_heads else -1 for h in range(kv_heads * group)]
    kv_src = [j if j < num_kv_heads else -1 for j in range(kv_heads)]
    return HeadPlan(tuple(q_src), tuple(kv_src))


def padded_intermediate(size: int, n: int) -> int:
    return -(-size // n) * n


def laid_out_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """The model as the N devices hold it together (padded heads and MLP width)."""
    plan = head_plan(cfg.num_heads, cfg.num_kv_heads, n)
    return dataclasses.replace(cfg, num_heads=len(plan.q_src), num_kv_heads=len(plan.kv_src),
                               intermediate_size=padded_intermediate(cfg.intermediate_size, n))


def local_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """What one device's shard of a laid-out model looks like (cfg from laid_out_config)."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // n, num_kv_heads=cfg.num_kv_heads // n,
                               intermediate_size=cfg.intermediate_size // n)


def head_index(src: tuple[int, ...], head_dim: int) -> np.ndarray:
    """Source position of each laid-out position of a head axis (-1: a zero head's)."""
    return np.array([s * head_dim + i if s >= 0 else -1 for s in src for i in range(head_dim)])


def padded_index(size: int, padded: int) -> np.ndarray:
    """Source positions of an axis padded with zeros from size to padded (-1: padding)."""
    return np.where(np.arange(padded) < size, np.arange(padded), -1)


def take_index(w, index: np.ndarray, axis: int, xp=jnp):
    """w's positions `index` along axis; -1 gives zeros. xp: jax.numpy for params on the device,
    numpy on the host (adapters, distributed/lora_layout.py; slices read from files)."""
    out = xp.take(w, np.maximum(index, 0), axis=axis)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = len(index)
    return out * xp.asarray((index >= 0).reshape(shape), w.dtype)


def take_heads(w, src: tuple[int, ...], head_dim: int, axis: int, xp=jnp):
    """w's head blocks (head_dim wide along axis) in src order; -1 gives zeros."""
    return take_index(w, head_index(src, head_dim), axis, xp)


def pad_axis(w, size: int, axis: int, xp=jnp):
    pad = [(0, 0)] * w.ndim
    pad[axis % w.ndim] = (0, size - w.shape[axis])
    return xp.pad(w, pad)


def param_index(name: str, cfg: ModelConfig, n: int) -> tuple[int, np.ndarray] | None:
    """How one param (a layer weight by its key in params["layers"], or a top-level one) of the
    model in its own layout becomes the laid-out model's: (axis, source position of each laid-out
    position along it, -1 for zeros), or None when it is unchanged. Layer weights are stacked
    [L, in, out] (biases [L, out])."""
    plan = head_plan(cfg.num_heads, cfg.num_kv_heads, n)
    inter = padded_intermediate(cfg.intermediate_size, n)
    if name in ("q", "q_bias") and not plan.identity:
        return -1, head_index(plan.q_src, cfg.head_dim)
    if name in ("k", "v", "k_bias", "v_bias") and not plan.identity:
        return -1, head_index(plan.kv_src, cfg.head_dim)
    if name == "o" and not plan.identity:
        return 1, head_index(plan.q_src, cfg.head_dim)
    if name in ("gate", "up", "down") and inter != cfg.intermediate_size:
        return (1 if name == "down" else -1), padded_index(cfg.intermediate_size, inter)
    return None
