"""The Pallas paged-attention kernel against the XLA reference (the spec) and a float64 numpy
reference: random page tables (permutations of the pool), ragged contexts (1, a page boundary,
one past it, long), decode tokens and prefill chunks with a cached prefix in one batch, padding
tokens, several kv splits, and the model's calling pattern (jit + scan with a traced layer).

On CPU the kernel runs with interpret=True; on a GPU the class runs it compiled (Triton), see
INTERPRET. Every kernel call poisons its outputs (NaN through input_output_aliases), so a block the
kernel does not write fails the finiteness and value checks.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas import reference
from jaxserve.pallas.paged_attention import default_pages_per_split, paged_attention, paged_attention_partials

# Page size x GQA group x head dim x dtype as a pairwise-covering design (every pair of values of
# any two factors appears at least once) in 12 cases instead of the 48-case product: the kernel's
# code paths depend on page size (several pages per key block below 16) and group (padding to 16
# rows) separately, head dim only sizes the blocks and dtype the casts, so the full product would
# add interpret compile time (~2-3 s a case on CPU), not coverage. page x group is complete.
PAIRWISE = [(8, 1, 64, "float32"), (8, 3, 128, "bfloat16"), (8, 4, 64, "bfloat16"), (8, 8, 128, "float32"),
            (16, 1, 128, "bfloat16"), (16, 3, 64, "float32"), (16, 4, 128, "float32"), (16, 8, 64, "bfloat16"),
            (32, 1, 64, "bfloat16"), (32, 3, 128, "float32"), (32, 4, 128, "bfloat16"), (32, 8, 64, "float32")]
KV_HEADS = 2
NUM_LAYERS = 2
PAD = 3

# float32: the kernel accumulates in f32 like the reference; the only differences are summation
# order and the online softmax's rescaling (measured <= 1e-6 over ~130 keys; 5e-6 leaves room).
F32_TOL = dict(atol=5e-6, rtol=5e-6)
# bfloat16 (q, k, v and pool in bf16, both references fed the same bf16 values): bf16 keeps 8
# significant bits, so one rounding has relative error <= 2^-9. The kernel rounds the (unnormalised)
# probabilities to bf16 before P@V (as the reference rounds its normalised ones) and rounds the
# output to bf16: the error is about 2^-9 * sum_k p_k |v_k| + 2^-9 |out| <= 2^-8 * max|v| with
# |v| <= ~4.5 for these standard-normal values, ~0.018 at worst, typically far less. atol 2^-5
# leaves head room (measured: <= 2^-7 vs the reference, one output ulp near 1, and ~5e-3 vs
# float64), rtol 2^-7 is one bf16 ulp of the output.
BF16_TOL = dict(atol=2 ** -5, rtol=2 ** -7)


def build_batch(rng, page_size, group, head_dim, dtype, max_pages=None, num_layers=NUM_LAYERS):
    """Sequences of ragged lengths in random pages; each brings a chunk of new tokens (decode: 1;
    prefill chunks with a cached prefix, one longer than a 16-row fresh block), plus padding."""
    max_pages = max_pages or max(4, 128 // page_size)
    long = max_pages * page_size - 3
    # (total length, chunk): chunk tokens are new (keys from k_new), the rest are in the pool.
    seqs = [(1, 1),                      # a 1-token prompt: no cached prefix at all
            (long, 1),                   # decode at a long context: several kv splits
            (page_size + 1, 3),          # prefill chunk crossing a page boundary
            (page_size, 1),              # decode exactly at a page boundary
            (page_size + 1, 1),          # decode one past it
            (2 * page_size + 18, 18)]    # prefill chunk of 18 after a 2-page cached prefix
    num_pages = len(seqs) * max_pages + 3
    width = KV_HEADS * head_dim
    heads = KV_HEADS * group
    perm = rng.permutation(num_pages)
    tables = np.stack([perm[i * max_pages:(i + 1) * max_pages] for i in range(len(seqs))]).astype(np.int32)
    pool = rng.standard_normal((num_layers, 2, num_pages, page_size, width)).astype(np.float32)  # noise elsewhere
    keys = [rng.standard_normal((num_layers, n, width)).astype(np.float32) for n, _ in seqs]
    values = [rng.standard_normal((num_layers, n, width)).astype(np.float32) for n, _ in seqs]
    token_seq, positions, cached, k_new, v_new = [], [], [], [], []
    for s, (n, chunk) in enumerate(seqs):
        for j in range(n - chunk):
            pool[:, :, tables[s, j // page_size], j % page_size] = np.stack([keys[s][:, j], values[s][:, j]], 1)
        for j in range(n - chunk, n):
            token_seq.append(s), positions.append(j), cached.append(n - chunk)
            k_new.append(keys[s][:, j]), v_new.append(values[s][:, j])
    token_seq += [0] * PAD  # padding, as the runner builds it: sequence 0, position 0, never a key
    positions += [0] * PAD
    cached += [0] * PAD
    k_new += [rng.standard_normal((num_layers, width)).astype(np.float32) * 100] * PAD
    v_new += [rng.standard_normal((num_layers, width)).astype(np.float32) * 100] * PAD
    num_tokens = len(positions)
    q = rng.standard_normal((num_layers, num_tokens, heads, head_dim)).astype(np.float32)
    cast = lambda a: np.asarray(jnp.asarray(a, dtype))  # noqa: E731
    return dict(q=cast(q), k_new=cast(np.stack(k_new, 1)), v_new=cast(np.stack(v_new, 1)), pool=cast(pool),
                page_tables=tables, token_seq=np.array(token_seq, np.int32),
                positions=np.array(positions, np.int32), cached_lens=np.array(cached, np.int32),
                valid=np.arange(num_tokens) < num_tokens - PAD, scale=head_dim ** -0.5, group=group)


# Jitted once per static configuration: one XLA compile instead of op-by-op eager dispatch.
reference_attention = jax.jit(reference.paged_attention)


@functools.lru_cache(maxsize=None)
def jitted_kernel(interpret, pages_per_split, partials=False):
    fn = paged_attention_partials if partials else paged_attention
    return jax.jit(functools.partial(fn, interpret=interpret, pages_per_split=pages_per_split, poison=True))


def layer_args(b, layer):
    return (b["q"][layer], b["k_new"][layer], b["v_new"][layer], b["pool"], np.int32(layer), b["page_tables"],
            b["token_seq"], b["positions"], b["cached_lens"], b["valid"], b["scale"])


def numpy_attention(b, layer):
    """float64 attention of every valid token over its sequence's keys 0..position, gathered
    from the pool pages (cached) and the batch (fresh) independently of both implementations."""
    q = np.asarray(b["q"][layer], np.float64)
    pool = np.asarray(b["pool"][layer], np.float64)
    kn, vn = (np.asarray(b[x][layer], np.float64) for x in ("k_new", "v_new"))
    page_size, heads, head_dim = pool.shape[2], q.shape[1], q.shape[2]
    out = np.full(q.shape, np.nan)
    for t in np.flatnonzero(b["valid"]):
        s, pos, c = b["token_seq"][t], b["positions"][t], b["cached_lens"][t]
        pages = b["page_tables"][s, np.arange(c) // page_size]
        fresh = np.flatnonzero((b["token_seq"] == s) & b["valid"] & (b["positions"] <= pos))
        k = np.concatenate([pool[0, pages, np.arange(c) % page_size], kn[fresh]]).reshape(-1, KV_HEADS, head_dim)
        v = np.concatenate([pool[1, pages, np.arange(c) % page_size], vn[fresh]]).reshape(-1, KV_HEADS, head_dim)
        assert len(k) == pos + 1
        kv = np.arange(heads) // b["group"]
        logits = np.einsum("hd,lhd->hl", q[t], k[:, kv]) * b["scale"]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[t] = np.einsum("hl,lhd->hd", p / p.sum(-1, keepdims=True), v[:, kv])
    return out


class TestPallasPagedAttention:
    INTERPRET = jax.default_backend() != "gpu"  # set False to run the compiled kernel

    def kernel(self, *args, pages_per_split):
        return np.asarray(jitted_kernel(self.INTERPRET, pages_per_split)(*args), np.float64)

    def check(self, got, b, layer, tol):
        valid = b["valid"]
        assert np.isfinite(got).all(), "unwritten (poisoned) or NaN output"
        want_ref = np.asarray(reference_attention(*layer_args(b, layer)), np.float64)
        np.testing.assert_allclose(got[valid], numpy_attention(b, layer)[valid], **tol, err_msg="vs float64 numpy")
        np.testing.assert_allclose(got[valid], want_ref[valid], **tol, err_msg="vs reference.paged_attention")
        # A padding query attends to itself only: its row is its own value, exactly (p = 1).
        v_self = np.asarray(b["v_new"][layer], np.float64)[~valid].reshape(PAD, KV_HEADS, 1, -1)
        v_self = np.broadcast_to(v_self, (PAD, KV_HEADS, b["group"], v_self.shape[-1])).reshape(got[~valid].shape)
        np.testing.assert_array_equal(got[~valid], v_self)

    @pytest.mark.parametrize("page_size,group,head_dim,dtype", PAIRWISE)
    def test_matches_references(self, page_size, group, head_dim, dtype):
        rng = np.random.default_rng(page_size * 100 + group * 10 + head_dim)
        b = build_batch(rng, page_size, group, head_dim, dtype)
        pages_per_split = 2 * max(1, 16 // page_size)  # the long context spans several splits
        got = self.kernel(*layer_args(b, 1), pages_per_split=pages_per_split)
        assert got.dtype == np.float64 and b["q"].dtype == np.dtype(dtype)
        self.check(got, b, 1, F32_TOL if dtype == "float32" else BF16_TOL)

    def test_splits_agree_with_one_split(self):
        """Page size 8 (two pages per key block): one page block per split (4 page splits + the
        fresh split) against all pages in one split, and the combine of the partials by hand."""
        rng = np.random.default_rng(7)
        b = build_batch(rng, 8, 4, 64, "float32", max_pages=8)
        args, valid = layer_args(b, 0), b["valid"]
        o, m, l = (np.asarray(x, np.float64) for x in jitted_kernel(self.INTERPRET, 2, partials=True)(*args))
        assert o.shape[2] == 4 + 1 and np.isfinite(o).all() and np.isfinite(l).all()
        weight = np.exp(m - m.max(axis=2, keepdims=True))
        merged = (weight[..., None] * o).sum(2) / (weight * l).sum(2)[..., None]
        many = merged[:, :, :4].reshape(o.shape[0], -1, o.shape[-1])
        one = self.kernel(*args, pages_per_split=8)
        np.testing.assert_allclose(many[valid], one[valid], atol=1e-6, rtol=1e-6)
        self.check(one, b, 0, F32_TOL)

    def test_jit_scan_traced_layer(self):
        """As llama.py calls it: under jax.jit, inside lax.scan over layers, `layer` traced."""
        rng = np.random.default_rng(3)
        b = build_batch(rng, 16, 3, 64, "float32", num_layers=3)
        interpret = self.INTERPRET

        @jax.jit
        def forward(q, k_new, v_new, pool, page_tables, token_seq, positions, cached_lens, valid):
            def step(carry, xs):
                layer, q_l, k_l, v_l = xs
                out = paged_attention(q_l, k_l, v_l, pool, layer, page_tables, token_seq, positions, cached_lens,
                                      valid, b["scale"], interpret=interpret, pages_per_split=2, poison=True)
                return carry + 1, out
            return jax.lax.scan(step, 0, (jnp.arange(3, dtype=jnp.int32), q, k_new, v_new))[1]

        outs = np.asarray(forward(b["q"], b["k_new"], b["v_new"], b["pool"], b["page_tables"], b["token_seq"],
                                  b["positions"], b["cached_lens"], b["valid"]), np.float64)
        for layer in range(3):
            self.check(outs[layer], b, layer, F32_TOL)

    def test_default_split_size(self):
        """Default pages_per_split: a 2k-token decode is split over several programs per KV head."""
        for page_size in (1, 2, 4, 8, 16, 32, 64, 128):
            pps = default_pages_per_split(page_size)
            assert pps % max(1, 16 // page_size) == 0
            assert 2048 // (pps * page_size) >= 4
