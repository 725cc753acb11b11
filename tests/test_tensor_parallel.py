"""Tensor parallelism on 4 CPU devices (tests/tp_worker.py, in a process of its own: the device
count is fixed when jax is imported): TP 1, 2 and 4 against HF's golden outputs and each other,
the head layout's padding cases, the step's collectives."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from test_golden_hf import LOGPROB_TOL

from jaxserve.distributed.heads import head_plan

HERE = Path(__file__).parent
RANDOM_3KV = {"architectures": ["LlamaForCausalLM"], "vocab_size": 130, "hidden_size": 48, "intermediate_size": 90,
              "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp")
    (folder / "config.json").write_text(json.dumps(RANDOM_3KV))
    out = folder / "result.json"
    proc = subprocess.run([sys.executable, str(HERE / "tp_worker.py"), str(out), str(folder)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_same(got, want, tol=LOGPROB_TOL):
    for g, w in zip(got, want, strict=True):
        assert g["ids"] == w["ids"]
        for gs, ws in zip(g["top5"], w["top5"], strict=True):
            assert [t for t, _ in gs] == [t for t, _ in ws]
            np.testing.assert_allclose([lp for _, lp in gs], [lp for _, lp in ws], atol=tol)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_every_tp_size_matches_hf(tp, golden, model):
    # tiny-llama: 4 query heads over 2 KV heads (TP 4 replicates each KV head twice);
    # tiny-qwen2: q/k/v biases, ONE KV head (replicated on every device at TP 2 and 4).
    want = golden[model]["base"]
    for size, run in tp["runs"][model].items():
        got = run["outputs"]
        assert [g["ids"] for g in got] == want["greedy"], f"TP {size}"
        for g, top5 in zip(got, want["top5"]):
            for gs, ws in zip(g["top5"], top5):
                assert [t for t, _ in gs] == [t for t, _ in ws], f"TP {size}"
                np.testing.assert_allclose([lp for _, lp in gs], [lp for _, lp in ws], atol=LOGPROB_TOL)


def test_padded_heads_give_the_unsplit_model(tp):
    # 6 query heads over 3 KV heads: no TP size divides 3, so dummy groups are added (a zero KV
    # head and its zero query heads), the MLP's 90 columns are padded to 92 and the vocabulary's
    # 130 rows to 132 at TP 4.
    runs = tp["runs"]["random-3kv"]
    for size in ("2", "4"):
        assert_same(runs[size]["outputs"], runs["1"]["outputs"])


def test_chunked_prefill_and_preemption_under_tp(tp, golden):
    runs = tp["runs"]["chunked-preempted"]
    for size, run in runs.items():
        assert run["preemptions"] > 0, f"TP {size}: the pool was meant to force preemption"
        assert [g["ids"] for g in run["outputs"]] == golden["tiny-llama"]["base"]["greedy"] * 3, f"TP {size}"
    assert tp["devices"] == 4


def test_params_read_straight_into_their_shards_equal_the_whole_split(tp):
    # HF folders (float32 and bfloat16 serving; a bfloat16 checkpoint with padded heads, MLP and
    # vocabulary) and a GGUF-style params cache, at TP 2 and 4: every param, bit for bit.
    assert len(tp["restore"]) == 3 * 2 * 3
    for case, equal, same_sharding in tp["restore"]:
        assert equal and same_sharding, case


def test_no_compile_after_warmup_under_tp(tp):
    assert tp["compiles_after_warmup"] == 0


def test_pallas_kernels_under_tp(tp, golden):
    for size, run in tp["runs"]["pallas"].items():
        assert [g["ids"] for g in run["outputs"]] == golden["tiny-llama"]["base"]["greedy"], f"TP {size}"


def test_step_communicates_what_megatron_says(tp):
    # o and down are row-parallel, each one all-reduce of the [T, hidden] partial sums (T = 16
    # tokens, hidden 64, float32; the layers run under one scan, so the loop body holds the two);
    # the vocabulary-split embedding adds one all-reduce of [T, hidden] and lm_head one all-gather
    # of the logits [16 rows, 384]. Nothing else moves.
    config = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
    ops = sorted(tuple(c) for c in tp["collectives"])
    assert ops == sorted([(f"f32[16,{config['hidden_size']}]", "all-reduce")] * 3
                         + [(f"f32[16,{config['vocab_size']}]", "all-gather")]), ops


def test_lora_adds_s_lora_s_collectives_one_per_lora_op(tp):
    # S-LoRA's scheme at TP 2 for a batch of T = 16 tokens (R = max_lora_rank 16): column-parallel
    # modules hold a share of the rank (R / 2 = 8 rank-rows each), so their [T, 8] shrinks are
    # all-gathered into [T, 2 devices, 8] — q/k/v together (3 x 8), gate/up (2 x 8); row-parallel
    # ones (o, down) hold a slice of the inputs, so their [T, R] partial shrinks are all-reduced.
    # Nothing else is added: B's slices are the device's output columns, and the row modules'
    # deltas ride the base all-reduce.
    base = [tuple(c) for c in tp["collectives"]]
    extra = [tuple(c) for c in tp["lora_collectives"]]
    for c in base:
        extra.remove(c)
    assert sorted(extra) == sorted([("f32[16,2,24]", "all-gather"), ("f32[16,2,16]", "all-gather"),
                                    ("f32[16,16]", "all-reduce"), ("f32[16,16]", "all-reduce")]), extra


def test_vllm_scheme_adds_no_collective(tp):
    # vLLM's default keeps A whole for column modules and B^T whole for row ones: no collective
    # of LoRA's own (the benchmark's comparison: more memory per device, no extra traffic).
    assert sorted(map(tuple, tp["lora_collectives_vllm"])) == sorted(map(tuple, tp["collectives"]))


def test_adapters_evicted_and_reloaded_under_tp_keep_every_devices_rows(tp, golden):
    run = tp["evict"]
    assert run["evictions"] > 0 and run["loads"] > len({name for name, _ in run["cases"]}), run
    assert run["intact"] and all(run["intact"])
    for (name, i), out in zip(run["cases"], run["outputs"]):
        assert out["ids"] == golden["tiny-llama"][name]["greedy"][i], (name, i)


@pytest.mark.parametrize("scheme", ["lora", "lora_vllm"])
def test_mixed_adapters_in_one_batch_match_hf_at_every_tp_size(tp, golden, scheme):
    # Each device holds its part of every adapter (S-LoRA's layout, or vLLM's: lora_layout.py).
    for size, run in tp[scheme].items():
        seen = {}
        for name, out in zip(run["names"], run["outputs"]):
            k = seen[name] = seen.get(name, -1) + 1
            want = golden["tiny-llama"][name]
            assert out["ids"] == want["greedy"][k], (size, name, k)
            for gs, ws in zip(out["top5"], want["top5"][k]):
                assert [t for t, _ in gs] == [t for t, _ in ws], (size, name, k)
                np.testing.assert_allclose([lp for _, lp in gs], [lp for _, lp in ws], atol=LOGPROB_TOL)


@pytest.mark.parametrize("heads,kv,n", [(4, 2, 2), (4, 2, 4), (4, 1, 4), (6, 3, 2), (6, 3, 4), (9, 3, 4),
                                        (32, 8, 4), (12, 2, 8), (6, 2, 4)])
def test_head_plan_keeps_every_query_head_with_its_kv_head(heads, kv, n):
    plan = head_plan(heads, kv, n)
    q, k = np.array(plan.q_src), np.array(plan.kv_src)
    assert len(q) % n == 0 and len(k) % n == 0 and len(q) % len(k) == 0
    group = len(q) // len(k)
    assert sorted(q[q >= 0].tolist()) == list(range(heads))      # every real head exactly once
    assert sorted(set(k[k >= 0].tolist())) == list(range(kv))
    for i, src in enumerate(q):
        if src >= 0:   # laid-out head i reads laid-out KV head i // group: a copy of its own
            assert k[i // group] == src // (heads // kv)
    per_device = len(q) // n, len(k) // n
    assert per_device[0] == group * per_device[1]


@pytest.mark.parametrize("size", [2, 0])
def test_tp_size_the_devices_cannot_give_is_a_clear_error(size):
    # this process has one CPU device (the worker above makes four for itself)
    from conftest import TINY
    from jaxserve import LLM
    with pytest.raises(ValueError, match=f"tensor_parallel_size={size}"):
        LLM(str(TINY), tensor_parallel_size=size)


def test_padded_baseline_under_tp_is_a_clear_error():
    from jaxserve.config import EngineConfig
    with pytest.raises(ValueError, match="adapter_memory='padded' is invalid with tensor_parallel_size=2"):
        EngineConfig(model="tiny", tensor_parallel_size=2, adapter_memory="padded")
