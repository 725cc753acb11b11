"""The XLA reference ops (the spec later Pallas kernels must meet) against float64 numpy, on
random page tables (permutations of the pool), ragged lengths and mixed LoRA ranks."""
import numpy as np
import pytest

from jaxserve.config import LORA_MODULES, ModelConfig
from jaxserve.lora.layout import local_rows, pack_rows, plan_layout, pool_rows, split_tables, table_layout
from jaxserve.lora.peft import LoRAWeights, PeftAdapter
from jaxserve.pallas import reference
from test_xla_ops import attention_case, numpy_attention


@pytest.mark.parametrize("page_size,heads,kv_heads,head_dim", [(4, 4, 2, 16), (8, 6, 3, 8), (16, 8, 1, 32)])
def test_paged_attention_ragged_random_pages(page_size, heads, kv_heads, head_dim):
    """Sequences of ragged lengths (1, page boundaries, long) in random pool pages of layer 1 of
    a 3-layer pool; each brings a chunk of new tokens (a prefill chunk, or one decode token)
    whose keys come from the batch, the earlier ones from the pool; plus padding tokens."""
    rng = np.random.default_rng(page_size)
    context = [1, page_size, page_size + 1, 6 * page_size - 3]
    chunks = [1 if s % 2 else min(n, 3) for s, n in enumerate(context)]
    q, k_new, v_new, pool, batch, keys, values = attention_case(rng, page_size, heads, kv_heads, head_dim,
                                                                context, chunks, pad=3)
    scale = head_dim ** -0.5
    got = np.asarray(reference.paged_attention(q, k_new, v_new, pool, np.int32(1), batch.page_tables,
                                               batch.token_seq, batch.positions, batch.cached_lens,
                                               batch.slot_mapping >= 0, scale))
    real = sum(chunks)
    want = numpy_attention(q, batch, keys, values, heads, kv_heads, head_dim, scale, real)
    np.testing.assert_allclose(got[:real], want, atol=2e-5, rtol=2e-5)


def random_adapter(cfg, ranks: dict, rng):
    weights = {}
    for (layer, module), rank in ranks.items():
        fan_in, fan_out = cfg.module_shape(module)
        a = rng.standard_normal((rank, fan_in)).astype(np.float32)
        b = rng.standard_normal((rank, fan_out)).astype(np.float32)
        weights[(layer, module)] = LoRAWeights(a, b, 1.0)
    return PeftAdapter("mem", weights, max(ranks.values()), tuple(sorted({m for _, m in ranks})), 0)


@pytest.mark.parametrize("page_size", [2, 8])
def test_lora_delta_from_pool_pages_mixed_ranks(page_size):
    """Adapters of ranks 4, 8, 16 and 6/64 packed into scattered pool pages (pages of other
    owners in between); tokens of each adapter and tokens without one in ONE call. GQA makes the
    pool row (kv_heads * head_dim = 16) narrower than hidden (48) and intermediate (40, a
    non-multiple: tail padding)."""
    rng = np.random.default_rng(page_size)
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=10, hidden_size=48, intermediate_size=40,
                      num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8)
    specs = [{(l, m): 4 for l in range(2) for m in ("q_proj", "v_proj")},
             {(l, m): 8 for l in range(2) for m in LORA_MODULES},
             {(0, "down_proj"): 16, (1, "down_proj"): 16, (1, "gate_proj"): 2},
             {(l, m): (64 if m == "up_proj" else 6) for l in range(2) for m in ("o_proj", "up_proj")}]
    adapters = [random_adapter(cfg, spec, rng) for spec in specs]
    layouts = [plan_layout(a, cfg, page_size) for a in adapters]
    num_pages = sum(l.num_pages for l in layouts) * 2 + 3
    free = list(rng.permutation(num_pages))
    pool = rng.standard_normal((2, 2, num_pages, page_size, cfg.kv_size)).astype(np.float32)  # "KV" noise
    table_spec = table_layout(cfg, max_rank=64)
    flat, ranks = [], []
    for adapter, layout in zip(adapters, layouts):
        pages = [int(free.pop()) for _ in range(layout.num_pages)]
        pool[:, :, pages] = pack_rows(adapter, layout, cfg, page_size, np.float32)
        local, module_ranks = local_rows(layout, table_spec)
        flat.append(pool_rows(local, pages, num_pages, page_size))
        ranks.append(module_ranks)
    tables = split_tables(np.stack(flat), np.stack(ranks), table_spec)
    token_adapter = np.array([0, 3, -1, 2, 1, 1, -1, 0, 2, 3], np.int32)
    for module in LORA_MODULES:
        fan_in, fan_out = cfg.module_shape(module)
        x = rng.standard_normal((len(token_adapter), fan_in)).astype(np.float32)
        table = tables[module]
        for layer in range(2):
            got = np.asarray(reference.lora_delta(x, pool, np.int32(layer), table["a_rows"], table["b_rows"],
                                                  table["rank"], token_adapter, fan_out))
            for t, s in enumerate(token_adapter):
                w = adapters[s].weights.get((layer, module)) if s >= 0 else None
                want = np.zeros(fan_out) if w is None else (x[t].astype(np.float64) @ w.a.T.astype(np.float64)) @ w.b
                np.testing.assert_allclose(got[t], want, atol=2e-4, rtol=1e-5, err_msg=f"{module} {layer} {t}")
