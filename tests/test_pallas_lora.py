"""The Pallas multi-LoRA kernels (jaxserve/pallas/lora.py) against reference.lora_delta and a
float64 numpy reference built from the dense A / B^T matrices.

Adapters of ranks 4, 8, 16, 64 (and one of rank 0: a module the adapter does not touch) sit in
random pool pages among noise-filled pages of other owners; rank-row ids past an adapter's rank
point at random rows or at NaN-filled pages, so a kernel that reads past the rank (or lets a
masked lane through) fails. Widths cover one pool row, several
pool rows, and widths that are not a multiple of the row (zero-padded chunk tails), with a pool
row that is not a power of two among them. Outputs start poisoned (NaN), so an element a kernel
fails to write fails the comparison.

INTERPRET is True on CPU (the only mode there); a GPU run flips it to compile through Triton.
"""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.lora.layout import chunks, pool_rows
from jaxserve.pallas import lora, reference

# Lowering for CUDA (test_lowers_to_verified_triton_ir) makes jax >= 0.11 warn that the Triton
# backend is deprecated; lora.py filters it, but pytest resets filters around each test.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

RANKS = (4, 64, 8, 0, 16)            # adapter i has rank RANKS[i]; R = max rank = 64
NUM_LAYERS = 3


def build_case(rng, row_width, page_size, in_features, out_features, dtype):
    """Pool [L, 2, P, ps, W] with every adapter's rank-rows (A [r, in] then B^T [r, out], per
    layer) in random pages, and the op's row tables. Returns (pool, a_rows, b_rows, ranks, dense)
    where dense[i][layer] = (A, B^T) in float64, rounded to the pool dtype as the pool holds them."""
    ca, cb = chunks(in_features, row_width), chunks(out_features, row_width)
    max_rank = max(RANKS)
    need = [max(1, -(-r * (ca + cb) // (2 * page_size))) for r in RANKS]
    num_pages = sum(need) + 5                                  # room for other owners' pages
    pool = rng.standard_normal((NUM_LAYERS, 2, num_pages, page_size, row_width)).astype(np.float32)
    # Pages 0 and one other hold NaN (page 0 holds row 0, where masked lanes may point): a kernel
    # that reads a row past an adapter's rank, or lets a masked lane through, produces NaN.
    nan_pages = [0, int(rng.integers(1, num_pages))]
    pool[:, :, nan_pages] = np.nan
    free = [int(p) for p in rng.permutation(num_pages) if p not in nan_pages]
    nan_rows = np.array([(h * num_pages + p) * page_size + o
                         for h in range(2) for p in nan_pages for o in range(page_size)])
    total_rows = 2 * num_pages * page_size

    def junk(shape):  # ids of rank-rows past the rank: NaN rows or any other row
        return np.where(rng.random(shape) < 0.5, rng.choice(nan_rows, shape),
                        rng.integers(0, total_rows, shape)).astype(np.int32)
    a_rows, b_rows = junk((len(RANKS), max_rank, ca)), junk((len(RANKS), max_rank, cb))
    dense = [[None] * NUM_LAYERS for _ in RANKS]
    for s, (rank, n_pages) in enumerate(zip(RANKS, need)):
        pages = [free.pop() for _ in range(n_pages)]
        local_a = (np.arange(rank)[:, None] * ca + np.arange(ca)).astype(np.int64)         # [r, ca]
        local_b = (rank * ca + np.arange(rank)[:, None] * cb + np.arange(cb)).astype(np.int64)
        a_rows[s, :rank] = pool_rows(local_a, pages, num_pages, page_size)
        b_rows[s, :rank] = pool_rows(local_b, pages, num_pages, page_size)
        for layer in range(NUM_LAYERS):
            a = rng.standard_normal((rank, in_features)) / np.sqrt(in_features)
            b = rng.standard_normal((rank, out_features)) / np.sqrt(max(rank, 1))
            flat = pool[layer].reshape(-1, row_width)       # a view: writes land in the pool
            for matrix, ids, n in ((a, a_rows[s, :rank], ca), (b, b_rows[s, :rank], cb)):
                padded = np.zeros((rank, n * row_width))
                padded[:, :matrix.shape[1]] = matrix
                flat[ids.reshape(-1)] = padded.reshape(rank * n, row_width)
    pool = jnp.asarray(pool, dtype)
    stored = np.asarray(pool.astype(jnp.float32), np.float64)
    for s, rank in enumerate(RANKS):    # read the dense matrices back as the pool stores them
        for layer in range(NUM_LAYERS):
            flat = stored[layer].reshape(-1, row_width)
            a = flat[a_rows[s, :rank].reshape(-1)].reshape(rank, ca * row_width)[:, :in_features]
            b = flat[b_rows[s, :rank].reshape(-1)].reshape(rank, cb * row_width)[:, :out_features]
            dense[s][layer] = (a, b)
    return pool, jnp.asarray(a_rows), jnp.asarray(b_rows), jnp.asarray(np.array(RANKS, np.int32)), dense


def numpy_delta(x, dense, layer, token_adapter, out_features):
    x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    want = np.zeros((len(token_adapter), out_features))
    for t, s in enumerate(token_adapter):
        if s >= 0:
            a, b = dense[s][layer]
            want[t] = (x[t] @ a.T) @ b
    return want


def decode_adapters(rng, num_tokens):
    """Every adapter (and 'none') at least once, in random order."""
    base = list(range(len(RANKS))) + [-1]
    extra = list(rng.integers(-1, len(RANKS), num_tokens - len(base)))
    return np.array(rng.permutation(base + extra), np.int32)


def prefill_adapters(rng, num_tokens):
    """Segments of varied lengths (adapter 1 spans several token tiles, adapter 4 has one token,
    some with none), interleaved in token order as a mixed prefill batch would be."""
    weights = np.array([3, 8, 2, 1, 0, 2], float)                # adapters 0..4, then 'none'
    draw = rng.choice(np.arange(-1, len(RANKS)), num_tokens - 2, p=np.roll(weights, 1) / weights.sum())
    out = np.concatenate([draw, [4, -1]])
    return rng.permutation(out).astype(np.int32)


reference_delta = jax.jit(reference.lora_delta, static_argnums=7)

VARIANTS = {
    # small tiles keep interpret grids small while exercising several tiles per segment
    "mbgmv": functools.partial(lora.lora_delta_mbgmv, rank_block=16, block_w=64, block_out=16),
    "sgmv": functools.partial(lora.lora_delta_sgmv, block_tokens=8, rank_block=16, block_w=16, block_out=16),
    # 16-wide tiles on a 16-wide pool row: the tl.dot path of _matmul (8-wide tiles take the
    # broadcast-multiply-sum path)
    "sgmv16": functools.partial(lora.lora_delta_sgmv, block_tokens=16, rank_block=16, block_w=16, block_out=16),
    "auto": functools.partial(lora.lora_delta, decode_max_tokens=8, block_tokens=8, block_w=16, block_out=16),
}

# (row_width, page_size, in_features, out_features)
GEOMETRIES = [
    (16, 4, 40, 48),    # in: 3 chunks with a zero-padded tail; out: spans 3 pool rows
    (16, 8, 16, 20),    # in: exactly one row; out: 2 chunks, tail padded
    (24, 2, 48, 24),    # a row width that is not a power of two (8-wide loads), tiny pages
]


F32, BF16 = jnp.float32, jnp.bfloat16
# Every geometry x dtype for each variant at its own batch size (decode: 8 tokens, prefill: 37);
# SGMV with dot-sized tiles (prefill and a decode-sized batch: one padded tile per adapter) and
# the dispatcher once each (interpret compiles dominate the time).
CASES = ([("mbgmv", 8, g, d) for g in GEOMETRIES for d in (F32, BF16)]
         + [("sgmv", 37, g, d) for g in GEOMETRIES for d in (F32, BF16)]
         + [("sgmv16", 37, GEOMETRIES[0], F32), ("sgmv16", 8, GEOMETRIES[1], BF16),
            ("auto", 29, GEOMETRIES[2], BF16)])


def case_id(value):
    if isinstance(value, tuple):
        return "W{}-ps{}-{}x{}".format(*value)
    return jnp.dtype(value).name if not isinstance(value, (int, str)) else str(value)


class TestPallasLoRA:
    INTERPRET = jax.default_backend() == "cpu"

    def _call(self, variant, *args):
        fn = VARIANTS[variant]
        return jax.jit(functools.partial(fn, interpret=self.INTERPRET, poison=True), static_argnums=7)(*args)

    @pytest.mark.parametrize("variant,num_tokens,geometry,dtype", CASES, ids=case_id)
    def test_matches_references(self, variant, num_tokens, geometry, dtype):
        row_width, page_size, fan_in, fan_out = geometry
        rng = np.random.default_rng([row_width, page_size, fan_in, num_tokens])
        pool, a_rows, b_rows, ranks, dense = build_case(rng, row_width, page_size, fan_in, fan_out, dtype)
        pick = decode_adapters if num_tokens <= 8 else prefill_adapters
        token_adapter = jnp.asarray(pick(rng, num_tokens))
        x = jnp.asarray(rng.standard_normal((num_tokens, fan_in)), dtype)
        for layer in (0, NUM_LAYERS - 1):
            args = (x, pool, jnp.int32(layer), a_rows, b_rows, ranks, token_adapter)
            got = np.asarray(self._call(variant, *args, fan_out))
            assert got.shape == (num_tokens, fan_out) and got.dtype == np.float32
            want_ref = np.asarray(reference_delta(*args, fan_out))
            want = numpy_delta(x, dense, layer, np.asarray(token_adapter), fan_out)
            # Both dtypes multiply the pool's values exactly in float32 (a bf16 product is exact
            # in f32) and accumulate in f32; the f64 reference is built from the same bf16-rounded
            # x, A and B^T, so the only error left is f32 summation order: an f32-level tolerance
            # holds for bf16 too (values here are O(1)).
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f"vs f64, layer {layer}")
            np.testing.assert_allclose(got, want_ref, atol=2e-5, rtol=2e-5, err_msg=f"vs reference, layer {layer}")
            assert not np.any(got[np.asarray(token_adapter) < 0]), "tokens without an adapter must get zeros"

    @pytest.mark.parametrize("variant", ["mbgmv", "sgmv"])
    def test_shrink_is_exact_to_the_rank(self, variant):
        """The shrink alone: v[t, :rank] = x[t] A^T and exactly 0 past the rank (nothing computed
        from the junk rows past it), in token order (MBGMV) or padded tile order (SGMV)."""
        rng = np.random.default_rng(7)
        fan_in, num_tokens, block_tokens = 40, 21, 8
        pool, a_rows, _, ranks, dense = build_case(rng, 16, 4, fan_in, 16, jnp.float32)
        token_adapter = prefill_adapters(rng, num_tokens)
        x = rng.standard_normal((num_tokens, fan_in)).astype(np.float32)
        x_padded = jnp.asarray(np.pad(x, ((0, 0), (0, 48 - fan_in))))        # 3 whole pool rows
        layer = jnp.asarray([1], jnp.int32)
        kw = dict(rank_block=16, interpret=self.INTERPRET, poison=True)
        if variant == "mbgmv":
            v = lora.mbgmv_shrink(x_padded, pool, layer, a_rows, ranks, jnp.asarray(token_adapter), block_w=16, **kw)
            tokens = np.arange(num_tokens)
        else:
            tiles, tokens, _ = lora.segment_tiles(jnp.asarray(token_adapter), len(RANKS), block_tokens)
            v = lora.sgmv_shrink(x_padded, pool, layer, a_rows, ranks, tiles, tokens, block_tokens=block_tokens,
                                 block_w=16, **kw)
            tokens = np.asarray(tokens)
        v = np.asarray(v)
        assert v.shape[1] == max(RANKS)
        for row, t in enumerate(tokens):
            if t < 0 or token_adapter[t] < 0:
                continue
            s = token_adapter[t]
            want = np.zeros(v.shape[1])
            want[:RANKS[s]] = x[t].astype(np.float64) @ dense[s][1][0].T
            np.testing.assert_allclose(v[row], want, atol=2e-5, rtol=2e-5, err_msg=f"row {row} token {t}")

    def test_segment_tiles(self):
        """Each tile holds tokens of one adapter, every token with an adapter sits in exactly one
        tile row, and padded_pos points back at it."""
        rng = np.random.default_rng(0)
        token_adapter = prefill_adapters(rng, 37)
        tile_adapter, tile_tokens, pos = map(np.asarray, lora.segment_tiles(jnp.asarray(token_adapter), len(RANKS), 8))
        assert tile_adapter.shape == (37 // 8 + len(RANKS),)
        rows = tile_tokens.reshape(len(tile_adapter), 8)
        for m, s in enumerate(tile_adapter):
            toks = rows[m][rows[m] >= 0]
            assert (s < 0) == (len(toks) == 0)
            assert np.all(token_adapter[toks] == s)
            assert np.all(np.diff(toks) > 0)          # stable: original order within a segment
        with_adapter = np.flatnonzero(token_adapter >= 0)
        assert sorted(tile_tokens[tile_tokens >= 0]) == list(with_adapter)
        assert np.all(tile_tokens[pos[with_adapter]] == with_adapter)

    @pytest.mark.parametrize("num_tokens", [6, 21], ids=["decode", "prefill"])
    def test_jit_scan_traced_layer(self, num_tokens):
        """Called as the model calls it: lora.lora_delta (MBGMV for 6 tokens, SGMV for 21) inside
        jax.lax.scan over layers under jax.jit, the layer a traced int32 scalar, the pool closed
        over."""
        rng = np.random.default_rng(num_tokens)
        fan_in, fan_out = 40, 24
        pool, a_rows, b_rows, ranks, dense = build_case(rng, 16, 4, fan_in, fan_out, jnp.float32)
        pick = decode_adapters if num_tokens <= 8 else prefill_adapters
        token_adapter = jnp.asarray(pick(rng, num_tokens))
        x = jnp.asarray(rng.standard_normal((num_tokens, fan_in)), jnp.float32)
        op = functools.partial(VARIANTS["auto"], interpret=self.INTERPRET, poison=True)

        @jax.jit
        def run(x, pool, a_rows, b_rows, ranks, token_adapter):
            def body(carry, layer):
                y = op(x, pool, layer, a_rows, b_rows, ranks, token_adapter, fan_out)
                return carry + y.sum(), y
            return jax.lax.scan(body, jnp.float32(0), jnp.arange(NUM_LAYERS, dtype=jnp.int32))

        total, ys = run(x, pool, a_rows, b_rows, ranks, token_adapter)
        for layer in range(NUM_LAYERS):
            want = numpy_delta(x, dense, layer, np.asarray(token_adapter), fan_out)
            np.testing.assert_allclose(np.asarray(ys[layer]), want, atol=2e-5, rtol=2e-5, err_msg=f"layer {layer}")
        assert np.isfinite(float(total))

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    def test_lowers_to_verified_triton_ir(self, dtype, monkeypatch):
        """Both variants, with their default (GPU) tile sizes, lower for CUDA through the Pallas
        Triton backend and every Triton module passes the MLIR verifier: no GPU needed (this
        catches power-of-two, dot-shape and loop-bound type errors before a GPU run does). Uses
        jax internals, so it skips where they moved."""
        reg = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
        lowering = getattr(reg, "lowering", None)
        if lowering is None or not hasattr(lowering, "lower_jaxpr_to_triton_module"):
            pytest.skip("this jax lowers Pallas-Triton differently")
        verified, lower = [], lowering.lower_jaxpr_to_triton_module

        def lower_and_verify(*args, **kwargs):
            result = lower(*args, **kwargs)
            result.module.operation.verify()          # raises MLIRError on an invalid module
            verified.append(result.grid)
            return result
        monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
        if hasattr(reg, "gpu_info_lib"):              # jax >= 0.11 asks the (absent) GPU its arch
            monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: types.SimpleNamespace(compute_capability=90))
        rng = np.random.default_rng(1)
        fan_in, fan_out = 128, 192                    # 2 and 3 pool rows of 64
        pool, a_rows, b_rows, ranks, _ = build_case(rng, 64, 16, fan_in, fan_out, dtype)
        skip_check = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        for fn, num_tokens in ((lora.lora_delta_mbgmv, 16), (lora.lora_delta_sgmv, 64)):
            x = jnp.zeros((num_tokens, fan_in), dtype)
            token_adapter = jnp.asarray(prefill_adapters(rng, num_tokens))
            jax.export.export(jax.jit(functools.partial(fn, out_features=fan_out)), platforms=["cuda"],
                              disabled_checks=skip_check)(x, pool, jnp.int32(1), a_rows, b_rows, ranks, token_adapter)
        assert len(verified) == 4, verified
