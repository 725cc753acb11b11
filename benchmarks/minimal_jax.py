"""A bare jitted greedy generator over jaxserve's params: the floor the engine's overhead is judged
against (benchmarks/throughput.py). No engine, no pages, no adapters, no sampler options.

Dense KV cache [L, 2, B, max_len, kv_heads * head_dim]; prompts right-padded in a batch of B rows,
each row with its own length: prefill is one jitted call over [B, P] (causal within the row's
real tokens), then a jitted decode step per token (cache donated: written in place). Rows keep
their own positions, so a row's numerics do not depend on its neighbours' lengths.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model.llama import apply_rope, rms_norm, rope_inv_freq


def _dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _qkv(x, w, cfg: ModelConfig):
    q, k, v = _dot(x, w["q"]), _dot(x, w["k"]), _dot(x, w["v"])
    if cfg.attention_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    return q, k, v


def _mlp_out(h, attn, w, cfg: ModelConfig):
    h = h + _dot(attn, w["o"])
    x = rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps)
    gated = jax.nn.silu(_dot(x, w["gate"]).astype(jnp.float32)) * _dot(x, w["up"]).astype(jnp.float32)
    return h + _dot(gated.astype(x.dtype), w["down"])


def _attend(q, keys, values, mask, cfg: ModelConfig):
    """q [B, T, Hq, D]; keys/values [B, S, Hkv, D]; mask [B, T, S] -> [B, T, Hq * D]. GQA: the
    query heads of a group share one KV head."""
    b, t = q.shape[:2]
    group = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, group, cfg.head_dim).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(jnp.float32)) / math.sqrt(cfg.head_dim)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(jnp.float32))
    return out.reshape(b, t, cfg.q_size).astype(keys.dtype)


def _logits(params, h, cfg: ModelConfig):
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    lm_head = params["lm_head"] if "lm_head" in params else params["embed"].T
    return jnp.dot(h, lm_head, preferred_element_type=jnp.float32)


@partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def prefill(params, cache, tokens, lens, *, cfg: ModelConfig):
    """tokens [B, P] right-padded, lens [B] -> (first greedy token [B], cache with KV at 0..P-1)."""
    b, p = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(p), (b, p))
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    # Causal, and padding keys never seen by real queries (padding queries' outputs are unused).
    mask = (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] < lens[:, None, None])

    def layer(h, w):
        x = rms_norm(h, w["attn_norm"], cfg.rms_norm_eps)
        q, k, v = _qkv(x, w, cfg)
        q = jax.vmap(apply_rope, (0, 0, None))(q.reshape(b, p, cfg.num_heads, cfg.head_dim), pos, inv_freq)
        k = jax.vmap(apply_rope, (0, 0, None))(k.reshape(b, p, cfg.num_kv_heads, cfg.head_dim), pos, inv_freq)
        attn = _attend(q, k, v.reshape(k.shape), mask, cfg)
        return _mlp_out(h, attn, w, cfg), (k.reshape(b, p, cfg.kv_size), v)

    h, (k_all, v_all) = jax.lax.scan(layer, params["embed"][tokens], params["layers"])   # [L, B, P, kv]
    cache = jax.lax.dynamic_update_slice(cache, jnp.stack([k_all, v_all], 1).astype(cache.dtype), (0,) * 5)
    last = h[jnp.arange(b), lens - 1]
    return jnp.argmax(_logits(params, last, cfg), -1).astype(jnp.int32), cache


@partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def decode_step(params, cache, tokens, pos, *, cfg: ModelConfig):
    """tokens [B] at positions pos [B] -> (next greedy tokens [B], cache with their KV written).
    Inside the layer loop the cache is only read (keys < pos) and the new key is attended
    separately; all layers' new KV are written after the loop, so XLA updates the donated cache in
    place instead of copying it every layer."""
    b, max_len = tokens.shape[0], cache.shape[3]
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    mask = jnp.concatenate([jnp.arange(max_len)[None, :] < pos[:, None], jnp.ones((b, 1), bool)], 1)[:, None]

    def layer(h, inputs):
        w, layer_cache = inputs                                  # layer_cache [2, B, S, kv]
        x = rms_norm(h, w["attn_norm"], cfg.rms_norm_eps)
        q, k, v = _qkv(x, w, cfg)
        q = apply_rope(q.reshape(b, cfg.num_heads, cfg.head_dim), pos, inv_freq)
        k = apply_rope(k.reshape(b, cfg.num_kv_heads, cfg.head_dim), pos, inv_freq).reshape(b, cfg.kv_size)
        shape = (b, max_len + 1, cfg.num_kv_heads, cfg.head_dim)
        keys = jnp.concatenate([layer_cache[0], k[:, None].astype(cache.dtype)], 1).reshape(shape)
        values = jnp.concatenate([layer_cache[1], v[:, None].astype(cache.dtype)], 1).reshape(shape)
        attn = _attend(q[:, None], keys, values, mask, cfg)[:, 0]
        return _mlp_out(h, attn, w, cfg), (k, v)

    h, (k_all, v_all) = jax.lax.scan(layer, params["embed"][tokens], (params["layers"], cache))
    rows = jnp.arange(b)
    cache = cache.at[:, 0, rows, pos].set(k_all.astype(cache.dtype))
    cache = cache.at[:, 1, rows, pos].set(v_all.astype(cache.dtype))
    return jnp.argmax(_logits(params, h, cfg), -1).astype(jnp.int32), cache


def generate_batch(params, cfg: ModelConfig, prompts: list[list[int]], batch: int, prompt_len: int,
                   output_len: int) -> np.ndarray:
    """Greedy tokens [len(prompts), output_len] for up to `batch` prompts (padded to `batch` rows
    and `prompt_len` columns, so every call shares one compiled shape)."""
    n = len(prompts)
    tokens = np.zeros((batch, prompt_len), np.int32)
    lens = np.ones(batch, np.int32)                              # dummy rows: one token
    for i, ids in enumerate(prompts):
        tokens[i, :len(ids)], lens[i] = ids, len(ids)
    dtype = params["embed"].dtype
    cache = jnp.zeros((cfg.num_layers, 2, batch, prompt_len + output_len, cfg.kv_size), dtype)
    token, cache = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lens), cfg=cfg)
    pos, out = jnp.asarray(lens), [token]
    for _ in range(output_len - 1):                               # dispatched asynchronously
        token, cache = decode_step(params, cache, token, pos, cfg=cfg)
        pos = pos + 1
        out.append(token)
    return np.asarray(jnp.stack(out, 1))[:n]


def generate(params, cfg: ModelConfig, prompts: list[list[int]], batch: int, prompt_len: int,
             output_len: int) -> np.ndarray:
    """All prompts, `batch` at a time, in order."""
    return np.concatenate([generate_batch(params, cfg, prompts[i:i + batch], batch, prompt_len, output_len)
                           for i in range(0, len(prompts), batch)])
