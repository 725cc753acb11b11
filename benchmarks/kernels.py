"""Kernel micro-benchmarks: paged decode attention and multi-LoRA, against their baselines.

    python benchmarks/kernels.py [--quick] [--batch 64] [--contexts 512,2048,8192]
                                 [--adapters 1,64,1000] [--pages-per-split 8,16,32] [--repeats N]
                                 [--parts attention,lora] [--copy-mib 2048] [--dtype bfloat16]
                                 [--lower-only] [--json PATH]
    (or: jaxserve bench kernels ...)

Attention. Decode: one query token per sequence, cached_len = context (the only fresh key is the
query's own), page size 16, random page tables (a permutation of the pool), Llama-7B heads (32 q /
32 kv, head_dim 128) and a GQA case (32 q / 8 kv). Timed: jaxserve's Pallas kernel (a few
pages_per_split values), the XLA reference (reference.paged_attention, the spec), jax's own
`jax.experimental.pallas.ops.gpu.paged_attention` (its [kv_heads, pages, page_size, head_dim]
layout, q pre-scaled; converted outside the timed region) and cuDNN attention over a dense
gathered KV (`jax.nn.dot_product_attention(implementation="cudnn")`; gathered outside the timed
region). Figures: median time, effective KV bandwidth = 2 * batch * context * kv_heads * head_dim
* itemsize / time, and its fraction of the measured copy bandwidth (a jitted `x + 1` over a large
buffer: (read + write bytes) / time). Target: >= 1.8 TB/s at batch 64, context >= 2k, bf16, H100.

Multi-LoRA. One Llama-7B-shaped decode layer (hidden 4096, intermediate 11008, 32 x 128 heads) at
batch 64: the seven projections q/k/v/o/gate/up/down with residual adds and SiLU, attention
EXCLUDED (o_proj reads q in its place; attention is the first part). Adapters of ranks drawn from
{8, 16, 32, 64} on all seven modules, their rank-rows placed in random pages of a unified pool
exactly as the engine lays them out (jaxserve.lora.layout: plan_layout / local_rows / pool_rows /
split_tables; pool row width = kv_heads * head_dim), the pool also holding other (KV) pages. Each
token uses a random adapter (uniform, with replacement; a random distinct set when there are more
adapters than tokens: with 1,000 adapters at batch 64, 64 distinct ones). Timed: the base layer alone, and base + LoRA through
jaxserve's Pallas kernels (lora.lora_delta, which picks MBGMV at T <= 32 and SGMV above, and the
other variant forced), reference.lora_delta, and a padded batched-matmul baseline (S-LoRA's "bmm":
every active adapter padded to the largest rank in dense [n, R, in] / [n, R, out] stacks built
outside the timed region, gathered per token, einsum). Figures: added time over the base layer (ms,
% of base) and the bandwidth floor: the distinct adapters' weight bytes as a % of the base
weights' bytes. Target: 1,000 adapters at batch 64 add <= 15% and beat the padded baseline.

Every kernel's result is checked against the reference (max |diff| printed). Times: each impl is
compiled ahead of time (compile seconds reported), warmed up, then --repeats runs of `inner`
back-to-back calls ending in block_until_ready; the median per call is reported.

On CPU (jax.default_backend() == "cpu") everything shrinks (batch 4, contexts 64/256, hidden 256,
a few adapters, float32) and the Pallas kernels run in interpret mode: a correctness smoke of the
whole script, not performance. --lower-only instead builds the GPU-sized configuration as shapes
only and lowers every compiled-GPU impl for CUDA (jax.export), running nothing: a CPU check that a
GPU run will not fail to build.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated", category=DeprecationWarning)

PAGE_SIZE = 16
LORA_RANKS = (8, 16, 32, 64)
MAX_LORA_RANK = 64   # the engine's max_lora_rank: R of the row tables
RANDOM_PIECE = 1 << 28  # elements per jax.random call when generating a large input
# (name, q heads, kv heads, head_dim); CPU sizes keep the group sizes (1 and 4).
GPU_HEADS = [("MHA 32/32", 32, 32, 128), ("GQA 32/8", 32, 8, 128)]
CPU_HEADS = [("MHA 4/4", 4, 4, 64), ("GQA 8/2", 8, 2, 64)]
GPU_LAYER = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128)
CPU_LAYER = dict(hidden=256, intermediate=688, heads=4, kv_heads=4, head_dim=64)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# ---------------------------------------------------------------------------------------------
# Running, timing, lowering
# ---------------------------------------------------------------------------------------------

class Bench:
    """How impls are built and timed in this run: compiled and timed, or (lower_only) traced with
    shapes only and lowered for CUDA."""

    def __init__(self, repeats: int, lower_only: bool, on_cpu: bool):
        self.repeats, self.lower_only, self.on_cpu = repeats, lower_only, on_cpu

    def make(self, fn, *args):
        """Input data: computed on the device (jitted), or only its shapes in lower-only mode."""
        import jax
        return jax.eval_shape(fn, *args) if self.lower_only else jax.jit(fn)(*args)

    def normal(self, seed, *specs):
        """Random inputs, one per (shape, dtype, scale): numpy on CPU (an XLA-compiled PRNG costs
        about a second of CPU compile per shape), jax.random on an accelerator (a multi-GiB pool is
        generated in place), shapes only in lower-only mode."""
        import jax
        import jax.numpy as jnp
        if self.lower_only:
            return [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _ in specs]
        if self.on_cpu:
            rng = np.random.default_rng(seed)
            return [jnp.asarray(rng.standard_normal(shape, np.float32) * scale, dtype) for shape, dtype, scale in specs]
        def gen(key, shape, dtype, scale):
            # A multi-GiB pool (2^32 elements at batch 64 x 8k context, 32 kv heads) is generated
            # in pieces of at most 2^28 elements along its longest axis, concatenated in place.
            axis = int(np.argmax(shape))
            pieces = min(shape[axis], -(-math.prod(shape) // RANDOM_PIECE))
            bounds = np.linspace(0, shape[axis], pieces + 1).astype(int)
            parts = [jax.random.normal(k, (*shape[:axis], int(hi - lo), *shape[axis + 1:]), dtype)
                     for k, lo, hi in zip(jax.random.split(key, pieces), bounds[:-1], bounds[1:])]
            out = parts[0] if pieces == 1 else jnp.concatenate(parts, axis=axis)
            return out * jnp.asarray(scale, dtype)
        keys = jax.random.split(jax.random.key(seed), len(specs))
        return [jax.jit(functools.partial(gen, shape=tuple(shape), dtype=dtype, scale=scale))(k)
                for k, (shape, dtype, scale) in zip(keys, specs)]

    def run(self, fn, args) -> dict:
        """Compile fn(*args) and time it; returns {ms, compile_s, inner, out} (out: one result).
        Lower-only: export for CUDA instead; returns {lowered: True}."""
        import jax
        if self.lower_only:
            start = time.perf_counter()
            skip = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
            jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=skip)(*args)
            return {"lowered": True, "compile_s": time.perf_counter() - start}
        args = jax.device_put(args)  # numpy tables too: no host-to-device copy inside the timing
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
        out = jax.block_until_ready(compiled(*args))        # warm-up
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        estimate = time.perf_counter() - start
        # Back-to-back calls hide the host's dispatch cost behind the device's work (~20 ms runs).
        inner = 1 if self.on_cpu else max(1, min(200, int(0.02 / max(estimate, 1e-6))))
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            jax.block_until_ready([compiled(*args) for _ in range(inner)])
            times.append((time.perf_counter() - start) / inner)
        return {"ms": 1e3 * statistics.median(times), "compile_s": compile_s, "inner": inner, "out": out}

    def attempt(self, fn, args) -> dict:
        """run(), but a failure becomes a printed skip reason instead of ending the benchmark."""
        try:
            return self.run(fn, args)
        except Exception as e:  # noqa: BLE001 - a GPU-only impl may fail in many ways
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            return {"skipped": reason}


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def free(*arrays):
    for a in arrays:
        if hasattr(a, "delete") and not getattr(a, "is_deleted", lambda: True)():
            a.delete()
    gc.collect()


def copy_bandwidth(bench: Bench, nbytes: int, dtype) -> dict:
    """Device copy bandwidth: a jitted x + 1 reads and writes nbytes each; (2 * nbytes) / time."""
    import jax.numpy as jnp
    n = nbytes // jnp.dtype(dtype).itemsize
    x = jnp.ones((n // 4096, 4096), dtype)
    r = bench.run(lambda x: x + jnp.asarray(1, dtype), (x,))
    free(x, r.pop("out"))
    return {"bytes": int(nbytes), "ms": r["ms"], "tb_per_s": 2 * nbytes / (r["ms"] * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------
# Paged decode attention
# ---------------------------------------------------------------------------------------------

def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def attention_case(bench: Bench, batch, context, heads, kv_heads, head_dim, dtype, pps_list, interpret, seed):
    """All impls at one shape; returns rows of figures."""
    import jax
    import jax.numpy as jnp
    from jaxserve.pallas import paged_attention as pa
    from jaxserve.pallas import reference

    pages_per_seq = context // PAGE_SIZE
    num_pages = batch * pages_per_seq
    width = kv_heads * head_dim
    scale = head_dim ** -0.5
    rng = np.random.default_rng(seed)
    tables = rng.permutation(num_pages).astype(np.int32).reshape(batch, pages_per_seq)
    pool, q, k_new, v_new = bench.normal(seed, ((1, 2, num_pages, PAGE_SIZE, width), dtype, 1.0),
                                         ((batch, heads, head_dim), dtype, 1.0), ((batch, width), dtype, 1.0),
                                         ((batch, width), dtype, 1.0))
    meta = dict(page_tables=tables, token_seq=np.arange(batch, dtype=np.int32),
                positions=np.full(batch, context, np.int32), cached_lens=np.full(batch, context, np.int32),
                valid=np.ones(batch, bool))
    meta_args = (meta["page_tables"], meta["token_seq"], meta["positions"], meta["cached_lens"], meta["valid"])
    kv_bytes = 2 * batch * context * kv_heads * head_dim * jnp.dtype(dtype).itemsize
    rows, results = [], {}

    def record(impl, r, want=None, note=""):
        row = {"impl": impl, "batch": batch, "context": context, "heads": heads, "kv_heads": kv_heads,
               "head_dim": head_dim, "kv_bytes": kv_bytes, "note": note}
        if "skipped" in r:
            row["skipped"] = r["skipped"]
        elif "lowered" in r:
            row["lowered"], row["compile_s"] = True, r["compile_s"]
        else:
            row.update(ms=r["ms"], compile_s=r["compile_s"], inner=r["inner"],
                       tb_per_s=kv_bytes / (r["ms"] * 1e-3) / 1e12)
            if want is not None:
                row["max_abs_diff"] = max_diff(r["out"], want)
            results[impl] = r.pop("out")
        rows.append(row)

    # The spec: the XLA reference over the engine's calling convention.
    ref_fn = lambda pool, q, kn, vn, *m: reference.paged_attention(q, kn, vn, pool, 0, *m, scale)  # noqa: E731
    args = (pool, q, k_new, v_new, *meta_args)
    record("xla reference", bench.attempt(ref_fn, args))
    want = results.get("xla reference")

    for pps in pps_list:
        fn = lambda pool, q, kn, vn, *m, pps=pps: pa.paged_attention(  # noqa: E731
            q, kn, vn, pool, jnp.int32(0), *m, scale, interpret=interpret, pages_per_split=pps)
        splits = -(-pages_per_seq // pps)
        record(f"jaxserve pallas pps={pps}", bench.attempt(fn, args), want,
               note=f"{splits}+1 splits" + (" (interpret)" if interpret else ""))
        results.pop(f"jaxserve pallas pps={pps}", None)

    # The baselines read keys 0..context-1 from their own layouts and have no fresh keys: their
    # spec is the reference with the last cached key passed as the "fresh" one.
    shifted = None
    if want is not None:
        last = (context - 1) // PAGE_SIZE, (context - 1) % PAGE_SIZE
        p_last = tables[:, last[0]]
        try:
            shifted = jax.jit(lambda pool, q, *m: reference.paged_attention(
                q, pool[0, 0, p_last, last[1]], pool[0, 1, p_last, last[1]], pool, 0, m[0], m[1], m[2] - 1,
                m[3] - 1, m[4], scale))(pool, q, *meta_args)
        except Exception as e:  # noqa: BLE001 - the baselines then run unchecked
            print(f"  (no reference for the baselines: {type(e).__name__}: {e})"[:160])

    # jax.experimental.pallas.ops.gpu.paged_attention: [KV, pages, page_size, D], no softmax scale.
    try:
        with warnings.catch_warnings():  # jax 0.12 deprecates the module (it still works)
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
        k_splits = _divisor_at_most(pages_per_seq, 16)
        ppcb = _divisor_at_most(pages_per_seq // k_splits, 8)

        def convert(pool, q):
            to_heads = lambda half: pool[0, half].reshape(num_pages, PAGE_SIZE, kv_heads, head_dim).transpose(2, 0, 1, 3)  # noqa: E731
            return to_heads(0), to_heads(1), (q.astype(jnp.float32) * scale).astype(q.dtype)
        kp, vp, qs = bench.make(convert, pool, q)
        lengths = np.full(batch, context, np.int32)
        fn = lambda qs, kp, vp, t, n: jax_pa.paged_attention(  # noqa: E731
            qs, kp, vp, t, n, block_h=16, pages_per_compute_block=ppcb, k_splits=k_splits, interpret=interpret)
        record("jax.experimental paged_attention", bench.attempt(fn, (qs, kp, vp, tables, lengths)), shifted,
               note=f"k_splits={k_splits} ppcb={ppcb}" + (" (interpret)" if interpret else ""))
        results.pop("jax.experimental paged_attention", None)
        free(kp, vp, qs)
    except Exception as e:  # noqa: BLE001
        record("jax.experimental paged_attention", {"skipped": f"{type(e).__name__}: {e}"[:160]})

    # cuDNN flash attention over a dense [B, context, KV, D] gather of the pages.
    if bench.on_cpu and not bench.lower_only:
        record("cudnn (dense KV)", {"skipped": "no cuDNN on CPU"})
    else:
        try:
            dense = lambda pool, half: pool[0, half][tables].reshape(batch, context, kv_heads, head_dim)  # noqa: E731
            kd, vd = bench.make(lambda pool: (dense(pool, 0), dense(pool, 1)), pool)
            fn = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
                q[:, None], k, v, scale=scale, implementation="cudnn")[:, 0]
            record("cudnn (dense KV)", bench.attempt(fn, (q, kd, vd)), shifted, note="KV gathered untimed")
            results.pop("cudnn (dense KV)", None)
            free(kd, vd)
        except Exception as e:  # noqa: BLE001
            record("cudnn (dense KV)", {"skipped": f"{type(e).__name__}: {e}"[:160]})
    free(pool, q, k_new, v_new, *results.values(), shifted)
    return rows


# ---------------------------------------------------------------------------------------------
# Multi-LoRA decode layer
# ---------------------------------------------------------------------------------------------

def lora_setup(cfg, num_adapters, batch, rng, extra_pages):
    """Row tables of the batch's active adapters, laid out as the engine lays them out, and the
    pool's page count. Returns (tables {module: {a_rows, b_rows, rank}}, token_adapter [T],
    active ranks, num_pool_pages)."""
    from jaxserve.config import LORA_MODULES
    from jaxserve.lora import layout as lay

    tables = lay.table_layout(cfg, MAX_LORA_RANK)
    ranks = rng.choice(LORA_RANKS, num_adapters)
    layouts = []
    for r in ranks:  # plan_layout only reads each module's rank (w.a.shape[0]) from the adapter
        fake = types.SimpleNamespace(weights={(0, m): types.SimpleNamespace(a=np.empty((int(r), 0)))
                                              for m in LORA_MODULES})
        layouts.append(lay.plan_layout(fake, cfg, PAGE_SIZE))
    num_pool_pages = sum(lo.num_pages for lo in layouts) + extra_pages
    perm = rng.permutation(num_pool_pages)           # adapters scattered among the pool's pages
    starts = np.cumsum([0] + [lo.num_pages for lo in layouts])
    if num_adapters > batch:    # the worst case: every token a different adapter
        which = rng.choice(num_adapters, batch, replace=False)
    else:
        which = rng.integers(0, num_adapters, batch)
    active, token_adapter = np.unique(which, return_inverse=True)
    flat, mod_ranks = [], []
    for s in active:
        local, rk = lay.local_rows(layouts[s], tables)
        flat.append(lay.pool_rows(local, list(perm[starts[s]:starts[s + 1]]), num_pool_pages, PAGE_SIZE))
        mod_ranks.append(rk)
    split = lay.split_tables(np.stack(flat), np.stack(mod_ranks).astype(np.int32), tables)
    return split, token_adapter.astype(np.int32), ranks[active], num_pool_pages


def layer_fn(delta):
    """One decode layer's seven projections (attention excluded: o_proj reads q in its place),
    each y = x W (+ LoRA delta) in f32 then cast, as llama._project does."""
    import jax
    import jax.numpy as jnp

    def proj(x, w, name, lora_args):
        y = jnp.dot(x, w, preferred_element_type=jnp.float32)
        if delta is not None:
            y = y + delta(x, name, w.shape[-1], lora_args)
        return y.astype(x.dtype)

    def layer(h, weights, lora_args):
        q, k, v = (proj(h, weights[m], m, lora_args) for m in ("q_proj", "k_proj", "v_proj"))
        h = h + proj(q, weights["o_proj"], "o_proj", lora_args)
        gated = jax.nn.silu(proj(h, weights["gate_proj"], "gate_proj", lora_args).astype(jnp.float32))
        gated = gated * proj(h, weights["up_proj"], "up_proj", lora_args).astype(jnp.float32)
        return h + proj(gated.astype(h.dtype), weights["down_proj"], "down_proj", lora_args), k, v
    return layer


def lora_case(bench: Bench, shape, batch, num_adapters, dtype, interpret, seed, base_ms_cache):
    import jax
    import jax.numpy as jnp
    from jaxserve.config import LORA_MODULES, ModelConfig
    from jaxserve.pallas import lora, reference

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"], num_layers=1, num_heads=shape["heads"],
                      num_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"])
    rng = np.random.default_rng(seed)
    tables, token_adapter, act_ranks, num_pool_pages = lora_setup(cfg, num_adapters, batch, rng,
                                                                  extra_pages=max(64, num_adapters))
    row_width = cfg.kv_size
    itemsize = jnp.dtype(dtype).itemsize
    fan = {m: cfg.module_shape(m) for m in LORA_MODULES}
    base_bytes = sum(i * o for i, o in fan.values()) * itemsize
    lora_bytes = int(sum(act_ranks)) * sum(i + o for i, o in fan.values()) * itemsize

    *ws, pool, h = bench.normal(seed, *((fan[m], dtype, fan[m][0] ** -0.5) for m in LORA_MODULES),
                                ((1, 2, num_pool_pages, PAGE_SIZE, row_width), dtype, 0.02),
                                ((batch, cfg.hidden_size), dtype, 1.0))
    weights = dict(zip(LORA_MODULES, ws))
    layer_ix = np.int32(0)           # a jit argument, traced as in the model's layer scan
    ta = token_adapter
    common = dict(adapters=num_adapters, distinct=len(act_ranks), mean_rank=float(np.mean(act_ranks[ta])),
                  max_rank=int(act_ranks.max()), batch=batch, base_weight_bytes=base_bytes,
                  lora_weight_bytes=lora_bytes, bandwidth_floor_pct=100 * lora_bytes / base_bytes)

    def pool_delta(op):
        def delta(x, name, out_features, la):
            pool, layer, t, ta = la
            return op(x, pool, layer, t[name]["a_rows"], t[name]["b_rows"], t[name]["rank"], ta, out_features)
        return delta

    chosen = "mbgmv" if batch <= lora.DECODE_MAX_TOKENS else "sgmv"
    impls = [("xla reference", pool_delta(reference.lora_delta)),
             (f"pallas lora_delta (auto={chosen})", pool_delta(functools.partial(lora.lora_delta, interpret=interpret))),
             ("pallas " + ("sgmv" if chosen == "mbgmv" else "mbgmv") + " (forced)", pool_delta(functools.partial(
                 lora.lora_delta_sgmv if chosen == "mbgmv" else lora.lora_delta_mbgmv, interpret=interpret)))]
    pool_args = (pool, layer_ix, tables, ta)

    # Padded "bmm" baseline: dense stacks of the active adapters, zero past each rank, R = max rank.
    r_max = int(act_ranks.max())

    def stacks(pool):
        out = {}
        for m, (fi, fo) in fan.items():
            t = tables[m]
            live = (np.arange(r_max)[None, :] < t["rank"][:, None])[..., None]
            a = reference.gather_rank_rows(pool, 0, t["a_rows"][:, :r_max], fi)
            b = reference.gather_rank_rows(pool, 0, t["b_rows"][:, :r_max], fo)
            out[m] = (jnp.where(live, a, 0), jnp.where(live, b, 0))
        return out

    def bmm_delta(x, name, out_features, la):
        st, ta = la
        a, b = st[name][0][ta], st[name][1][ta]                                   # [T, R, in], [T, R, out]
        v = jnp.einsum("ti,tri->tr", x, a, preferred_element_type=jnp.float32).astype(x.dtype)
        return jnp.einsum("tr,tro->to", v, b, preferred_element_type=jnp.float32)

    rows = []
    key = ("base", batch, shape["hidden"])
    base_fn = layer_fn(None)
    base = base_ms_cache.get(key)
    if base is None:
        base = bench.attempt(lambda h, w: base_fn(h, w, None), (h, weights))
        base.pop("out", None)
        base_ms_cache[key] = base
    rows.append({**common, "impl": "base layer (7 matmuls, no attention)",
                 **{k: base[k] for k in ("ms", "compile_s", "skipped", "lowered") if k in base}})
    base_ms = base.get("ms")

    # Correctness: every impl's seven deltas against the reference's on the same random inputs.
    xs = None if bench.lower_only or bench.on_cpu else dict(zip(fan, bench.normal(
        seed + 1, *(((batch, fan[m][0]), dtype, 1.0) for m in fan))))

    def deltas_of(delta, la):
        return jax.jit(lambda xs, la: {m: delta(xs[m], m, fan[m][1], la) for m in fan})(xs, la)

    want = None
    st = None
    check_layer = bench.on_cpu  # interpret compiles are slow: do not compile the deltas separately
    for name, delta in impls + [("padded bmm (S-LoRA baseline)", bmm_delta)]:
        if name.startswith("padded"):
            try:
                st = bench.make(stacks, pool)
            except Exception as e:  # noqa: BLE001
                rows.append({**common, "impl": name, "skipped": f"{type(e).__name__}: {e}"[:160]})
                continue
            la = (st, ta)
        else:
            la = pool_args
        fn = layer_fn(delta)
        r = bench.attempt(lambda h, w, la, fn=fn: fn(h, w, la), (h, weights, la))
        row = {**common, "impl": name}
        if "ms" in r:
            row.update(ms=r["ms"], compile_s=r["compile_s"], inner=r["inner"])
            if base_ms is not None:
                row.update(added_ms=r["ms"] - base_ms, added_pct=100 * (r["ms"] - base_ms) / base_ms)
            out, got = r.pop("out"), None
            try:
                # CPU (float32): the layer's outputs themselves; else the seven deltas, in float32
                # (a bf16 layer output would hide a small delta error under its rounding).
                got = out if check_layer else deltas_of(delta, la)
                if name == "xla reference":
                    want = got
                elif want is not None:
                    row["max_abs_diff"] = max(max_diff(g, w) for g, w in zip(jax.tree.leaves(got),
                                                                              jax.tree.leaves(want)))
            except Exception as e:  # noqa: BLE001
                row["check_failed"] = f"{type(e).__name__}: {e}"[:160]
            if want is not out:
                free(*jax.tree.leaves(out))
        else:
            row.update({k: r[k] for k in ("skipped", "lowered", "compile_s") if k in r})
        rows.append(row)
    free(pool, h, *jax.tree.leaves(weights), *jax.tree.leaves(st), *jax.tree.leaves(want))
    return rows


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def fmt(row, key, spec, width):
    v = row.get(key)
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def status(row) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if row.get("lowered"):
        return f"lowered for CUDA in {row['compile_s']:.1f}s"
    if "check_failed" in row:
        return f"check failed: {row['check_failed']}"
    return row.get("note", "")


def print_attention_header():
    print(f"{'heads':>10} {'ctx':>6} {'impl':<34} {'ms':>9} {'TB/s':>7} {'% copy':>7} {'max|diff|':>10} "
          f"{'compile s':>9}  note")


def print_attention_row(row, copy_tbs):
    pct = None if "tb_per_s" not in row or not copy_tbs else 100 * row["tb_per_s"] / copy_tbs
    heads = f"{row['heads']}/{row['kv_heads']}x{row['head_dim']}"
    print(f"{heads:>10} {row['context']:>6} {row['impl']:<34} {fmt(row, 'ms', '.4f', 9)} "
          f"{fmt(row, 'tb_per_s', '.3f', 7)} {'-' if pct is None else f'{pct:.1f}%':>7} "
          f"{fmt(row, 'max_abs_diff', '.2e', 10)} {fmt(row, 'compile_s', '.1f', 9)}  {status(row)}", flush=True)


def print_lora_header():
    print(f"{'adapters':>8} {'distinct':>8} {'rank mean/max':>13} {'impl':<38} {'ms':>9} {'added ms':>9} "
          f"{'added %':>8} {'max|diff|':>10} {'compile s':>9}  note")


def print_lora_row(row):
    rk = f"{row['mean_rank']:.1f}/{row['max_rank']}"
    pct = row.get("added_pct")
    print(f"{row['adapters']:>8} {row['distinct']:>8} {rk:>13} {row['impl']:<38} {fmt(row, 'ms', '.4f', 9)} "
          f"{fmt(row, 'added_ms', '.4f', 9)} {'-' if pct is None else f'{pct:.1f}%':>8} "
          f"{fmt(row, 'max_abs_diff', '.2e', 10)} {fmt(row, 'compile_s', '.1f', 9)}  {status(row)}", flush=True)


def decode_step_vs_floor(att_rows, lora_rows, copy_tbs, heads: int) -> list[str]:
    """A decode layer (Llama-7B's on a GPU) at the batch = its seven projections (the base layer
    timed in the LoRA part) + paged attention over each context (the fastest jaxserve split at the
    layer's own heads, MHA), against its memory-bandwidth floor: the layer's weight bytes + the KV
    bytes attention reads, at the measured device copy bandwidth. Target (GPU, ctx >= 2k): <= 1.3x."""
    base = next((r for r in lora_rows if r["impl"].startswith("base layer") and "ms" in r), None)
    if base is None or not copy_tbs:
        return []
    lines = []
    for ctx in sorted({r["context"] for r in att_rows}):
        att = [r for r in att_rows if r["impl"].startswith("jaxserve") and "ms" in r and r["context"] == ctx
               and r["heads"] == r["kv_heads"] == heads]
        if not att:
            continue
        a = min(att, key=lambda r: r["ms"])
        step_ms = base["ms"] + a["ms"]
        floor_ms = (base["base_weight_bytes"] + a["kv_bytes"]) / (copy_tbs * 1e12) * 1e3
        lines.append(f"decode layer (batch {base['batch']}, ctx {ctx}): projections {base['ms']:.3f} + attention "
                     f"{a['ms']:.3f} ms = {step_ms:.3f} ms vs floor {floor_ms:.3f} ms (weights + KV at the copy "
                     f"bandwidth): {step_ms / floor_ms:.2f}x -> target (<= 1.3x) "
                     f"{'MET' if step_ms <= 1.3 * floor_ms else 'NOT MET'}")
    return lines


def summarize(att_rows, lora_rows, batch, on_cpu, copy_tbs=None, heads=GPU_LAYER["heads"]):
    """The target lines (only meaningful on a GPU)."""
    lines = []
    best = {}
    for r in att_rows:
        if r["impl"].startswith("jaxserve") and "tb_per_s" in r and r["context"] >= 2048:
            k = (r["heads"], r["kv_heads"], r["context"])
            best[k] = max(best.get(k, 0.0), r["tb_per_s"])
    if best:
        worst = min(best.values())
        lines.append(f"attention target (>= 1.8 TB/s, batch {batch}, ctx >= 2k, best pps per shape): "
                     f"min {worst:.3f} TB/s -> {'MET' if worst >= 1.8 else 'NOT MET'}")
    for n in sorted({r["adapters"] for r in lora_rows}):
        rows = [r for r in lora_rows if r["adapters"] == n]
        pallas = [r for r in rows if r["impl"].startswith("pallas") and "added_pct" in r]
        bmm = [r for r in rows if r["impl"].startswith("padded") and "added_pct" in r]
        if pallas:
            p = min(pallas, key=lambda r: r["added_pct"])
            beat = f", padded bmm +{bmm[0]['added_pct']:.1f}%" if bmm else ""
            ok = p["added_pct"] <= 15 and (not bmm or p["ms"] < bmm[0]["ms"])
            lines.append(f"lora {n} adapters: best pallas ({p['impl']}) +{p['added_pct']:.1f}%{beat}; bandwidth "
                         f"floor +{p['bandwidth_floor_pct']:.1f}%" + (" -> target (<= 15%, beats bmm) "
                                                                       f"{'MET' if ok else 'NOT MET'}" if n >= 1000 else ""))
    lines += decode_step_vs_floor(att_rows, lora_rows, copy_tbs, heads)
    if lines:
        print("\nsummary" + (" (CPU interpret: not performance)" if on_cpu else ""))
        for line in lines:
            print("  " + line)
    return lines


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (GPU: ctx 2048, adapters 64,1000)")
    p.add_argument("--batch", type=int, help="decode batch (default 64 on GPU, 4 on CPU)")
    p.add_argument("--contexts", help="attention contexts (default 512,2048,8192 on GPU, 64,256 on CPU)")
    p.add_argument("--adapters", help="registered adapter counts (default 1,64,1000 on GPU, 1,4,16 on CPU)")
    p.add_argument("--pages-per-split", help="jaxserve kernel splits to try (default 8,16,32 on GPU, 4,16 on CPU)")
    p.add_argument("--parts", default="attention,lora", help="which parts to run")
    p.add_argument("--repeats", type=int, help="timed runs per impl; the median is reported (default 20 GPU, 3 CPU)")
    p.add_argument("--copy-mib", type=int, help="buffer size of the copy-bandwidth probe (default 2048 GPU, 64 CPU)")
    p.add_argument("--dtype", help="override the dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--lower-only", action="store_true",
                   help="GPU sizes as shapes only: lower every impl for CUDA without running (a CPU check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all figures here too")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    on_cpu = jax.default_backend() == "cpu"
    small = on_cpu and not args.lower_only
    if args.lower_only and on_cpu:  # jax >= 0.11 asks the (absent) GPU its arch when lowering Triton
        try:
            from jax._src.pallas.triton import pallas_call_registration as reg
            if hasattr(reg, "gpu_info_lib"):
                reg.gpu_info_lib.get_gpu_info = lambda: types.SimpleNamespace(compute_capability=90)
        except Exception:  # noqa: BLE001
            pass
    quick = args.quick
    batch = args.batch or (4 if small else 64)
    contexts = ints(args.contexts or ("64" if small and quick else "64,256" if small else "2048" if quick
                                      else "512,2048,8192"))
    counts = ints(args.adapters or ("1,8" if small and quick else "1,4,16" if small else "64,1000" if quick
                                    else "1,64,1000"))
    pps_list = ints(args.pages_per_split or ("4" if small and quick else "4,16" if small else "16" if quick else "8,16,32"))
    repeats = args.repeats or (2 if small and quick else 3 if small else 5 if quick else 20)
    dtype = jnp.dtype(args.dtype or ("float32" if small else "bfloat16"))
    parts = set(args.parts.split(","))
    interpret = small
    bench = Bench(repeats, args.lower_only, on_cpu)

    dev = jax.devices()[0]
    print(f"jaxserve kernels | device {getattr(dev, 'device_kind', dev.platform)} ({jax.default_backend()}) | "
          f"jax {jax.__version__} | dtype {dtype.name} | batch {batch} | page size {PAGE_SIZE} | repeats {repeats}")
    if small:
        print("CPU interpret mode: correctness smoke, not performance (tiny shapes, Pallas kernels interpreted)")
    if args.lower_only:
        print("lower-only: GPU-sized shapes, nothing runs; each impl is lowered for CUDA with jax.export")
    result = {"device": str(getattr(dev, "device_kind", dev.platform)), "backend": jax.default_backend(),
              "jax": jax.__version__, "dtype": dtype.name, "batch": batch, "repeats": repeats,
              "interpret": interpret, "lower_only": args.lower_only, "attention": [], "lora": []}

    copy_tbs = None
    if not args.lower_only:
        mib = args.copy_mib or (64 if on_cpu else 2048)
        try:
            result["copy"] = copy_bandwidth(bench, mib << 20, dtype)
            copy_tbs = result["copy"]["tb_per_s"]
            print(f"copy bandwidth (jitted x + 1 over {mib} MiB, read + write): {copy_tbs:.3f} TB/s "
                  f"({result['copy']['ms']:.3f} ms)")
        except Exception as e:  # noqa: BLE001
            print(f"copy bandwidth: skipped ({type(e).__name__}: {e})")

    if "attention" in parts:
        heads = CPU_HEADS if small else GPU_HEADS
        print(f"\n== paged decode attention: batch {batch}, one query per sequence, cached_len = context, "
              f"page size {PAGE_SIZE}, random page tables ==")
        print_attention_header()
        for name, nh, nkv, hd in heads:
            for ctx in contexts:
                try:
                    rows = attention_case(bench, batch, ctx, nh, nkv, hd, dtype, pps_list, interpret,
                                          args.seed + ctx)
                except Exception as e:  # noqa: BLE001 - keep going with the other shapes
                    traceback.print_exc()
                    rows = [{"impl": "(case)", "context": ctx, "heads": nh, "kv_heads": nkv, "head_dim": hd,
                             "skipped": f"{type(e).__name__}: {e}"[:160]}]
                for row in rows:
                    print_attention_row(row, copy_tbs)
                    if copy_tbs and "tb_per_s" in row:
                        row["fraction_of_copy"] = row["tb_per_s"] / copy_tbs
                result["attention"] += rows

    if "lora" in parts:
        shape = CPU_LAYER if small else GPU_LAYER
        print(f"\n== multi-LoRA decode layer: batch {batch}, hidden {shape['hidden']}, intermediate "
              f"{shape['intermediate']}, {shape['heads']}x{shape['head_dim']} heads, q/k/v/o/gate/up/down, "
              f"ranks {'/'.join(map(str, LORA_RANKS))}; attention excluded; added = vs the base layer ==")
        print_lora_header()
        base_cache = {}
        for n in counts:
            try:
                rows = lora_case(bench, shape, batch, n, dtype, interpret, args.seed + n, base_cache)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows = [{"impl": "(case)", "adapters": n, "distinct": 0, "mean_rank": 0.0, "max_rank": 0,
                         "skipped": f"{type(e).__name__}: {e}"[:160]}]
            for row in rows:
                print_lora_row(row)
            fl = rows[0].get("bandwidth_floor_pct")
            if fl is not None:
                print(f"{'':>8} bandwidth floor: the {rows[0]['distinct']} distinct adapters' weights are "
                      f"{fl:.1f}% of the base layer's weight bytes")
            result["lora"] += rows

    if not args.lower_only:
        layer_heads = (CPU_LAYER if small else GPU_LAYER)["heads"]
        result["summary"] = summarize(result["attention"], result["lora"], batch, on_cpu, copy_tbs, layer_heads)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
