"""Tensor parallelism on this machine's devices: throughput, peak host memory at start-up and the
bytes the step's collectives move, for each TP size, side by side.

    python benchmarks/tensor_parallel.py [--model smollm2] [--sizes 1,2,4] [--requests 64]
                                         [--input-len 64] [--output-len 32] [--replicated-vocab]
                                         [--adapters N --ranks 8,16 --lora-schemes s-lora,vllm]
    (or: jaxserve bench tensor_parallel ...)

Each TP size runs in a fresh process (on a CPU with XLA_FLAGS=--xla_force_host_platform_device_count
= the largest size, so every run sees the same devices): load + compile, then one greedy batch of
--requests prompts (random token ids; with --adapters, round-robin over random adapters), run
once untimed (first uses of shapes trace), then timed. Reported per size: output tok/s and its
ratio to TP 1, peak RSS of the process (ru_maxrss: on a CPU the devices' memory is host memory,
so the params and the pool count too) and, from the compiled step of a decode batch
(max_num_seqs tokens), every collective with its result shape and bytes; with adapters, one
adapter's mean memory per device under each LoRA scheme. Tokens must agree with
TP 1's (printed). On 2 CPU cores, more "devices" only split the same cores: expect no speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

WORKER = r"""
import json, os, re, resource, sys, time
args = json.loads(sys.argv[1])
import numpy as np
import jaxserve.distributed.tensor_parallel as tensor_parallel
tensor_parallel.VOCAB_PARALLEL = args["vocab"] == "split"
tensor_parallel.LORA_SCHEME = args["scheme"]
from jaxserve import LLM, SamplingParams
from jaxserve.packed import PackedBatch
start = time.perf_counter()
llm = LLM(args["model"], max_model_len=args["input_len"] + args["output_len"] + 16,
          tensor_parallel_size=args["size"], max_num_seqs=args["max_num_seqs"], max_lora_rank=max(args["ranks"]),
          lora_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
load = time.perf_counter() - start
rng = np.random.default_rng(0)
vocab = llm.engine.model_config.vocab_size
prompts = [{"prompt_token_ids": rng.integers(10, vocab, args["input_len"]).tolist()} for _ in range(args["requests"])]
sp = SamplingParams(temperature=0.0, max_tokens=args["output_len"], ignore_eos=True)
loras = None
if args["adapters"]:  # the same random adapters in every process (seeded), round-robin over the requests
    import tempfile
    from jaxserve import LoRARequest
    from jaxserve.lora.demo import write_random_adapter
    folder = tempfile.mkdtemp()
    cfg = llm.engine.model_config
    for i in range(args["adapters"]):
        write_random_adapter(f"{folder}/a{i}", cfg, rank=args["ranks"][i % len(args["ranks"])], seed=i,
                             target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    loras = [LoRARequest(f"a{i % args['adapters']}", i % args["adapters"] + 1, f"{folder}/a{i % args['adapters']}")
             for i in range(len(prompts))]
llm.generate(prompts, sp, loras, use_tqdm=False)  # an untimed pass: each shape's first use traces and loads it
t = time.perf_counter()
outs = llm.generate(prompts, sp, loras, use_tqdm=False)
seconds = time.perf_counter() - t
runner = llm.engine.runner
n = runner.max_num_seqs
batch = PackedBatch.empty(n, n, runner.page_buckets[-1])
lora_ids = (np.arange(n) % runner.max_loras).astype(np.int32) if loras else None  # distinct adapters: the most tiles
tables = runner.adapters.stacked_tables([], runner.max_loras) if loras else (None, None)
hlo = runner._forward.func.lower(runner.params, runner.device_pool.array, batch, runner._last_tokens, *tables,
                                 plan=runner.plan(n, lora_ids), num_logits=runner.num_logits(n),
                                 **runner._forward.keywords).compile().as_text()
ops, entry = [], False
for line in hlo.splitlines():  # each collective with whether it is in ENTRY (once) or a loop body
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
        entry = line.startswith("ENTRY")
    m = re.search(r"= (\w+)\[([\d,]*)\]\S* (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", line)
    if m:
        ops.append((entry, *m.groups()))
stored = list(llm.engine.adapters._adapters.values())
pool = llm.engine.device_pool  # one adapter's bytes on one device: its pages x a page's bytes per device
page_bytes = pool.nbytes / pool.array.shape[2] / args["size"]
adapter_mib = sum(s.layout.num_pages for s in stored) / max(1, len(stored)) * page_bytes / 2**20
print(json.dumps({"size": args["size"], "vocab": args["vocab"], "scheme": args["scheme"], "adapter_mib": adapter_mib,
                  "load_s": load, "seconds": seconds,
                  "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                  "ids": [o.outputs[0].token_ids for o in outs],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "collectives": ops, "layers": llm.engine.model_config.num_layers, "decode_tokens": n}))
"""
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}


def collective_bytes(ops, layers: int) -> tuple[int, list[str]]:
    """Bytes per step (the result's bytes) and a description of each collective. Those in the
    layer loop's body (the all-reduces of [T, hidden] after o and down) run once per layer, those
    in ENTRY (the vocabulary split's lookup all-reduce and logits all-gather) once."""
    total, described = 0, []
    for entry, dtype, dims, op in ops:
        size = BYTES.get(dtype, 4)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        in_loop = not entry
        total += size * (layers if in_loop else 1)
        described.append(f"{op} {dtype}[{dims}]" + (f" x{layers} layers" if in_loop else ""))
    return total, described


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sizes", default="1,2,4")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--adapters", type=int, default=0,
                   help="requests round-robin over this many random adapters on q/k/v/o (0: none)")
    p.add_argument("--ranks", default="8,16", help="their ranks, in turn")
    p.add_argument("--replicated-vocab", action="store_true",
                   help="also run each TP size > 1 with the embedding and lm_head replicated (the default splits them "
                        "over the vocabulary)")
    p.add_argument("--lora-schemes", default="s-lora",
                   help="with --adapters: run each TP size > 1 under these adapter layouts (s-lora: S-LoRA's, the "
                        "default; vllm: vLLM's default, for comparison — distributed/lora_layout.py)")
    p.add_argument("--save-result", help="write the figures as JSON here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    env = dict(os.environ)
    if "cuda" not in env.get("JAX_PLATFORMS", "") and not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(sizes)}".strip()
    rows = []
    schemes = args.lora_schemes.split(",") if args.adapters else ["s-lora"]
    runs = [(size, "split", scheme) for size in sizes for scheme in (schemes if size > 1 else schemes[:1])]
    runs += [(size, "replicated", schemes[0]) for size in sizes if size > 1 and args.replicated_vocab]
    for size, vocab, scheme in runs:
        job = dict(model=args.model, size=size, vocab=vocab, scheme=scheme, adapters=args.adapters,
                   ranks=[int(r) for r in args.ranks.split(",")], requests=args.requests, input_len=args.input_len,
                   output_len=args.output_len, max_num_seqs=args.max_num_seqs)
        done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"TP {size} FAILED:\n{done.stderr[-3000:]}")
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"TP {size}: done", file=sys.stderr, flush=True)
    base = rows[0]
    print(f"{args.model}: {args.requests} requests, {args.input_len} prompt + {args.output_len} output tokens, greedy"
          + (f", round-robin over {args.adapters} adapters of ranks {args.ranks} on q/k/v/o" if args.adapters else ""))
    print(f"{'TP':>3} {'vocab':>10} {'LoRA':>6} {'load s':>7} {'out tok/s':>10} {'vs TP1':>7} {'peak RSS MiB':>13} "
          f"{'same tokens':>12} {'adapter MiB/device':>19} {'bytes/decode step':>18}  collectives")
    for r in rows:
        moved, described = collective_bytes(r["collectives"], r["layers"])
        same = sum(a == b for a, b in zip(r["ids"], base["ids"])) / len(base["ids"])
        tok_s = r["tokens"] / r["seconds"]
        r.update(tok_s=tok_s, bytes_per_step=moved, same_tokens=same)
        vocab, scheme = (r["vocab"], r["scheme"] if args.adapters else "-") if r["size"] > 1 else ("-", "-")
        print(f"{r['size']:>3} {vocab:>10} {scheme:>6} "
              f"{r['load_s']:>7.1f} {tok_s:>10.1f} {tok_s / (base['tokens'] / base['seconds']):>6.2f}x "
              f"{r['peak_rss_mb']:>13.0f} {100 * same:>11.0f}% {r['adapter_mib'] if args.adapters else 0:>19.3f} "
              f"{moved / 2**20:>14.2f} MiB  "
              f"{', '.join(described) or '-'} ({r['decode_tokens']} tokens)")
    if args.save_result:
        for r in rows:
            del r["ids"]
        with open(args.save_result, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
