"""A pure-functional Llama-family forward (Llama 2/3, Mistral, Qwen2, SmolLM2).

One call processes one flat ragged batch: prefill chunks and decode tokens of different sequences
side by side. Every token attends to its own sequence's cached pages plus the batch's new keys of
its sequence up to its position; the new keys and values of all layers are written into the pool
after the last layer, so the pool is read-only inside the layer loop (reading a buffer that the
loop also updates in place makes XLA copy all of it, every layer). Attention and LoRA go through
jaxserve.pallas.ops, so kernels can be swapped without touching this file.

params (a pytree; layer weights stacked on a leading axis so the layers run under lax.scan):
  embed [V, H], final_norm [H], lm_head [H, V] (absent when tied to embed),
  layers: attn_norm, mlp_norm [L, H]; q [L, H, Hq*D], k, v [L, H, Hkv*D], o [L, Hq*D, H];
          q_bias, k_bias, v_bias (Qwen2 only); gate, up [L, H, I], down [L, I, H]
pool: the unified page pool [L, 2, num_pages, page_size, Hkv*D]. A KV page holds keys in half 0
  and values in half 1; page p is the same page in every layer, so one page id holds a sequence's
  slice of KV for all layers. Adapter pages hold LoRA rank-rows (jaxserve/lora/layout.py).
lora (optional): {module: {"a_rows", "b_rows", "rank", "b_rank"}} (lora/layout.split_tables) for the n
  adapters active in the batch, holding only the modules (of config.LORA_MODULES) some active
  adapter adapts; batch.lora_ids picks one per token (-1: none).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.pallas import ops
from jaxserve.pallas.plan import StepPlan


# Projections whose input is split over tensor-parallel devices (their outputs are partial sums).
ROW_PARALLEL = ("o", "down")


class Batch(NamedTuple):
    """One flat ragged batch (all int32). T tokens, S sequences, N logits rows."""
    token_ids: jax.Array       # [T]
    positions: jax.Array       # [T]
    token_seq: jax.Array       # [T] row of page_tables each token belongs to
    slot_mapping: jax.Array    # [T] flat cache slot (page * page_size + offset) to write; -1: padding
    page_tables: jax.Array     # [S, max_pages]
    lora_ids: jax.Array        # [T] index of the token's adapter among the active ones, -1: none
    logits_indices: jax.Array  # [N] tokens whose next-token logits are wanted
    prev_rows: jax.Array       # [T] row of prev_tokens holding this token (sampled by the step
                               #     still in flight), -1: token_ids has it
    cached_lens: jax.Array     # [T] tokens of its sequence already in the pool (= its chunk's start)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies with HF's rope_scaling rules (llama3, linear), in float64."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """HF-style (rotate-half) rotary embedding. x: [T, heads, D]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]      # [T, D/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def forward(params, pool, batch: Batch, prev_tokens, cfg: ModelConfig, lora=None, kernels: str = ops.DEFAULT,
            plan: StepPlan = StepPlan(), num_logits: int | None = None, tp_axis: str | None = None,
            tp_lora: str = "s-lora"):
    """Returns (logits [num_logits, V] float32, updated pool). Jit with cfg/kernels/plan/num_logits
    static, pool donated. prev_tokens are the previous step's sampled tokens, still on the device:
    decode tokens can be fed from them before the host has seen them (the engine's async overlap).
    The kernel backend's per-step metadata is prepared once here, outside the layer loop; `plan`
    carries the runner's static choices for it (LoRA tiles, attention segments). Logits are
    computed for the first num_logits entries of batch.logits_indices (all by default).
    Under tensor parallelism (inside shard_map over tp_axis) params and pool are one device's
    shards and cfg its local config: o and down then hold partial sums, all-reduced here; tp_lora
    names the adapters' scheme (distributed/lora_layout.py)."""
    op = ops.get_ops(kernels)
    meta = op.prepare(batch, lora, pool, plan)
    num_tokens = batch.token_ids.shape[0]
    page_size = pool.shape[3]
    num_slots = pool.shape[2] * page_size
    write_slot = jnp.where(batch.slot_mapping >= 0, batch.slot_mapping, num_slots)
    write_page, write_offset = write_slot // page_size, write_slot % page_size
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    scale = 1.0 / math.sqrt(cfg.head_dim)

    def layer(h, inputs):
        index, w = inputs

        def proj(x, *names):  # weights are keyed "q", LoRA modules "q_proj" (PEFT's names)
            ys = [jnp.dot(x, w[name], preferred_element_type=jnp.float32) for name in names]
            adapted = [i for i, name in enumerate(names) if lora is not None and name + "_proj" in lora]
            if adapted and tp_axis is not None:
                ys = _tp_lora(ys, x, names, adapted, pool, index, meta, op, tp_axis, h.shape[-1], tp_lora)
            elif adapted:  # projections of one input share the LoRA op (one shrink for all)
                deltas = op.lora_deltas(x, pool, index, meta, tuple(names[i] + "_proj" for i in adapted),
                                        tuple(ys[i].shape[-1] for i in adapted))
                for i, delta in zip(adapted, deltas):
                    ys[i] = ys[i] + delta
            if tp_axis is not None and names[0] in ROW_PARALLEL:  # summed in float32, then cast
                ys = [jax.lax.psum(y, tp_axis) for y in ys]
            return [y.astype(x.dtype) for y in ys]

        x = rms_norm(h, w["attn_norm"], cfg.rms_norm_eps)
        q, k, v = proj(x, "q", "k", "v")
        if cfg.attention_bias:
            q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
        q = apply_rope(q.reshape(num_tokens, cfg.num_heads, cfg.head_dim), batch.positions, inv_freq)
        k = apply_rope(k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim), batch.positions, inv_freq)
        # Stored in the pool's dtype: attend to exactly what later steps will read back.
        k = k.reshape(num_tokens, cfg.kv_size).astype(pool.dtype)
        # A sequence whose forward overflowed (NaN/inf) must not reach the others: attention
        # weighs masked keys' values by 0, and 0 x NaN is NaN. (Its own logits stay non-finite:
        # the engine finishes it with an error.) Non-finite keys are masked out as scores.
        v = jnp.where(jnp.isfinite(v), v, 0).astype(pool.dtype)
        attn = op.paged_attention(q, k, v, pool, index, meta, scale)
        h = h + proj(attn.reshape(num_tokens, cfg.q_size), "o")[0]
        x = rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps)
        gate, up = proj(x, "gate", "up")
        gated = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
        h = h + proj(gated.astype(x.dtype), "down")[0]
        return h, (k, v)

    token_ids = jnp.where(batch.prev_rows >= 0, prev_tokens[jnp.maximum(batch.prev_rows, 0)], batch.token_ids)
    # Under TP the vocabulary may be split: each device holds a slice of the embedding's rows
    # (and of lm_head's columns), padded to a multiple of the devices.
    vocab_split = tp_axis is not None and params["embed"].shape[0] != cfg.vocab_size
    h = _embed_split(params["embed"], token_ids, tp_axis) if vocab_split else params["embed"][token_ids]
    layer_ids = jnp.arange(cfg.num_layers)
    h, (k_all, v_all) = jax.lax.scan(layer, h, (layer_ids, params["layers"]))       # [L, T, kv] each
    # Padding tokens (slot -1) write out of bounds, which mode="drop" discards.
    pool = pool.at[:, 0, write_page, write_offset].set(k_all, mode="drop")
    pool = pool.at[:, 1, write_page, write_offset].set(v_all, mode="drop")
    h = rms_norm(h[batch.logits_indices[:num_logits]], params["final_norm"], cfg.rms_norm_eps)
    lm_head = params["lm_head"] if "lm_head" in params else params["embed"].T
    logits = jnp.dot(h, lm_head, preferred_element_type=jnp.float32)
    if vocab_split:  # each device has its slice of the vocabulary's logits: gather, drop the padding
        logits = jax.lax.all_gather(logits, tp_axis, axis=1, tiled=True)[:, :cfg.vocab_size]
    return logits, pool


def _tp_lora(ys, x, names, adapted, pool, layer, meta, op, axis: str, hidden: int, scheme: str):
    """LoRA under tensor parallelism (distributed/lora_layout.py stores the adapters). Under
    "s-lora", S-LoRA's scheme: column-parallel modules (q/k/v, gate/up: x replicated) hold a
    share of A's rank-rows over all inputs and their output columns of every B^T row; the
    [T, r / N] shrinks are all-gathered and the expand gives the device's output columns.
    Row-parallel modules (o, down: x split by inputs) hold their input rows of A and output
    columns of B^T; the [T, r] partial shrinks are all-reduced, and the device's output slice
    goes into the base partial sum, so it rides the base all-reduce. One collective per LoRA op:
    modules that share x share it. Under "vllm" (A whole for column modules, B^T whole for row
    ones) nothing is communicated: a row module's full-width partial output rides the base
    all-reduce."""
    n, d = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    row = names[0] in ROW_PARALLEL
    widths = tuple(ys[i].shape[-1] for i in adapted)
    if scheme == "s-lora" and row:
        widths = (hidden // n,) * len(adapted)
    deltas = op.lora_deltas(x, pool, layer, meta, tuple(names[i] + "_proj" for i in adapted), widths,
                            combine_shrink=_shrink_collective(scheme, row, axis))
    ys = list(ys)
    for i, delta in zip(adapted, deltas):
        if delta.shape[-1] != ys[i].shape[-1]:  # a row module's slice of the hidden outputs, zeros elsewhere
            delta = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(ys[i]), delta, d * (hidden // n), axis=1)
        ys[i] = ys[i] + delta
    return ys


def _shrink_collective(scheme: str, row: bool, axis: str):
    """The shrink's collective (the backends' combine_shrink: [..., r] -> [..., K, r])."""
    if scheme == "vllm":
        return None
    if row:  # the partial sums over the input slices: [..., 1, r]
        return lambda s: jax.lax.psum(s, axis)[..., None, :]
    return lambda s: jax.lax.all_gather(s, axis, axis=s.ndim - 1)  # every device's rank share: [..., N, r / N]


def _embed_split(embed, token_ids, axis: str):
    """Rows of a vocabulary-split embedding: the device holding a token's row gives it, the
    others zeros, summed over the devices (one all-reduce of [T, hidden])."""
    rows = embed.shape[0]
    local = token_ids - jax.lax.axis_index(axis) * rows
    mine = (local >= 0) & (local < rows)
    h = jnp.where(mine[:, None], embed[jnp.clip(local, 0, rows - 1)], 0)
    return jax.lax.psum(h, axis)
