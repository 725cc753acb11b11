"""Runs in its own process (tests/test_tensor_parallel.py): XLA must see 4 CPU devices, which is
fixed when jax is imported. Writes one JSON of everything the tests assert on:

- "runs": per case and tensor_parallel_size, each request's token ids and top-5 logprobs
  (cases: the tiny HF fixtures on their golden prompts; a random model with 3 KV heads, which
  no TP size divides; chunked prefill with preemption);
- "collectives": the compiled step's all-reduce / all-gather / others (shape of each) at TP 2;
- "lora", "lora_vllm": the fixture adapters under S-LoRA's and vLLM's schemes; "evict": load /
  evict / reload; "restore": sharded start-up against the whole params split;
- "compiles_after_warmup".
"""
from __future__ import annotations

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAXSERVE_WARMUP"] = "0"

from conftest import ADAPTERS, FIXTURES, TINY, lora_request  # noqa: E402  (after XLA_FLAGS)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
SIZES = (1, 2, 4)


def generate(llm, prompts, loras=None):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, loras, use_tqdm=False)
    return [{"ids": o.outputs[0].token_ids,
             "top5": [sorted(step.items(), key=lambda kv: -kv[1])[:5] for step in o.outputs[0].logprobs]}
            for o in outs]


def collectives(llm, lora: bool = False) -> list[tuple[str, str]]:
    """(op, result shape) of every collective in the compiled step for a 16-token batch (with
    LoRA: every token through an adapter, the tables of max_loras adapters)."""
    from jaxserve.packed import PackedBatch
    runner = llm.engine.runner
    batch = PackedBatch.empty(16, runner.max_num_seqs, runner.page_buckets[-1])
    plan = runner.plan(16, np.zeros(16, np.int32) if lora else None)
    tables = runner.adapters.stacked_tables([], runner.max_loras) if lora else (None, None)
    hlo = runner._forward.func.lower(runner.params, runner.device_pool.array, batch, runner._last_tokens, *tables,
                                     plan=plan, num_logits=runner.num_logits(16),
                                     **runner._forward.keywords).compile().as_text()
    found = re.findall(r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", hlo)
    return [(re.sub(r"\{.*\}", "", shape), op) for shape, op in found]  # (without the layout)


def restore_checks(random_config_folder: str) -> list:
    """Sharded start-up: params read from files straight into their shards must equal the whole
    params laid out and split (TensorParallel.place) — for HF folders (float32 and bfloat16
    serving; a random model with 3 KV heads written as a bfloat16 checkpoint: dummy groups, the
    MLP and vocabulary padded) and for a GGUF-style params cache. [(case, equal, same sharding)]."""
    import shutil
    import tempfile
    from pathlib import Path

    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from jaxserve.config import ModelConfig
    from jaxserve.distributed.sharded_load import CachedParams, HFParams, restore_params
    from jaxserve.distributed.tensor_parallel import TensorParallel
    from jaxserve.model import random_weights, weights

    folder = Path(tempfile.mkdtemp())
    random_folder = folder / "random-3kv"
    random_folder.mkdir()
    shutil.copy(Path(random_config_folder) / "config.json", random_folder)
    cfg3 = ModelConfig.from_hf(weights.read_config(random_folder))
    tensors = random_weights.RandomTensors(cfg3, jnp.bfloat16, seed=3)
    save_file({k: np.asarray(tensors[k]) for k in tensors}, str(random_folder / "model.safetensors"))
    checks = []
    for path in (TINY, FIXTURES / "tiny-qwen2", random_folder):
        cfg = ModelConfig.from_hf(weights.read_config(path))
        whole32 = weights.hf_to_params(cfg, weights.SafetensorsFolder(path), jnp.float32)
        cache = folder / f"{path.name}.safetensors"
        save_file(weights._flatten(whole32), str(cache))
        for size in (2, 4):
            tp = TensorParallel.create(size, cfg)
            for dtype, source in ((jnp.float32, HFParams(path, cfg)), (jnp.bfloat16, HFParams(path, cfg)),
                                  (jnp.float32, CachedParams(cache))):
                whole = weights.hf_to_params(cfg, weights.SafetensorsFolder(path), dtype)
                want = jax.tree_util.tree_map_with_path(lambda p, w: tp.place(p[-1].key, w, cfg), whole)
                got = restore_params(tp, source, cfg, dtype)
                pairs = list(zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True))
                case = f"{path.name} TP {size} {jnp.dtype(dtype).name} {type(source).__name__}"
                checks.append((case, all(g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))
                                         for g, w in pairs),
                               all(g.sharding.is_equivalent_to(w.sharding, g.ndim) for g, w in pairs)))
    return checks


def main(out_path: str, random_model: str) -> None:
    golden = json.loads((FIXTURES / "golden.json").read_text())
    result = {"runs": {}, "devices": None}
    cases = [("tiny-llama", str(TINY), golden["tiny-llama"]["base"]["prompts"], {}),
             ("tiny-qwen2", str(FIXTURES / "tiny-qwen2"), golden["tiny-qwen2"]["base"]["prompts"], {}),
             ("random-3kv", "random:" + random_model, [[5, 6, 7], list(range(1, 40))], {}),
             # 16-token steps chunk the 33-token prompt; 16 pages of 4 tokens cannot hold the
             # golden prompts three times over (they need 81): some are preempted and recomputed.
             ("chunked-preempted", str(TINY), golden["tiny-llama"]["base"]["prompts"] * 3,
              dict(max_num_batched_tokens=16, max_num_seqs=8, page_size=4, num_pool_pages=16)),
             # the Pallas kernels (interpret mode) run per device under shard_map like the XLA ops
             ("pallas", str(TINY), golden["tiny-llama"]["base"]["prompts"], dict(kernels="pallas-interpret"))]
    for name, model, prompts, options in cases:
        result["runs"][name] = {}
        for size in SIZES:
            llm = LLM(model, max_model_len=64, tensor_parallel_size=size, **options)
            result["runs"][name][size] = {"outputs": generate(llm, prompts),
                                          "preemptions": llm.engine.num_preemptions}
            if name == "tiny-llama" and size == 2:
                result["collectives"] = collectives(llm)
                result["lora_collectives"] = collectives(llm, lora=True)
            del llm
    # LoRA under TP: the fixture adapters (ranks 4/8/16; q/v, all seven modules, a regex
    # pattern) and the base model mixed in one batch, at every size.
    # The same under vLLM's scheme (A whole for column modules, B whole for row ones), the
    # benchmark's comparison, at TP 2 and 4, and its step's collectives at TP 2.
    from jaxserve.distributed import tensor_parallel
    for key, scheme, sizes in (("lora", "s-lora", SIZES), ("lora_vllm", "vllm", (2, 4))):
        tensor_parallel.LORA_SCHEME = scheme
        result[key] = {}
        for size in sizes:
            llm = LLM(str(TINY), max_model_len=64, tensor_parallel_size=size, max_loras=4, max_lora_rank=16)
            names = ["base", *ADAPTERS]
            cases = [(a, p) for a in names for p in golden["tiny-llama"][a]["prompts"]]
            outs = generate(llm, [p for _, p in cases], [None if a == "base" else lora_request(a) for a, _ in cases])
            result[key][size] = {"names": [a for a, _ in cases], "outputs": outs,
                                 "loads": llm.engine.adapters.metrics()["adapter_loads"]}
            if scheme == "vllm" and size == 2:
                result["lora_collectives_vllm"] = collectives(llm, lora=True)
            del llm
    tensor_parallel.LORA_SCHEME = "s-lora"
    # Load / evict / reload under TP: one adapter per batch in a pool with room for few, the
    # Pallas kernels (interpreted) at TP 2; then every resident adapter's pages, read back from
    # all devices, must equal its host copy.
    llm = LLM(str(TINY), max_model_len=64, tensor_parallel_size=2, max_loras=1, max_lora_rank=16, num_pool_pages=12,
              kernels="pallas-interpret")
    cases = [(a, i) for a in [*ADAPTERS, *ADAPTERS] for i in (0, 1)]
    outs = [generate(llm, [golden["tiny-llama"][a]["prompts"][i]], [lora_request(a)])[0] for a, i in cases]
    store = llm.engine.adapters
    pool = np.asarray(llm.engine.device_pool.array)
    intact = [bool(np.array_equal(pool[:, :, s.pages], s.rows)) for s in store._adapters.values() if s.pages]
    result["evict"] = {"cases": cases, "outputs": outs, "intact": intact,
                       "loads": store.loads, "evictions": store.evictions}
    del llm
    result["restore"] = restore_checks(random_model)
    # Warm-up compiles every variant for the mesh: serving then compiles nothing (the step's
    # inputs and the sampler's logits are where warm-up assumed: replicated over the devices).
    from jaxserve import runtime
    llm = LLM(str(TINY), max_model_len=64, tensor_parallel_size=2, max_num_seqs=16, max_num_batched_tokens=64,
              warmup=True)
    before = runtime.backend_compiles()
    rng = np.random.default_rng(0)
    params = [SamplingParams(temperature=t, top_k=k, logprobs=lp, max_tokens=int(rng.integers(1, 12)), ignore_eos=True)
              for t, k, lp in [(0.0, -1, None), (0.7, 5, 3), (0.7, -1, None), (0.0, -1, 2)] * 3]
    llm.generate([{"prompt_token_ids": rng.integers(3, 380, rng.integers(1, 40)).tolist()} for _ in params],
                 params, use_tqdm=False)
    result["compiles_after_warmup"] = runtime.backend_compiles() - before
    result["devices"] = len(jax.devices())
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
