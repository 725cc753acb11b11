"""Tests for jaxserve.lora.peft: loading/validating PEFT LoRA adapter folders (no torch needed)."""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from jaxserve.config import LORA_MODULES, ModelConfig
from jaxserve.lora.peft import AdapterError, LoRAWeights, PeftAdapter, load_peft_adapter

# hidden 32, q 4*12=48, kv 2*12=24, intermediate 40: every in/out size differs from its neighbours.
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=32, intermediate_size=40,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12)
MAX_RANK = 16
PARENT = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in LORA_MODULES}
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "tiny-llama"


def tensor_name(layer, module, ab, fmt="base_model.model.model.layers.{l}.{p}.{m}.lora_{ab}.weight"):
    return fmt.format(l=layer, p=PARENT[module], m=module, ab=ab)


def write_adapter(folder, cfg=CFG, *, r=4, alpha=8, target_modules=("q_proj", "v_proj"), modules=None,
                  ranks=None, dtype=np.float32, name_fmt=None, seed=0, extra_tensors=None,
                  drop_tensors=(), **config):
    """Write a valid PEFT LoRA adapter folder; return {(layer, module): (A, B)} as written.

    modules: the (layer, module) pairs that get tensors (default: every layer of each listed
    target module name). ranks: {(layer, module): rank} overriding r.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if modules is None:
        names = LORA_MODULES if target_modules == "all-linear" else target_modules
        modules = [(l, m) for l in range(cfg.num_layers) for m in names]
    rng = np.random.default_rng(seed)
    tensors, raw = {}, {}
    for layer, module in modules:
        rank = (ranks or {}).get((layer, module), r)
        in_f, out_f = cfg.module_shape(module)
        a = rng.standard_normal((rank, in_f)).astype(dtype)
        b = rng.standard_normal((out_f, rank)).astype(dtype)
        kw = {} if name_fmt is None else {"fmt": name_fmt}
        tensors[tensor_name(layer, module, "A", **kw)] = a
        tensors[tensor_name(layer, module, "B", **kw)] = b
        raw[(layer, module)] = (a, b)
    tensors.update(extra_tensors or {})
    for name in drop_tensors:
        del tensors[name]
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "target_modules": list(target_modules) if not isinstance(target_modules, str) else target_modules,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None}
    conf.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    return raw


def expected_b(b, scaling):
    return (b.astype(np.float64).T * scaling).astype(np.float32)


def check_weights(ad: PeftAdapter, raw, scalings):
    assert set(ad.weights) == set(raw)
    for key, (a, b) in raw.items():
        w = ad.weights[key]
        assert isinstance(w, LoRAWeights)
        assert w.a.dtype == np.float32 and w.b.dtype == np.float32
        assert w.scaling == pytest.approx(scalings[key], rel=1e-12)
        np.testing.assert_array_equal(w.a, a.astype(np.float32))
        np.testing.assert_array_equal(w.b, expected_b(b, w.scaling))
        assert w.a.shape == (a.shape[0], CFG.module_shape(key[1])[0])
        assert w.b.shape == (a.shape[0], CFG.module_shape(key[1])[1])


# ------------------------------------------------------------------------------------------ valid


def test_list_targets(tmp_path):
    raw = write_adapter(tmp_path / "qv", r=4, alpha=8)
    ad = load_peft_adapter(tmp_path / "qv", CFG, MAX_RANK)
    assert ad.path == str(tmp_path / "qv")
    assert ad.target_modules == ("q_proj", "v_proj")
    assert ad.max_rank == 4
    check_weights(ad, raw, {k: 8 / 4 for k in raw})
    assert ad.nbytes == sum(w.a.nbytes + w.b.nbytes for w in ad.weights.values())
    assert ad.nbytes == 2 * 4 * 4 * ((32 + 48) + (32 + 24))
    w = ad.weights[(0, "q_proj")]
    assert not w.a.flags.writeable and not w.b.flags.writeable


def test_list_targets_full_paths_and_float_alpha(tmp_path):
    # PEFT saves all-linear on small models as full module paths; entries match by equality/suffix.
    targets = ["model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    raw = write_adapter(tmp_path / "a", r=2, alpha=3.5, target_modules=targets,
                        modules=[(0, "q_proj"), (1, "down_proj")])
    ad = load_peft_adapter(tmp_path / "a", CFG, MAX_RANK)
    assert ad.target_modules == ("down_proj", "q_proj")
    check_weights(ad, raw, {k: 3.5 / 2 for k in raw})


def test_regex_targets_full_match(tmp_path):
    rx = r"model\.layers\.\d+\.self_attn\.(q|k)_proj"
    raw = write_adapter(tmp_path / "rx", r=8, alpha=16, target_modules=rx,
                        modules=[(l, m) for l in range(2) for m in ("q_proj", "k_proj")])
    ad = load_peft_adapter(tmp_path / "rx", CFG, MAX_RANK)
    assert ad.target_modules == ("k_proj", "q_proj")
    check_weights(ad, raw, {k: 2.0 for k in raw})


def test_regex_is_full_match_not_search(tmp_path):
    # As a *string*, "q_proj" is a regex that must match the whole path, so it selects nothing.
    write_adapter(tmp_path / "rx", target_modules="q_proj", modules=[(0, "q_proj")])
    with pytest.raises(AdapterError, match="matches no module"):
        load_peft_adapter(tmp_path / "rx", CFG, MAX_RANK)


@pytest.mark.parametrize("keyword", ["all-linear", "ALL-LINEAR"])
def test_all_linear(tmp_path, keyword):
    raw = write_adapter(tmp_path / "al", r=8, alpha=4, target_modules="all-linear")
    conf = json.loads((tmp_path / "al" / "adapter_config.json").read_text())
    conf["target_modules"] = keyword
    (tmp_path / "al" / "adapter_config.json").write_text(json.dumps(conf))
    ad = load_peft_adapter(tmp_path / "al", CFG, MAX_RANK)
    assert ad.target_modules == tuple(sorted(LORA_MODULES))
    assert len(ad.weights) == 2 * 7
    check_weights(ad, raw, {k: 0.5 for k in raw})


def test_rslora(tmp_path):
    raw = write_adapter(tmp_path / "rs", r=8, alpha=16, target_modules="all-linear", use_rslora=True)
    ad = load_peft_adapter(tmp_path / "rs", CFG, MAX_RANK)
    check_weights(ad, raw, {k: 16 / math.sqrt(8) for k in raw})


def test_rank_and_alpha_pattern(tmp_path):
    ranks = {(l, "down_proj"): 6 for l in range(2)}
    ranks[(1, "q_proj")] = 2
    raw = write_adapter(
        tmp_path / "rp", r=16, alpha=32, target_modules=list(LORA_MODULES), ranks=ranks,
        # First matching key wins (file order); "proj" must not match "q_proj" (dotted-suffix rule).
        rank_pattern={"proj": 1, "model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"down_proj": 3, "layers.1.self_attn.q_proj": 5})
    ad = load_peft_adapter(tmp_path / "rp", CFG, MAX_RANK)
    scal = {k: 2.0 for k in raw}
    scal.update({(l, "down_proj"): 3 / 6 for l in range(2)})
    scal[(1, "q_proj")] = 5 / 2
    check_weights(ad, raw, scal)
    assert ad.weights[(0, "down_proj")].rank == 6 and ad.weights[(0, "q_proj")].rank == 16
    assert ad.max_rank == 16


def test_rank_pattern_with_rslora(tmp_path):
    raw = write_adapter(tmp_path / "rp", r=4, alpha=8, target_modules=["q_proj", "down_proj"],
                        ranks={(l, "down_proj"): 9 for l in range(2)}, use_rslora=True,
                        rank_pattern={r"layers\.\d+\.mlp\.down_proj": 9}, alpha_pattern={"q_proj": 1})
    ad = load_peft_adapter(tmp_path / "rp", CFG, MAX_RANK)
    scal = {k: (8 / 3 if k[1] == "down_proj" else 1 / 2) for k in raw}
    check_weights(ad, raw, scal)


def test_layers_to_transform(tmp_path):
    raw = write_adapter(tmp_path / "lt", target_modules=["q_proj"], modules=[(1, "q_proj")],
                        layers_to_transform=[1])
    ad = load_peft_adapter(tmp_path / "lt", CFG, MAX_RANK)
    assert set(ad.weights) == {(1, "q_proj")}
    check_weights(ad, raw, {k: 2.0 for k in raw})
    write_adapter(tmp_path / "lp", target_modules=["q_proj"], modules=[(0, "q_proj")],
                  layers_to_transform=0, layers_pattern="layers")
    assert set(load_peft_adapter(tmp_path / "lp", CFG, MAX_RANK).weights) == {(0, "q_proj")}


def test_exclude_modules(tmp_path):
    write_adapter(tmp_path / "ex", target_modules="all-linear", exclude_modules=["model.layers.0.mlp.up_proj"],
                  modules=[(l, m) for l in range(2) for m in LORA_MODULES if (l, m) != (0, "up_proj")])
    assert len(load_peft_adapter(tmp_path / "ex", CFG, MAX_RANK).weights) == 13
    write_adapter(tmp_path / "ex2", target_modules="all-linear", exclude_modules=["up_proj"])
    with pytest.raises(AdapterError, match="does not select"):
        load_peft_adapter(tmp_path / "ex2", CFG, MAX_RANK)


@pytest.mark.parametrize("fmt", [
    "base_model.model.model.layers.{l}.{p}.{m}.lora_{ab}",
    "base_model.model.model.layers.{l}.{p}.{m}.lora_{ab}.default.weight",
    "base_model.model.model.layers.{l}.{p}.{m}.lora_{ab}.default",
    "model.layers.{l}.{p}.{m}.lora_{ab}.weight",
])
def test_tensor_name_variants(tmp_path, fmt):
    raw = write_adapter(tmp_path / "n", name_fmt=fmt)
    check_weights(load_peft_adapter(tmp_path / "n", CFG, MAX_RANK), raw, {k: 2.0 for k in raw})


def test_targeted_module_without_tensors_is_not_adapted(tmp_path):
    raw = write_adapter(tmp_path / "p", target_modules=["q_proj", "v_proj"], modules=[(0, "q_proj")])
    ad = load_peft_adapter(tmp_path / "p", CFG, MAX_RANK)
    assert set(ad.weights) == {(0, "q_proj")} and ad.target_modules == ("q_proj",)
    check_weights(ad, raw, {k: 2.0 for k in raw})


def write_safetensors_raw(path, tensors):
    """tensors: name -> (dtype string, shape, bytes). Writes a safetensors file by hand."""
    header, blobs, off = {}, [], 0
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_bf16_and_f16_tensors(tmp_path):
    raw = write_adapter(tmp_path / "h", r=2, target_modules=["q_proj"], modules=[(0, "q_proj")])
    a, b = raw[(0, "q_proj")]
    # bf16: truncate float32 to its top 16 bits (exactly representable values).
    a_bf = (a.view(np.uint32) >> 16).astype(np.uint16)
    b16 = b.astype(np.float16)
    write_safetensors_raw(tmp_path / "h" / "adapter_model.safetensors", {
        tensor_name(0, "q_proj", "A"): ("BF16", a.shape, a_bf.tobytes()),
        tensor_name(0, "q_proj", "B"): ("F16", b.shape, b16.astype("<f2").tobytes()),
    })
    ad = load_peft_adapter(tmp_path / "h", CFG, MAX_RANK)
    w = ad.weights[(0, "q_proj")]
    np.testing.assert_array_equal(w.a, (a_bf.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(w.b, expected_b(b16, 4.0))


# ------------------------------------------------------------------------------------------ invalid


def _set_conf(**kv):
    def f(d):
        p = d / "adapter_config.json"
        conf = json.loads(p.read_text())
        conf.update(kv)
        p.write_text(json.dumps(conf))
    return f


def _rewrite_tensors(fn):
    """fn(tensors dict) mutates the adapter's tensors in place."""
    from safetensors.numpy import load_file

    def f(d):
        p = d / "adapter_model.safetensors"
        t = load_file(str(p))
        fn(t)
        save_file(t, str(p))
    return f


QA, QB = tensor_name(0, "q_proj", "A"), tensor_name(0, "q_proj", "B")


def _set(name, value):
    return _rewrite_tensors(lambda t: t.__setitem__(name, value))


def _poison(name, value):
    def fn(t):
        arr = t[name].copy()
        arr.flat[3] = value
        t[name] = arr
    return _rewrite_tensors(fn)


def _write(name, text):
    return lambda d: (d / name).write_text(text)


def _remove(name):
    return lambda d: os.remove(d / name)


def _both(*fs):
    def f(d):
        for g in fs:
            g(d)
    return f


BAD = {
    "missing_config": (_remove("adapter_config.json"), ["adapter_config.json"]),
    "bin_only": (_both(_remove("adapter_model.safetensors"), _write("adapter_model.bin", "x")),
                 ["adapter_model.bin", "safetensors"]),
    "no_weights": (_remove("adapter_model.safetensors"), ["adapter_model.safetensors"]),
    "invalid_json": (_write("adapter_config.json", "{r: 4,"), ["JSON"]),
    "json_not_object": (_write("adapter_config.json", "[1]"), ["JSON object"]),
    "peft_type": (_set_conf(peft_type="LOHA"), ["peft_type", "LOHA", "'LORA'"]),
    "peft_type_missing": (_set_conf(peft_type=None), ["peft_type", "'LORA'"]),
    "dora": (_set_conf(use_dora=True), ["use_dora", "DoRA"]),
    "bias_all": (_set_conf(bias="all"), ["bias", "'all'", "'none'"]),
    "bias_lora_only": (_set_conf(bias="lora_only"), ["bias", "'none'"]),
    "modules_to_save": (_set_conf(modules_to_save=["lm_head"]), ["modules_to_save"]),
    "lora_bias": (_set_conf(lora_bias=True), ["lora_bias"]),
    "layer_replication": (_set_conf(layer_replication=[[0, 2]]), ["layer_replication"]),
    "pissa": (_set_conf(init_lora_weights="pissa_niter_4"), ["init_lora_weights", "pissa"]),
    "target_lm_head": (_set_conf(target_modules=["q_proj", "lm_head"]), ["'lm_head'", "q_proj, k_proj"]),
    "target_embed": (_set_conf(target_modules=["embed_tokens"]), ["'embed_tokens'", "down_proj"]),
    "target_c_attn": (_set_conf(target_modules=["c_attn", "v_proj"]), ["'c_attn'", "gate_proj"]),
    "target_regex_lm_head": (_set_conf(target_modules=r"lm_head|.*\.q_proj"), ["lm_head", "q_proj, k_proj"]),
    "target_regex_invalid": (_set_conf(target_modules="(q_proj"), ["regex", "(q_proj"]),
    "target_regex_nothing": (_set_conf(target_modules="q_proj"), ["matches no module"]),
    "target_missing": (_set_conf(target_modules=None), ["target_modules"]),
    "target_bad_type": (_set_conf(target_modules=5), ["target_modules", "all-linear"]),
    "r_zero": (_set_conf(r=0), ["r=0", "positive integer"]),
    "r_string": (_set_conf(r="4"), ["r='4'", "positive integer"]),
    "alpha_bad": (_set_conf(lora_alpha="x"), ["lora_alpha", "finite number"]),
    "rank_pattern_bad_regex": (_set_conf(rank_pattern={"q_proj(": 4}), ["rank_pattern", "regex"]),
    "rank_pattern_bad_value": (_set_conf(rank_pattern={"q_proj": -1}), ["rank_pattern", "positive integer"]),
    "ltt_with_regex": (_set_conf(target_modules=".*q_proj", layers_to_transform=[0]), ["layers_to_transform"]),
    "ltt_out_of_range": (_set_conf(layers_to_transform=[7]), ["layers_to_transform", "0..1"]),
    "tensor_lm_head": (_set("base_model.model.lm_head.lora_A.weight", np.zeros((4, 32), np.float32)),
                       ["lm_head", "supported target modules"]),
    "tensor_embed": (_set("base_model.model.model.embed_tokens.lora_embedding_A", np.zeros((4, 100), np.float32)),
                     ["unexpected tensor", "lora_embedding_A"]),
    "tensor_magnitude": (_set("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                              np.zeros((48,), np.float32)), ["unexpected tensor"]),
    "tensor_lora_b_bias": (_set("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
                                np.zeros((48,), np.float32)), ["unexpected tensor"]),
    "tensor_layer_5": (_both(_set(tensor_name(5, "q_proj", "A"), np.zeros((4, 32), np.float32)),
                             _set(tensor_name(5, "q_proj", "B"), np.zeros((48, 4), np.float32))),
                       ["layer 5", "2 layers", "0..1"]),
    "tensor_wrong_parent": (_set("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
                                 np.zeros((4, 32), np.float32)), ["mlp.q_proj", "lacks"]),
    "tensor_c_attn": (_set("base_model.model.model.layers.0.attn.c_attn.lora_A.weight",
                           np.zeros((4, 32), np.float32)), ["c_attn", "lacks"]),
    "tensor_not_targeted": (_both(_set(tensor_name(0, "k_proj", "A"), np.zeros((4, 32), np.float32)),
                                  _set(tensor_name(0, "k_proj", "B"), np.zeros((24, 4), np.float32))),
                            ["k_proj", "target_modules"]),
    "a_in_features": (_set(QA, np.zeros((4, 33), np.float32)), ["lora_A", "in_features 32", "(4, 33)"]),
    "b_out_features": (_set(QB, np.zeros((24, 4), np.float32)), ["lora_B", "out_features 48"]),
    "ab_rank_mismatch": (_set(QB, np.zeros((48, 3), np.float32)), ["different ranks", "4 vs 3"]),
    "rank_vs_r": (_both(_set(QA, np.zeros((3, 32), np.float32)), _set(QB, np.zeros((48, 3), np.float32))),
                  ["rank", "is 3", "says 4", "r/rank_pattern"]),
    "rank_vs_pattern": (_set_conf(rank_pattern={"model.layers.0.self_attn.q_proj": 8}), ["says 8", "rank_pattern"]),
    "missing_b": (_rewrite_tensors(lambda t: t.pop(QB)), ["partner", "lora_B"]),
    "missing_a": (_rewrite_tensors(lambda t: t.pop(QA)), ["partner", "lora_A"]),
    "duplicate": (_set(QA.replace(".weight", ".default.weight"), np.zeros((4, 32), np.float32)), ["duplicates"]),
    "nan_a": (_poison(QA, np.nan), ["NaN/inf", "lora_A"]),
    "inf_b": (_poison(QB, np.inf), ["NaN/inf", "lora_B"]),
    "overflow_after_scaling": (_poison(QB, np.float32(3e38)), ["NaN/inf", "scaling"]),
    "f64_overflow": (_set(QA, np.full((4, 32), 1e300)), ["NaN/inf"]),
    "int_dtype": (_set(QA, np.zeros((4, 32), np.int32)), ["dtype", "I32", "F32, F16, BF16"]),
    "one_d": (_set(QA, np.zeros((128,), np.float32)), ["2-D"]),
    "no_tensors": (lambda d: save_file({}, str(d / "adapter_model.safetensors")), ["no LoRA tensors"]),
    "corrupt_header": (_write("adapter_model.safetensors", "garbage!"), ["corrupt"]),
    "truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-10]), ["corrupt"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter(tmp_path, case):
    folder = tmp_path / f"bad-{case}"
    write_adapter(folder, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    mutate, words = BAD[case]
    mutate(folder)
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(AdapterError) as ei:
        load_peft_adapter(folder, CFG, MAX_RANK)
    msg = str(ei.value)
    assert str(folder) in msg
    for w in words:
        assert w in msg, (w, msg)
    assert ei.value.path == str(folder)
    assert before == sorted((p.name, p.stat().st_size) for p in folder.iterdir())  # nothing written


def test_rank_above_max(tmp_path):
    write_adapter(tmp_path / "big", r=32, alpha=32)
    with pytest.raises(AdapterError) as ei:
        load_peft_adapter(tmp_path / "big", CFG, MAX_RANK)
    msg = str(ei.value)
    assert str(tmp_path / "big") in msg and "32" in msg and "16" in msg and "max_lora_rank" in msg


def test_missing_folder_and_file_path(tmp_path):
    with pytest.raises(AdapterError, match="does not exist") as ei:
        load_peft_adapter(tmp_path / "nope", CFG, MAX_RANK)
    assert str(tmp_path / "nope") in str(ei.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="not a folder") as ei:
        load_peft_adapter(str(tmp_path / "file"), CFG, MAX_RANK)
    assert str(tmp_path / "file") in str(ei.value)
    assert not list(tmp_path.glob("nope*"))


def test_adapter_error_is_value_error_and_picklable(tmp_path):
    import pickle
    e = AdapterError("/x/y", "bad thing; allowed: good thing")
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and "/x/y" in str(e2) and e2.problem == e.problem


# ------------------------------------------------------------------------------------------ property


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    r=st.integers(1, 8),
    alpha=st.one_of(st.integers(1, 64), st.floats(0.25, 64.0, allow_nan=False)),
    rslora=st.booleans(),
    modules=st.sets(st.sampled_from(LORA_MODULES), min_size=1),
)
def test_roundtrip_property(data, r, alpha, rslora, modules):
    modules = sorted(modules, key=LORA_MODULES.index)
    pattern_mods = data.draw(st.sets(st.sampled_from(modules)), label="pattern modules")
    rank_pattern = {m: data.draw(st.integers(1, 12), label=f"rank {m}") for m in pattern_mods}
    alpha_pattern = {m: data.draw(st.integers(1, 40), label=f"alpha {m}")
                     for m in data.draw(st.sets(st.sampled_from(modules)), label="alpha modules")}
    layers = data.draw(st.sampled_from([None, [0], [1]]), label="layers")
    keys = [(l, m) for l in range(CFG.num_layers) for m in modules if layers is None or l in layers]
    ranks = {(l, m): rank_pattern.get(m, r) for l, m in keys}
    with tempfile.TemporaryDirectory() as d:
        raw = write_adapter(d, r=r, alpha=alpha, target_modules=modules, modules=keys, ranks=ranks,
                            use_rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                            layers_to_transform=layers, seed=r)
        ad = load_peft_adapter(d, CFG, MAX_RANK)
    scal = {}
    for l, m in keys:
        rk, al = ranks[(l, m)], alpha_pattern.get(m, alpha)
        scal[(l, m)] = al / math.sqrt(rk) if rslora else al / rk
    check_weights(ad, raw, scal)
    assert ad.max_rank == max(ranks.values())
    assert ad.target_modules == tuple(sorted(modules))
    assert ad.nbytes == 4 * sum(rk * sum(CFG.module_shape(m)) for (l, m), rk in ranks.items())


# ------------------------------------------------------------------------------------------ real PEFT fixtures


def test_real_peft_fixtures():
    adapters = FIXTURES / "adapters"
    if not adapters.is_dir():
        pytest.skip(f"fixture folder {adapters} is absent")
    cfg_path = FIXTURES / "config.json"
    cfg = (ModelConfig.from_hf(json.loads(cfg_path.read_text())) if cfg_path.is_file() else
           ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16))
    expect = {  # name -> (modules, rank of each module, rslora)
        "qv-r4": (("q_proj", "v_proj"), {"q_proj": 4, "v_proj": 4}, False),
        "all-r8-rslora": (tuple(sorted(LORA_MODULES)), {m: 8 for m in LORA_MODULES}, True),
        "regex-r16-pattern": (None, None, False),
    }
    for name, (mods, ranks, rslora) in expect.items():
        folder = adapters / name
        conf = json.loads((folder / "adapter_config.json").read_text())
        ad = load_peft_adapter(folder, cfg, 64)
        assert conf.get("use_rslora", False) == rslora
        if name == "regex-r16-pattern":
            assert isinstance(conf["target_modules"], str)
            assert conf["r"] == 16
            rx = conf["target_modules"]
            assert ad.target_modules == tuple(sorted(
                m for m in LORA_MODULES if re.fullmatch(rx, f"model.layers.0.{PARENT[m]}.{m}")))
            assert "down_proj" in ad.target_modules and len(ad.target_modules) < len(LORA_MODULES)
            ranks = {m: (6 if m == "down_proj" else 16) for m in ad.target_modules}
            alphas = {m: (3 if m == "down_proj" else conf["lora_alpha"]) for m in ad.target_modules}
        else:
            assert ad.target_modules == mods
            alphas = {m: conf["lora_alpha"] for m in mods}
        assert {k[0] for k in ad.weights} == set(range(cfg.num_layers))
        for (layer, m), w in ad.weights.items():
            assert w.rank == ranks[m], (name, layer, m)
            want = alphas[m] / math.sqrt(ranks[m]) if rslora else alphas[m] / ranks[m]
            assert w.scaling == pytest.approx(want, rel=1e-12), (name, m)
            assert w.a.shape == (ranks[m], cfg.module_shape(m)[0])
            assert w.b.shape == (ranks[m], cfg.module_shape(m)[1])
            assert np.isfinite(w.a).all() and np.isfinite(w.b).all()
        assert ad.max_rank == max(ranks.values())
