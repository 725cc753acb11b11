"""S-LoRA's tensor-parallel adapter layout (distributed/lora_layout.py) without devices: each
device's pages are packed as the engine packs them, each device's LoRA op runs on its own pages
(the reference and the xla-path Pallas kernels in interpret mode), and the collective is played by
hand — under S-LoRA's scheme the column modules' rank shares concatenated (all-gather), the row
modules' partial shrinks summed (all-reduce); under vLLM's, the row modules' partial outputs
summed (the base all-reduce). The devices' output slices, joined, must equal the unsplit float64
product, for ranks no device count divides (shares zero-padded) and pool pages full of non-finite
noise elsewhere (a table entry that reaches one unmasked poisons the result)."""
from functools import partial

import numpy as np
import pytest

from jaxserve.config import LORA_MODULES, ModelConfig
from jaxserve.distributed.lora_layout import COLUMN_MODULES, lora_view, pack_split
from jaxserve.lora.layout import local_rows, plan_layout, pool_rows, split_tables, table_layout
from jaxserve.pallas import lora as pallas_lora
from jaxserve.pallas import reference
from test_reference_ops import random_adapter

CFG = ModelConfig("LlamaForCausalLM", vocab_size=10, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=4)
PAGE_SIZE, MAX_RANK = 4, 8
OPS = {"reference": reference.lora_delta, "pallas-interpret": partial(pallas_lora.lora_delta, interpret=True)}


def split_pools(adapters, n, scheme, rng):
    """Each device's pool (its slice of every page's row) and the stacked tables of the adapters."""
    view = lora_view(CFG, n, scheme)
    tables = table_layout(view, MAX_RANK)
    layouts = [plan_layout(a, view, PAGE_SIZE) for a in adapters]
    num_pages = sum(lo.num_pages for lo in layouts) + 5
    # Pages nobody wrote hold inf / NaN.
    pool = np.where(rng.random((2, 2, num_pages, PAGE_SIZE, CFG.kv_size)) < 0.5, np.inf, np.nan).astype(np.float32)
    free = list(1 + rng.permutation(num_pages - 1))  # page 0 (row 0: masked entries' row) is noise too
    flat, ranks = [], []
    for adapter, layout in zip(adapters, layouts):
        pages = [int(free.pop()) for _ in range(layout.num_pages)]
        pool[:, :, pages] = pack_split(adapter, layout, view, PAGE_SIZE, np.float32, model_cfg=CFG)
        local, module_ranks = local_rows(layout, tables)
        flat.append(pool_rows(local, pages, num_pages, PAGE_SIZE))
        ranks.append(module_ranks)
    width = view.kv_size
    return [pool[..., d * width:(d + 1) * width] for d in range(n)], split_tables(np.stack(flat), np.stack(ranks), tables)


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("n,scheme", [(2, "s-lora"), (4, "s-lora"), (4, "vllm")])
def test_devices_parts_joined_equal_the_unsplit_adapter(n, scheme, op_name):
    rng = np.random.default_rng(n)
    # ranks 3, 5, 6, 8: no device count here divides them all; one adapter leaves o and down out
    specs = [{(layer, m): r for layer in range(2) for m in LORA_MODULES} for r in (3, 5, 8)]
    specs.append({(layer, m): 6 for layer in range(2) for m in ("q_proj", "v_proj", "gate_proj")})
    adapters = [random_adapter(CFG, spec, rng) for spec in specs]
    pools, tables = split_pools(adapters, n, scheme, rng)
    token_adapter = np.array([0, 3, -1, 2, 1, 1, -1, 0, 2, 3], np.int32)
    op = OPS[op_name]
    for module in ("q_proj", "gate_proj", "o_proj", "down_proj"):
        fan_in, fan_out = CFG.module_shape(module)
        column = module in COLUMN_MODULES
        # vllm keeps a row module's B^T whole: each device gives a full-width partial output
        width = fan_out if scheme == "vllm" and not column else fan_out // n
        x = rng.standard_normal((len(token_adapter), fan_in)).astype(np.float32)
        t = tables[module]
        for layer in (0, 1):
            def run(d, combine):
                x_d = x if column else x[:, d * fan_in // n:(d + 1) * fan_in // n]
                return np.asarray(op(x_d, pools[d], np.int32(layer), t["a_rows"], t["b_rows"], t["rank"],
                                     token_adapter, width, b_ranks=t["b_rank"], combine_shrink=combine))
            if scheme == "vllm":  # no collective of its own; a row module's partials summed (the base all-reduce)
                parts = [run(d, None) for d in range(n)]
                got = np.concatenate(parts, axis=1) if column else np.sum(parts, axis=0)
            else:
                shrinks = []
                for d in range(n):  # each device's shrink, kept as the collective would see it
                    run(d, lambda s: shrinks.append(np.asarray(s)) or np.zeros((*s.shape[:-1], n if column else 1,
                                                                              s.shape[-1]), np.float32))
                gathered = np.stack(shrinks, axis=-2) if column else np.sum(shrinks, axis=0)[..., None, :]
                got = np.concatenate([run(d, lambda s: gathered) for d in range(n)], axis=1)
            for i, s in enumerate(token_adapter):
                w = adapters[s].weights.get((layer, module)) if s >= 0 else None
                want = np.zeros(fan_out) if w is None else (x[i].astype(np.float64) @ w.a.T) @ w.b
                np.testing.assert_allclose(got[i], want, atol=2e-4, rtol=1e-5, err_msg=f"{module} {layer} {i}")


def test_column_modules_hold_a_share_of_the_rank():
    # rank 6 over 4 devices, pool rows of 4 (16 / 4): q keeps a share of 2 rank-rows of A over all
    # 32 inputs (8 chunks each) and 4 x 2 = 8 rows of B^T over its 8 output columns (2 chunks); o
    # keeps all 6 rank-rows over its 8 inputs and 8 outputs (2 chunks each).
    view = lora_view(CFG, 4)
    adapter = random_adapter(CFG, {(0, "q_proj"): 6, (0, "o_proj"): 6}, np.random.default_rng(0))
    layout = plan_layout(adapter, view, PAGE_SIZE)
    q, o = layout.modules["q_proj"], layout.modules["o_proj"]
    assert (q.a_rank, q.b_rank, o.a_rank, o.b_rank) == (2, 8, 6, 6)
    assert (q.b_offset - q.a_offset, o.a_offset - q.b_offset, o.b_offset - o.a_offset) == (2 * 8, 8 * 2, 6 * 2)
    assert layout.num_rows == 16 + 16 + 12 + 12
