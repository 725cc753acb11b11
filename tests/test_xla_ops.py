"""The fast XLA backend (jaxserve/pallas/xla.py) against the reference ops (the spec) and float64
numpy: ragged contexts in random pages (1 key, page boundaries, several while-loop blocks),
decode tokens and prefill chunks mixed, padding tokens, both attention segment splits; LoRA with
mixed ranks (0, 4, 8, 16, 64), tokens without an adapter, 1 to 5 distinct adapters, tile sizes 8
and 16 with the exact and the largest tile counts. LoRA pools hold NaN pages where masked lanes
point, so a lane that leaks fails."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.llama import Batch
from jaxserve.pallas import reference, xla
from jaxserve.pallas.plan import StepPlan
from jaxserve.shapes import lora_tile_options, lora_tiles_needed
from test_pallas_lora import NUM_LAYERS, RANKS, build_case, numpy_delta


def attention_case(rng, page_size, heads, kv_heads, head_dim, contexts, chunks, pad):
    """Sequences with `contexts[s]` tokens, the last `chunks[s]` of them new in this batch (1: a
    decode token), the rest cached in random pages of layer 1; then `pad` padding tokens."""
    max_pages = max(-(-n // page_size) for n in contexts) + 1
    num_pages = len(contexts) * max_pages + 3
    perm = rng.permutation(num_pages)
    tables = np.stack([perm[i * max_pages:(i + 1) * max_pages] for i in range(len(contexts))]).astype(np.int32)
    width = kv_heads * head_dim
    keys = [rng.standard_normal((n, width)).astype(np.float32) for n in contexts]
    values = [rng.standard_normal((n, width)).astype(np.float32) for n in contexts]
    pool = rng.standard_normal((3, 2, num_pages, page_size, width)).astype(np.float32)  # noise elsewhere
    cols = {name: [] for name in ("token_seq", "positions", "cached", "slot")}
    k_new, v_new = [], []
    for s, (n, chunk) in enumerate(zip(contexts, chunks)):
        for j in range(n - chunk):  # the cached prefix lives in the pool
            pool[1, :, tables[s, j // page_size], j % page_size] = keys[s][j], values[s][j]
        for j in range(n - chunk, n):
            for name, value in zip(cols, (s, j, n - chunk, tables[s, j // page_size] * page_size + j % page_size)):
                cols[name].append(value)
            k_new.append(keys[s][j]), v_new.append(values[s][j])
    for name, value in zip(cols, (0, 0, 0, -1)):
        cols[name] += [value] * pad
    k_new += [rng.standard_normal(width).astype(np.float32) * 100] * pad  # never a key
    v_new += [rng.standard_normal(width).astype(np.float32) * 100] * pad
    t = len(cols["positions"])
    ints = {name: np.array(v, np.int32) for name, v in cols.items()}
    batch = Batch(np.zeros(t, np.int32), ints["positions"], ints["token_seq"], ints["slot"], tables,
                  np.full(t, -1, np.int32), np.arange(t, dtype=np.int32), np.full(t, -1, np.int32), ints["cached"])
    q = rng.standard_normal((t, heads, head_dim)).astype(np.float32)
    return q, np.stack(k_new), np.stack(v_new), pool, batch, keys, values


def numpy_attention(q, batch, keys, values, heads, kv_heads, head_dim, scale, num_real):
    want = np.zeros((num_real, heads, head_dim))
    for t in range(num_real):
        s, n = batch.token_seq[t], batch.positions[t] + 1
        k, v = keys[s][:n].astype(np.float64), values[s][:n].astype(np.float64)
        for h in range(heads):
            kv = slice(h // (heads // kv_heads) * head_dim, (h // (heads // kv_heads) + 1) * head_dim)
            sc = k[:, kv] @ q[t, h].astype(np.float64) * scale
            p = np.exp(sc - sc.max())
            want[t, h] = (p / p.sum()) @ v[:, kv]
    return want


@pytest.mark.parametrize("page_size,heads,kv_heads,head_dim", [(4, 4, 2, 16), (8, 6, 3, 8), (16, 9, 3, 64)])
@pytest.mark.parametrize("ctx_rows", [0, 3, 5])
def test_paged_attention_matches_reference_and_float64(page_size, heads, kv_heads, head_dim, ctx_rows):
    """Decode tokens first, then prefill chunks (a continuing one with a cached prefix, a fresh
    one), then padding; contexts of 1 key, a page boundary, boundary + 1, and longer than
    several while-loop blocks. ctx_rows splits the rows into the two attention segments."""
    rng = np.random.default_rng(page_size * 10 + ctx_rows)
    long = 2 * xla.BLOCK_KEYS + 3
    contexts = [1, page_size, page_size + 1, long, long - 5, 7, page_size + 2]
    chunks = [1, 1, 1, 1, 9, 7, 3]                 # decode x4, a continuing chunk, a fresh prompt, one more
    q, k_new, v_new, pool, batch, keys, values = attention_case(rng, page_size, heads, kv_heads, head_dim,
                                                                contexts, chunks, pad=3)
    scale = head_dim ** -0.5

    @jax.jit
    def attend(q, k_new, v_new, pool, batch):  # prepared inside: its segment bounds are static
        meta = xla.prepare(batch, None, pool, StepPlan(ctx_rows=ctx_rows))
        return xla.paged_attention(q, k_new, v_new, pool, np.int32(1), meta, scale)
    got = np.asarray(attend(q, k_new, v_new, pool, batch))
    assert np.isfinite(got).all()  # padding rows too
    spec = np.asarray(reference.paged_attention(q, k_new, v_new, pool, np.int32(1), batch.page_tables,
                                                batch.token_seq, batch.positions, batch.cached_lens,
                                                batch.slot_mapping >= 0, scale))
    real = sum(chunks)
    np.testing.assert_allclose(got[:real], spec[:real], atol=2e-5, rtol=2e-5, err_msg="vs reference")
    want = numpy_attention(q, batch, keys, values, heads, kv_heads, head_dim, scale, real)
    np.testing.assert_allclose(got[:real], want, atol=2e-5, rtol=2e-5, err_msg="vs float64 numpy")



@pytest.mark.parametrize("fresh_block", [16, 64])
@pytest.mark.parametrize("page_size,heads,kv_heads,head_dim", [(4, 4, 2, 16), (16, 9, 3, 64)])
def test_packed_prompts_across_fresh_blocks(monkeypatch, fresh_block, page_size, heads, kv_heads, head_dim):
    """A step like a serving step's: decode tokens, then many prompts packed back to back —
    chunks that straddle fresh-key blocks, one longer than two blocks, one continuing with a
    cached prefix — and padding that leaves the last block partial."""
    monkeypatch.setattr(xla, "FRESH_BLOCK", fresh_block)
    rng = np.random.default_rng(fresh_block + page_size)
    contexts = [30, 5, 60, 150, 21, 17, 40, 9]
    chunks = [1, 1, 41, 150, 21, 17, 33, 9]    # decode x2, continuing, long fresh, fresh x4
    q, k_new, v_new, pool, batch, keys, values = attention_case(rng, page_size, heads, kv_heads, head_dim,
                                                                contexts, chunks, pad=11)
    scale = head_dim ** -0.5

    @jax.jit
    def attend(q, k_new, v_new, pool, batch):
        meta = xla.prepare(batch, None, pool, StepPlan(ctx_rows=48))
        return xla.paged_attention(q, k_new, v_new, pool, np.int32(1), meta, scale)
    got = np.asarray(attend(q, k_new, v_new, pool, batch))
    assert np.isfinite(got).all()
    real = sum(chunks)
    want = numpy_attention(q, batch, keys, values, heads, kv_heads, head_dim, scale, real)
    np.testing.assert_allclose(got[:real], want, atol=2e-5, rtol=2e-5)

def lora_case(rng, num_tokens, adapters_used):
    """Token adapters drawn from `adapters_used` (indices into RANKS) plus tokens without one."""
    choices = np.array(list(adapters_used) + [-1])
    ids = rng.choice(choices, num_tokens)
    ids[:len(choices)] = rng.permutation(choices)[:num_tokens]  # each at least once
    return rng.permutation(ids).astype(np.int32)


@pytest.mark.parametrize("num_tokens,tile_size", [(5, 8), (40, 8), (64, 16), (130, 16), (20, 1)])
@pytest.mark.parametrize("adapters_used", [(2,), (0, 4), (0, 1, 2, 3, 4)])
def test_lora_delta_matches_reference_and_float64(num_tokens, tile_size, adapters_used):
    """Ranks 0/4/8/16/64 mixed with tokens without an adapter, in ONE call per module width;
    the tile count the runner would pick for the batch (exact) and the static maximum."""
    rng = np.random.default_rng(num_tokens * 7 + len(adapters_used))
    ids = lora_case(rng, num_tokens, adapters_used)
    for row_width, page_size, fan_in, fan_out in ((16, 4, 48, 40), (32, 8, 32, 96)):
        pool, a_rows, b_rows, ranks, dense = build_case(rng, row_width, page_size, fan_in, fan_out, jnp.float32)
        # A second module sharing x: the same pool rows, each adapter slot pointing at the next
        # adapter's rows (so a swapped or misaligned rank slice of the shared shrink shows).
        shift = (np.arange(len(RANKS)) + 1) % len(RANKS)
        lora = {"m": {"a_rows": a_rows, "b_rows": b_rows, "rank": ranks, "b_rank": ranks},
                "m2": {"a_rows": a_rows[shift], "b_rows": b_rows[shift], "rank": ranks[shift], "b_rank": ranks[shift]}}
        ids2 = np.where(ids >= 0, shift[np.maximum(ids, 0)], -1)
        x = rng.standard_normal((num_tokens, fan_in)).astype(np.float32)
        batch = Batch(*(np.zeros(num_tokens, np.int32),) * 4, np.zeros((1, 1), np.int32), ids,
                      np.zeros(1, np.int32), np.zeros(num_tokens, np.int32), np.zeros(num_tokens, np.int32))
        exact = lora_tiles_needed(ids, tile_size)
        for num_tiles in sorted({exact, min(num_tokens, num_tokens // tile_size + min(len(RANKS), num_tokens))}):
            meta = xla.prepare(batch, lora, pool, StepPlan(lora_tiles=num_tiles, tile_size=tile_size))
            deltas = jax.jit(xla.lora_deltas, static_argnums=(4, 5))
            for layer in range(NUM_LAYERS):
                got, got2 = map(np.asarray, deltas(x, pool, np.int32(layer), meta, ("m", "m2"), (fan_out, fan_out)))
                np.testing.assert_allclose(got2, numpy_delta(x, dense, layer, ids2, fan_out), atol=1e-4, rtol=1e-4,
                                           err_msg=f"tiles={num_tiles}, second module of a shared shrink")
                spec = np.asarray(reference.lora_delta(x, pool, np.int32(layer), a_rows, b_rows, ranks, ids, fan_out))
                want = numpy_delta(x, dense, layer, ids, fan_out)
                np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"tiles={num_tiles} vs numpy")
                np.testing.assert_allclose(got, spec, atol=1e-4, rtol=1e-4, err_msg=f"tiles={num_tiles} vs reference")


def test_tile_plan_counts_exactly_the_tiles_a_batch_needs():
    ids = np.array([0] * 17 + [1] * 3 + [-1] * 5 + [2] * 16, np.int32)
    assert lora_tiles_needed(ids, 16) == 2 + 1 + 1
    assert lora_tiles_needed(np.full(8, -1, np.int32), 8) == 1   # never zero tiles


@pytest.mark.parametrize("num_tokens", [16, 32, 64, 128, 512])
@pytest.mark.parametrize("max_loras", [1, 8, 32])
def test_last_tile_option_holds_any_batch(num_tokens, max_loras):
    """The runner's last option must fit the worst batch: every token a different adapter (as far
    as max_loras allows), each segment as ragged as possible."""
    options = lora_tile_options(num_tokens, max_loras)
    assert options == sorted(options, key=lambda o: o[0] * (12 + o[1]))  # cheapest first
    tiles, size = options[-1]
    rng = np.random.default_rng(num_tokens)
    for _ in range(20):
        n = int(rng.integers(1, max_loras + 1))
        ids = rng.integers(0, n, num_tokens).astype(np.int32)
        assert size == 1 and tiles == num_tokens or lora_tiles_needed(ids, size) <= tiles
