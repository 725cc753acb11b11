"""Unified Paging: one pool, one free list, two kinds of owner (KV caches and adapters)."""
import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from conftest import ADAPTERS, TINY, lora_request

from jaxserve import LLM, LoRARequest, SamplingParams
from jaxserve.config import LORA_MODULES, ModelConfig
from jaxserve.lora.peft import LoRAWeights, PeftAdapter
from jaxserve.lora.store import AdapterStore
from jaxserve.memory.device_pool import DevicePool
from jaxserve.memory.pool import ADAPTER, KV, PagePool, PoolFull

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CFG = ModelConfig("LlamaForCausalLM", vocab_size=10, hidden_size=16, intermediate_size=24,
                  num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8)


def synthetic_adapter(rank: int, modules, seed: int) -> PeftAdapter:
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(CFG.num_layers):
        for module in modules:
            fan_in, fan_out = CFG.module_shape(module)
            weights[(layer, module)] = LoRAWeights(rng.standard_normal((rank, fan_in)).astype(np.float32),
                                                   rng.standard_normal((rank, fan_out)).astype(np.float32), 1.0)
    return PeftAdapter(f"mem-{seed}", weights, rank, tuple(sorted(modules)), 0)


class PoolMachine(RuleBasedStateMachine):
    """Random interleavings of register / remove / admit / grow / finish / abort / preempt /
    prefetch / evict against the real pool, store and device pool."""
    names = Bundle("names")
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.pool = PagePool(num_pages=24, page_size=8)  # an all-module rank-8 adapter takes 9
        self.device = DevicePool(CFG.num_layers, 24, 8, CFG.kv_size, np.float32)
        self.store = AdapterStore(CFG, self.pool, self.device, max_lora_rank=16, dtype=np.float32)
        write = self.device.write_pages

        def checked_write(pages, rows):  # a load must not touch any page but its own
            before = np.asarray(self.device.array).copy()
            write(pages, rows)
            after = np.asarray(self.device.array)
            others = np.setdiff1d(np.arange(self.pool.num_pages), pages)
            np.testing.assert_array_equal(after[:, :, others], before[:, :, others])
        self.device.write_pages = checked_write
        self.live: dict[int, tuple[list[int], str | None]] = {}  # seq id -> (KV pages, adapter)
        self.counter = 0

    @rule(target=names, rank=st.sampled_from([1, 2, 4, 8]),
          modules=st.lists(st.sampled_from(LORA_MODULES), min_size=1, max_size=7, unique=True))
    def register(self, rank, modules):
        self.counter += 1
        name = f"a{self.counter}"
        self.store.register(LoRARequest(name, self.counter, "/mem"), synthetic_adapter(rank, modules, self.counter))
        return name

    @rule(name=names)
    def remove(self, name):
        if name not in self.store:
            return
        pinned = any(a == name for _, a in self.live.values())
        free_before = self.pool.num_free
        if pinned:
            with pytest.raises(RuntimeError, match="in use"):
                self.store.unregister(name)
            assert self.pool.num_free == free_before and name in self.store
        else:
            self.store.unregister(name)

    @rule(target=seqs, kv_pages=st.integers(1, 6), name=st.one_of(st.none(), names))
    def admit(self, kv_pages, name):
        if name is not None and name not in self.store:
            name = None
        need = kv_pages + (self.store.pages_to_load(name) if name else 0)
        fits = need <= self.pool.num_free + self.store.reclaimable_pages(keep=name)
        if not fits:  # the clear signal, and nothing changed
            free_before = self.pool.num_free
            with pytest.raises(PoolFull):
                self.store.make_room(need, keep=name)
            assert self.pool.num_free >= free_before
            return None
        self.store.make_room(need, keep=name)
        if name:
            self.store.acquire(name)
        self.counter += 1
        self.live[self.counter] = (self.pool.allocate(kv_pages, KV, self.counter), name)
        return self.counter

    @rule(seq=seqs)
    def grow(self, seq):
        if seq is None or seq not in self.live:
            return
        if self.pool.num_free + self.store.reclaimable_pages() >= 1:
            self.store.make_room(1)
            self.live[seq][0].extend(self.pool.allocate(1, KV, seq))

    @rule(seq=consumes(seqs), how=st.sampled_from(["finish", "abort", "preempt"]))
    def end(self, seq, how):
        # Accounting is the same for all three: pages back, adapter unpinned (a preempted
        # request re-enters the queue and is admitted again later).
        if seq is None or seq not in self.live:
            return
        pages, name = self.live.pop(seq)
        self.pool.free(pages, KV, seq)
        if name:
            self.store.release(name)

    @rule(name=names)
    def prefetch(self, name):
        if name in self.store:
            loaded = self.store.prefetch(name)
            assert loaded == self.store.is_resident(name)

    @rule()
    @precondition(lambda self: self.store.reclaimable_pages() > 0)
    def evict(self):
        self.store.make_room(self.pool.num_free + 1)

    @invariant()
    def every_page_has_one_owner(self):
        kv = [p for pages, _ in self.live.values() for p in pages]
        adapter = [p for n in self.store.names() if self.store.is_resident(n)
                   for p in self.store._adapters[n].pages]
        owned = kv + adapter
        assert len(set(owned)) == len(owned), "a page handed to two owners"
        assert len(owned) + self.pool.num_free == self.pool.num_pages, "a page leaked"
        assert self.pool.num_used(KV) == len(kv) and self.pool.num_used(ADAPTER) == len(adapter)
        for seq, (pages, name) in self.live.items():
            assert all(self.pool.owner_of(p) == (KV, seq) for p in pages)
            if name:
                assert self.store.is_resident(name), "a running request's adapter was evicted"

    @invariant()
    def reclaimable_pages_are_the_unpinned_adapters_pages(self):
        """The store keeps this total as adapters come and go: recount it from scratch."""
        unpinned = {n: len(self.store._adapters[n].pages) for n in self.store.names()
                    if self.store.is_resident(n) and self.store._adapters[n].refcount == 0}
        assert self.store.reclaimable_pages() == sum(unpinned.values())
        for name in self.store.names():
            assert self.store.reclaimable_pages(keep=name) == sum(unpinned.values()) - unpinned.get(name, 0)

    @invariant()
    def resident_adapters_hold_their_rows(self):
        pool = np.asarray(self.device.array)
        for name in self.store.names():
            stored = self.store._adapters[name]
            if stored.pages is not None:
                np.testing.assert_array_equal(pool[:, :, stored.pages], stored.rows)

    def teardown(self):
        for seq in list(self.live):
            self.end(seq, "finish")
        for name in self.store.names():
            self.store.unregister(name)
        assert self.pool.num_free == self.pool.num_pages


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_eviction_and_reload_keep_outputs_exact(golden):
    """A pool of 10 pages holds one request's KV (2 pages) and ONE 8-page adapter: A -> B -> A
    -> C -> A must evict and reload, and every output equals HF's (= everything resident)."""
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16, num_pool_pages=10)
    order = ["all-r8-rslora", "regex-r16-pattern", "all-r8-rslora", "qv-r4", "all-r8-rslora"]
    for name in order:
        entry = golden["tiny-llama"][name]
        out = llm.generate({"prompt_token_ids": entry["prompts"][2]}, GREEDY, lora_request(name))
        assert out[0].outputs[0].token_ids == entry["greedy"][2], name
    m = llm.pool_metrics()
    assert m["adapter_loads"] >= 4 and m["adapter_evictions"] >= 3
    assert m["pages_kv"] == 0 and m["pages_kv"] + m["pages_adapter"] + m["pages_free"] == 10


def test_small_pool_batch_waits_for_pages(golden):
    """All prompts x all adapters at once through a pool that holds two requests at a time: the
    loop admits what fits, evicts unpinned adapters as it goes, and stays exact."""
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16, num_pool_pages=20)
    cases = [(a, i) for a in ("base",) + ADAPTERS for i in range(4)]
    prompts = [{"prompt_token_ids": golden["tiny-llama"][a]["prompts"][i]} for a, i in cases]
    outs = llm.generate(prompts, GREEDY, [None if a == "base" else lora_request(a) for a, _ in cases])
    for (a, i), out in zip(cases, outs):
        assert out.outputs[0].token_ids == golden["tiny-llama"][a]["greedy"][i]
    assert llm.pool.num_used(KV) == 0


def test_metrics_account_for_every_byte():
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16, num_pool_pages=40)
    for name in ADAPTERS:
        llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, lora_request(name))
    m = llm.pool_metrics()
    stored = [llm.adapters._adapters[n] for n in ADAPTERS]
    assert m["adapters_registered"] == m["adapters_resident"] == 3 and m["adapters_pinned"] == 0
    assert m["adapter_loads"] == 3 and m["adapter_evictions"] == 0
    assert m["pages_adapter"] == sum(s.layout.num_pages for s in stored)
    assert m["adapter_bytes_loaded"] == m["adapter_host_bytes"] == sum(s.rows.nbytes for s in stored)
    assert m["adapter_load_seconds"] > 0


def test_adapter_in_use_cannot_be_removed():
    pool = PagePool(8, 4)
    store = AdapterStore(CFG, pool, DevicePool(2, 8, 4, CFG.kv_size, np.float32), 16, np.float32)
    store.register(LoRARequest("x", 1, "/mem"), synthetic_adapter(4, ["q_proj"], 0))
    store.acquire("x")
    with pytest.raises(RuntimeError, match="'x' is in use by 1 running request"):
        store.unregister("x")
    assert store.is_resident("x")
    store.release("x")
    store.unregister("x")
    assert pool.num_free == 8


def test_only_pinned_pages_left_is_a_clear_signal():
    pool = PagePool(12, 8)
    store = AdapterStore(CFG, pool, DevicePool(2, 12, 8, CFG.kv_size, np.float32), 16, np.float32)
    store.register(LoRARequest("x", 1, "/mem"), synthetic_adapter(8, LORA_MODULES, 0))
    pages = store.pages_of("x")
    assert pages == 9  # 136 rank-rows of 16-wide pool rows, 16 rows a page
    store.acquire("x")
    with pytest.raises(PoolFull, match="4 pages needed; 3 free"):
        store.make_room(4)
    with pytest.raises(PoolFull, match="asked for 4 pages for kv 's'; 3 of 12 are free"):
        pool.allocate(4, KV, "s")
    assert pool.num_free == 3 and store.is_resident("x")


def test_adapter_larger_than_the_pool_is_rejected_at_registration():
    llm = LLM(str(TINY), max_model_len=16, max_lora_rank=16, num_pool_pages=4)
    with pytest.raises(ValueError, match="'all-r8-rslora' needs 8 pages; allowed: at most the whole pool, 4") as err:
        llm.add_lora(lora_request("all-r8-rslora"))
    assert not isinstance(err.value, PoolFull)  # nothing to wait for: it never fits
    assert llm.list_loras() == []


def test_failed_adapter_copy_leaves_it_cleanly_unloaded(golden, monkeypatch):
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16, num_pool_pages=40)
    entry = golden["tiny-llama"]["qv-r4"]
    original = llm.device_pool.write_pages

    def broken(pages, rows):
        raise RuntimeError("device copy failed")
    monkeypatch.setattr(llm.device_pool, "write_pages", broken)
    with pytest.raises(RuntimeError, match="device copy failed"):
        llm.generate({"prompt_token_ids": entry["prompts"][1]}, GREEDY, lora_request("qv-r4"))
    assert not llm.adapters.is_resident("qv-r4") and llm.pool.num_free == 40
    monkeypatch.setattr(llm.device_pool, "write_pages", original)
    out = llm.generate({"prompt_token_ids": entry["prompts"][1]}, GREEDY, lora_request("qv-r4"))
    assert out[0].outputs[0].token_ids == entry["greedy"][1]
    llm.remove_lora("qv-r4")  # not left pinned either
    assert llm.pool.num_free == 40


def test_one_bad_request_registers_no_adapter(golden):
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16, num_pool_pages=4)
    with pytest.raises(ValueError, match="'all-r8-rslora' needs 8 pages"):  # qv-r4 (1 page) would fit
        llm.generate([{"prompt_token_ids": [1, 2]}] * 2, GREEDY, [lora_request("qv-r4"), lora_request("all-r8-rslora")])
    assert llm.list_loras() == []
    with pytest.raises(ValueError, match="non-empty"):  # a bad prompt beside a good new adapter
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": []}], GREEDY, lora_request("qv-r4"))
    assert llm.list_loras() == []


def test_store_rejects_duplicates_and_ranks_over_its_limit():
    pool = PagePool(24, 8)
    store = AdapterStore(CFG, pool, DevicePool(2, 24, 8, CFG.kv_size, np.float32), 4, np.float32)
    store.register(LoRARequest("x", 1, "/mem"), synthetic_adapter(4, ["q_proj"], 0))
    with pytest.raises(ValueError, match="'x' is already registered"):
        store.register(LoRARequest("x", 1, "/mem"), synthetic_adapter(2, ["q_proj"], 1))
    with pytest.raises(ValueError, match="rank 8; allowed: at most max_lora_rank=4"):
        store.register(LoRARequest("y", 2, "/mem"), synthetic_adapter(8, ["q_proj"], 2))
    assert store.names() == ["x"]


def test_many_adapter_names_over_time_keep_the_runner_table_bounded(golden):
    """60 adapter names (three folders, 20 names each) served in waves through max_num_seqs 3:
    the runner's name table is rebuilt from the slots' own names when it fills, every request
    still gets its own adapter's golden tokens, and the table never holds more than
    2 x max_num_seqs + 1 names."""
    from jaxserve import LoRARequest
    llm = LLM(str(TINY), max_model_len=64, max_lora_rank=16, max_num_seqs=3, max_loras=3)
    folders = ("qv-r4", "all-r8-rslora", "regex-r16-pattern")
    sizes = []
    for wave in range(10):
        names = [(f"{folders[i % 3]}-{wave}-{i}", folders[i % 3]) for i in range(6)]
        requests = [LoRARequest(name, 100 * wave + i + 1, str(TINY / "adapters" / folder))
                    for i, (name, folder) in enumerate(names)]
        prompts = [{"prompt_token_ids": golden["tiny-llama"][folder]["prompts"][i % 4]} for i, (_, folder)
                   in enumerate(names)]
        outputs = llm.generate(prompts, GREEDY, requests)
        for i, ((_, folder), out) in enumerate(zip(names, outputs)):
            assert out.outputs[0].token_ids == golden["tiny-llama"][folder]["greedy"][i % 4], (wave, i)
        sizes.append(len(llm.engine.kv.slots.adapter_names))
    assert max(sizes) <= 2 * 3 + 1 and len(llm.adapters.names()) == 60
