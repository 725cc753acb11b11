"""The XLA reference ops (the spec later Pallas kernels must meet) against float64 numpy, on
random page tables (permutations of the pool), ragged lengths and mixed LoRA ranks."""
import numpy as np
import pytest

from jaxserve.pallas import reference


def numpy_attention(q, k_pages, v_pages, page_tables, token_seq, positions, scale):
    T, H, D = q.shape
    ps = k_pages.shape[1]
    hkv = k_pages.shape[2] // D
    out = np.zeros((T, H, D))
    for t in range(T):
        n = positions[t] + 1
        slots = [page_tables[token_seq[t]][j // ps] * ps + j % ps for j in range(n)]
        k = k_pages.reshape(-1, hkv, D)[slots].astype(np.float64)
        v = v_pages.reshape(-1, hkv, D)[slots].astype(np.float64)
        for h in range(H):
            s = k[:, h // (H // hkv)] @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[:, h // (H // hkv)]
    return out


@pytest.mark.parametrize("page_size,heads,kv_heads,head_dim", [(4, 4, 2, 16), (8, 6, 3, 8), (16, 8, 1, 32)])
def test_paged_attention_ragged_random_pages(page_size, heads, kv_heads, head_dim):
    rng = np.random.default_rng(page_size)
    num_pages, max_pages = 40, 6
    context = [1, page_size, page_size + 1, max_pages * page_size - 3]  # ragged, page boundaries
    perm = rng.permutation(num_pages)
    tables = np.stack([perm[i * max_pages:(i + 1) * max_pages] for i in range(len(context))]).astype(np.int32)
    # Each sequence queries its last few positions (a prefill chunk) or just the last (decode).
    token_seq, positions = [], []
    for s, n in enumerate(context):
        chunk = 1 if s % 2 else min(n, 3)
        token_seq += [s] * chunk
        positions += list(range(n - chunk, n))
    token_seq, positions = np.array(token_seq, np.int32), np.array(positions, np.int32)
    q = rng.standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads * head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads * head_dim)).astype(np.float32)
    scale = head_dim ** -0.5
    got = reference.paged_attention(q, k_pages, v_pages, tables, token_seq, positions, scale)
    want = numpy_attention(q, k_pages, v_pages, tables, token_seq, positions, scale)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_lora_delta_mixed_ranks_and_no_adapter():
    rng = np.random.default_rng(0)
    fan_in, fan_out, max_rank = 24, 40, 16
    ranks = [4, 8, 16, 6]
    a = np.zeros((len(ranks), max_rank, fan_in), np.float32)
    b = np.zeros((len(ranks), max_rank, fan_out), np.float32)
    for s, r in enumerate(ranks):
        a[s, :r] = rng.standard_normal((r, fan_in))
        b[s, :r] = rng.standard_normal((r, fan_out))
    slots = np.array([0, 3, -1, 2, 1, 1, -1, 0, 2], np.int32)
    x = rng.standard_normal((len(slots), fan_in)).astype(np.float32)
    got = np.asarray(reference.lora_delta(x, a, b, slots))
    for t, s in enumerate(slots):
        want = np.zeros(fan_out) if s < 0 else (x[t].astype(np.float64) @ a[s, :ranks[s]].T.astype(np.float64)) @ b[s, :ranks[s]]
        np.testing.assert_allclose(got[t], want, atol=1e-4, rtol=1e-5)
