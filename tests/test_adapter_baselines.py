"""The baselines `jaxserve bench serve --compare` runs against unified paging — adapters in a
region set apart (separate memory), padded to the largest rank in fixed slots, merged into the
base weights — and the random-weight models of S-LoRA's settings. Each baseline must give the
normal engine's greedy tokens: only where adapters live (and what that costs) may differ."""
import numpy as np
import pytest

from conftest import ADAPTERS, TINY, lora_request

from jaxserve import LLM, SamplingParams
from jaxserve.config import ATTN_MODULES, LORA_MODULES, ModelConfig
from jaxserve.lora.layout import padded_to_rank, plan_layout, slot_pages
from jaxserve.lora.merge import merge_adapter
from jaxserve.lora.peft import load_peft_adapter
from jaxserve.memory.pool import ADAPTER, KV, PagePool, PoolFull
from jaxserve.model.random_weights import CONFIGS, RandomTensors, random_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
CFG = ModelConfig.from_hf(random_config(f"random:{TINY}"))


def test_a_split_pool_hands_each_kind_its_own_region():
    pool = PagePool(10, 4, adapter_pages=3)
    assert (pool.capacity(ADAPTER), pool.capacity(KV), pool.num_free) == (3, 7, 10)
    adapter = pool.allocate(3, ADAPTER, "a")
    kv = pool.allocate(5, KV, "s")
    assert sorted(adapter) == [0, 1, 2] and min(kv) >= 3
    with pytest.raises(PoolFull, match="1 pages for adapter 'b'; 0 of 3 are free"):
        pool.allocate(1, ADAPTER, "b")  # KV pages are free, but not for adapters
    assert (pool.free_for(KV), pool.free_for(ADAPTER), pool.num_free) == (2, 0, 2)
    pool.free(adapter, ADAPTER, "a")
    assert (pool.free_for(KV), pool.free_for(ADAPTER)) == (2, 3)  # back to its own region
    unified = PagePool(10, 4)
    unified.allocate(4, ADAPTER, "a")
    assert unified.free_for(KV) == unified.free_for(ADAPTER) == unified.num_free == 6


@pytest.mark.parametrize("pages", [0, 10, 11])
def test_a_region_must_leave_room_for_kv(pages):
    with pytest.raises(ValueError, match=f"adapter_pages={pages} is invalid; allowed: None .* or 1 to 9"):
        PagePool(10, 4, adapter_pages=pages)


@pytest.mark.parametrize("name", ADAPTERS)
def test_padding_to_the_largest_rank_keeps_every_delta(name):
    adapter = load_peft_adapter(TINY / "adapters" / name, CFG, 16)
    padded = padded_to_rank(adapter, 16, LORA_MODULES, CFG)
    assert padded.max_rank == 16 and len(padded.weights) == CFG.num_layers * len(LORA_MODULES)
    for (layer, module), w in padded.weights.items():
        own = adapter.weights.get((layer, module))
        want = (np.float64(own.a).T @ np.float64(own.b) if own is not None
                else np.zeros(CFG.module_shape(module)))
        np.testing.assert_allclose(np.float64(w.a).T @ np.float64(w.b), want, atol=1e-6)
    assert plan_layout(padded, CFG, 16).num_pages == slot_pages(CFG, 16, LORA_MODULES, 16)
    assert plan_layout(adapter, CFG, 16).num_pages < slot_pages(CFG, 16, LORA_MODULES, 16)


def test_merging_adds_a_transpose_b_to_each_adapted_projection():
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16)
    adapter = load_peft_adapter(TINY / "adapters" / "all-r8-rslora", CFG, 16)
    base = llm.engine.runner.params
    merged = merge_adapter(base, adapter, CFG)
    for (layer, module), w in adapter.weights.items():
        key = module.removesuffix("_proj")
        want = np.float64(base["layers"][key][layer]) + np.float64(w.a).T @ np.float64(w.b)
        np.testing.assert_allclose(np.asarray(merged["layers"][key][layer]), want, rtol=1e-5, atol=1e-5)
    assert merged["embed"] is base["embed"] and merge_adapter(base, None, CFG) is base
    np.testing.assert_array_equal(np.asarray(base["layers"]["q"]), np.asarray(llm.engine.runner.params["layers"]["q"]))

    # Served merged (no LoRA at run time) = served through the adapter's pages, greedy.
    prompts = [{"prompt_token_ids": [5 + i, 17, 33, 2 * i + 9]} for i in range(3)]
    through_lora = llm.generate(prompts, GREEDY, lora_request("all-r8-rslora"), use_tqdm=False)
    llm.engine.runner.params = merged
    merged_out = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in merged_out] == [o.outputs[0].token_ids for o in through_lora]


def test_separate_and_padded_memory_give_the_unified_pools_tokens_where_they_say():
    prompts = [{"prompt_token_ids": [3 + i, 9, 11 + i, 40, 2 * i + 5][: 3 + i % 3]} for i in range(9)]
    loras = [lora_request(ADAPTERS[i % 3]) if i % 4 else None for i in range(9)]
    tokens = {}
    for memory in ("unified", "separate", "padded"):
        llm = LLM(str(TINY), max_model_len=64, max_loras=3, max_lora_rank=16, num_pool_pages=120,
                  adapter_memory=memory)
        outputs = llm.generate(prompts, GREEDY, loras, use_tqdm=False)
        tokens[memory] = [o.outputs[0].token_ids for o in outputs]
        engine, slot = llm.engine, slot_pages(CFG, 16, LORA_MODULES, 16)
        if memory == "unified":
            assert engine.pool.capacity(ADAPTER) == engine.pool.capacity(KV) == 120
            continue
        region = engine.pool.capacity(ADAPTER)
        assert region == 3 * slot and engine.pool.capacity(KV) == 120 - region  # max_loras slots
        for name in ADAPTERS:
            pages = engine.adapters._get(name).pages
            assert pages is not None and max(pages) < region, (memory, name)
            assert (len(pages) == slot) == (memory == "padded"), (memory, name)
    assert tokens["separate"] == tokens["unified"] and tokens["padded"] == tokens["unified"]


def test_a_region_larger_than_the_pool_is_a_clear_error():
    with pytest.raises(ValueError, match=r"adapter_memory='padded' sets 512 pages apart for adapters \(max_loras=32 "
                                         r"slots of 16 pages\) but the pool has 100"):
        LLM(str(TINY), max_model_len=64, max_lora_rank=16, num_pool_pages=100, adapter_memory="padded")
    with pytest.raises(ValueError, match="adapter_memory='paged' is invalid; allowed: unified, separate, padded"):
        LLM(str(TINY), adapter_memory="paged")


def test_random_models_have_s_loras_shapes_and_run():
    llama7b = ModelConfig.from_hf(CONFIGS["llama-7b"])
    params = sum(np.prod(s) for s in RandomTensors(llama7b, np.float32)._shapes.values())
    assert 6.7e9 < params < 6.8e9  # Llama-2-7B: 6.74 B parameters
    assert ModelConfig.from_hf(CONFIGS["llama-13b"]).num_layers == 40
    tensors = RandomTensors(CFG, np.float32, seed=3)
    first = np.asarray(tensors["model.layers.1.mlp.up_proj.weight"])
    assert first.shape == (CFG.intermediate_size, CFG.hidden_size) and 0.015 < first.std() < 0.025
    np.testing.assert_array_equal(np.asarray(tensors["model.layers.1.mlp.up_proj.weight"]), first)
    assert not np.array_equal(np.asarray(tensors["model.layers.0.mlp.up_proj.weight"]), first)
    llm = LLM(f"random:{TINY}", max_model_len=64)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and llm.engine.tokenizer is None
    with pytest.raises(FileNotFoundError, match="model='random:llama-99b' is invalid; allowed: random:llama-7b"):
        LLM("random:llama-99b")


def test_attention_only_adapters_pad_to_attention_slots():
    slot_all, slot_attn = (slot_pages(CFG, 16, modules, 16) for modules in (LORA_MODULES, ATTN_MODULES))
    assert slot_attn < slot_all
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16, lora_modules=ATTN_MODULES, num_pool_pages=300,
              adapter_memory="padded", max_loras=2)
    llm.generate([{"prompt_token_ids": [4, 5]}], GREEDY, lora_request("qv-r4"), use_tqdm=False)
    assert llm.engine.adapters.pages_of("qv-r4") == slot_attn and llm.engine.pool.capacity(ADAPTER) == 2 * slot_attn
