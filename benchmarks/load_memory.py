"""Peak host memory while loading a bfloat16 checkpoint: jaxserve's streamed loader (tensor by
tensor, cast on the device) against the eager way it loaded before (every tensor as a float32
host array, stacked on the host, then cast and moved), side by side on the same checkpoint.

    python benchmarks/load_memory.py [--layers 10] [--keep DIR] [--tensor-parallel 4]

A synthetic Llama checkpoint (hidden 2048, 10 layers: ~0.57 B parameters, ~1.1 GB of bfloat16)
is written once; each loader then runs in a fresh process that reports its peak RSS
(ru_maxrss) and wall time. On a CPU the "device" is host memory too, so the loaded params (in
bfloat16) count in both figures: the difference is what loading itself costs.

With --tensor-parallel N (N CPU devices): two loaders more — TP N with the params read from the
file straight into their shards (distributed/sharded_load.py, HEAD), and TP N the way it loaded
before (every param whole on one device, then laid out and split by TensorParallel.place).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
          "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}

LOADERS = {
    "streamed": """
from jaxserve.config import EngineConfig
from jaxserve.loading import load_model
model = load_model(EngineConfig(model=FOLDER, dtype="bfloat16"))
n = sum(x.size for x in jax.tree.leaves(model.params))
""",
    "eager (before)": """
import jax.numpy as jnp, numpy as np
from safetensors import safe_open
from jaxserve.config import ModelConfig
from jaxserve.model.weights import LAYER_LINEARS, LAYER_VECTORS
folder = Path(FOLDER)
cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
tensors = {}
for file in sorted(folder.glob("*.safetensors")):
    with safe_open(file, framework="flax") as f:
        for key in f.keys():
            tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
layers = {}
for suffix, key in {**LAYER_LINEARS, **{k: v for k, v in LAYER_VECTORS.items() if not k.endswith(".bias")}}.items():
    per_layer = [tensors[f"model.layers.{i}.{suffix}"] for i in range(cfg.num_layers)]
    layers[key] = np.stack([w.T for w in per_layer] if suffix.endswith("proj.weight") else per_layer).astype(np.float32)
params = {"embed": tensors["model.embed_tokens.weight"], "final_norm": tensors["model.norm.weight"],
          "layers": layers, "lm_head": tensors["lm_head.weight"].T.astype(np.float32)}
params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
n = sum(x.size for x in jax.tree.leaves(params))
""",
}
TP_LOADERS = {
    "TP {n} sharded": """
from jaxserve.config import EngineConfig
from jaxserve.loading import load_model
model = load_model(EngineConfig(model=FOLDER, dtype="bfloat16", tensor_parallel_size={n}))
n = sum(x.size for x in jax.tree.leaves(model.params))
""",
    "TP {n} whole, split": """
import jax.numpy as jnp
from jaxserve.config import ModelConfig
from jaxserve.distributed.tensor_parallel import TensorParallel
from jaxserve.model import weights
folder = Path(FOLDER)
cfg = ModelConfig.from_hf(weights.read_config(folder))
tp = TensorParallel.create({n}, cfg)
params = weights.hf_to_params(cfg, weights.SafetensorsFolder(folder), jnp.bfloat16,
                              lambda key, w: tp.place(key, w, cfg))
n = sum(x.size for x in jax.tree.leaves(params))
""",
}


def write_checkpoint(folder: Path, layers: int) -> int:
    import jax
    import jax.numpy as jnp
    from safetensors.flax import save_file
    config = {**CONFIG, "num_hidden_layers": layers}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    h, i, kv = config["hidden_size"], config["intermediate_size"], 4 * 64
    shapes = {"model.embed_tokens.weight": (32000, h), "model.norm.weight": (h,), "lm_head.weight": (32000, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    key, tensors, total = jax.random.PRNGKey(0), {}, 0
    for k, (name, shape) in enumerate(shapes.items()):
        tensors[name] = (0.02 * jax.random.normal(jax.random.fold_in(key, k), shape)).astype(jnp.bfloat16)
        total += tensors[name].size
    save_file(tensors, str(folder / "model.safetensors"))
    return total


def run(loader: str, code: str, folder: Path, devices: int) -> dict:
    script = f"""
import json, resource, sys, time
from pathlib import Path
import jax
FOLDER = {str(folder)!r}
start = time.perf_counter()
{code}
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - start, "params": int(n)}}))
"""
    env = {"JAX_PLATFORMS": "cpu", **os.environ,
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{loader}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--keep", help="write (or reuse) the checkpoint in this folder")
    ap.add_argument("--tensor-parallel", type=int, default=0, help="also load at this TP size, both ways (0: not)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / "bf16-llama"
        if not (folder / "model.safetensors").exists():
            total = write_checkpoint(folder, args.layers)
            print(f"wrote {total / 1e9:.2f} B parameters, {(folder / 'model.safetensors').stat().st_size / 2**30:.2f} GiB "
                  f"of bfloat16, to {folder}")
        loaders = dict(LOADERS)
        if args.tensor_parallel:
            loaders.update({name.format(n=args.tensor_parallel): code.replace("{n}", str(args.tensor_parallel))
                            for name, code in TP_LOADERS.items()})
        devices = max(1, args.tensor_parallel)
        results = {name: run(name, code, folder, devices) for name, code in loaders.items()}
        for name, r in results.items():
            print(f"{name:>20}: peak RSS {r['peak_rss_mb']:8.0f} MiB, {r['seconds']:5.1f} s, {r['params'] / 1e9:.2f} B params")
        ratio = results["eager (before)"]["peak_rss_mb"] / results["streamed"]["peak_rss_mb"]
        print(f"peak RSS eager / streamed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
