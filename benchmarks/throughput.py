"""Output tokens/s serving many LoRA adapters, against the same engine without adapters, a bare
jitted greedy loop, and HF transformers + PEFT — one invocation, the same prompts for all.

    python benchmarks/throughput.py [--requests 128] [--hf-python /path/to/hf-venv/bin/python]
    (or: jaxserve bench throughput ...)

The job: --model (SmolLM2-135M-Instruct by default, engine defaults unless flags override),
--requests prompts of --prompt-len MIN:MAX random token ids, --output-len forced output tokens
each (greedy, ignore_eos), request i through adapter i % --adapters; the adapters are random PEFT
LoRA folders (B non-zero) on all seven projections, ranks cycling through --ranks. Systems:

- jaxserve: one LLM (its start-up, which compiles, is timed and printed), an untimed warm-up
  generate, then ONE generate of all requests, each with its LoRARequest;
- no-adapter: the same LLM and prompts, lora_request=None;
- minimal-jax: benchmarks/minimal_jax.py over the same params, batches of max_num_seqs, dense
  KV cache, compile excluded — the floor that the engine's overhead is measured against; its
  tokens are checked against no-adapter's;
- hf-peft: benchmarks/hf_peer.py run by --hf-python (torch + transformers + peft + gguf) on the
  same model file, prompts and adapter folders, at each of --hf-batch-sizes; its first batch's
  tokens are checked against jaxserve's. On a machine that other jobs also load, torch's OpenMP
  threads spin-wait on each other and HF's figures swing ~10x from run to run: set
  OMP_WAIT_POLICY=PASSIVE (inherited by the peer) or run on a quiet machine.

The best of --repeats timed runs is reported (the jaxserve modes alternate run by run).
Targets (the issue's): jaxserve / HF+PEFT bs 32 >= 3, jaxserve / no-adapter >= 0.9,
no-adapter / minimal-jax >= 0.8.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SYSTEMS = ("no-adapter", "minimal-jax", "hf-peft")
HF_INSTALL = "pip install torch==2.13.0 transformers peft gguf  (in a separate venv, the CPU build of torch)"
# Peers run isolated (-I): with the script's folder on sys.path, benchmarks/kernels.py would
# shadow the hub package `kernels` that transformers >= 5 imports.
PEER_FLAGS = ["-I"]


def make_adapters(folder: Path, cfg, count: int, ranks: list[int], seed: int) -> list[Path]:
    from jaxserve.config import LORA_MODULES
    from jaxserve.lora.demo import write_random_adapter
    return [write_random_adapter(folder / f"lora{i}", cfg, rank=ranks[i % len(ranks)],
                                 target_modules=LORA_MODULES, seed=seed + i) for i in range(count)]


def make_prompts(count: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, rng.integers(lo, hi + 1)).tolist() for _ in range(count)]


def timed_generate(llm, prompts, params, loras) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, loras, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]


def run_minimal(llm, prompts, output_len: int, repeats: int) -> tuple[float, np.ndarray]:
    sys.path.insert(0, str(HERE))
    import minimal_jax
    params, cfg, batch = llm.engine.runner.params, llm.engine.model_config, llm.engine.config.max_num_seqs
    width = max(len(p) for p in prompts)
    minimal_jax.generate_batch(params, cfg, prompts[:batch], batch, width, output_len)  # compiles
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = minimal_jax.generate(params, cfg, prompts, batch, width, output_len)
        runs.append((time.perf_counter() - start, tokens))
    return min(runs, key=lambda r: r[0])


def check_hf_python(python: str | None) -> str | None:
    """None if `python` can run the peer, else why not."""
    if not python:
        return "no --hf-python (or JAXSERVE_HF_PYTHON) given"
    try:
        probe = subprocess.run([python, "-c", "import torch, transformers, peft, gguf"], capture_output=True, text=True)
    except OSError as e:
        return f"--hf-python {python} cannot be run ({e.strerror})"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import torch, transformers, peft, gguf ({last})"
    return None


def run_hf(python: str, job: dict, tmp: Path) -> dict | None:
    job_path, out_path = tmp / "hf_job.json", tmp / "hf_out.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([python, *PEER_FLAGS, str(HERE / "hf_peer.py"), str(job_path), str(out_path)],
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"hf-peft FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(out_path.read_text())


def agreement(a, b) -> dict:
    """Rows whose tokens match exactly, and the mean length of the common prefix."""
    prefixes = []
    for x, y in zip(a, b):
        same = np.asarray(x) == np.asarray(y)
        prefixes.append(int(same.argmin()) if not same.all() else len(same))
    return {"rows": len(prefixes), "exact": sum(p == len(x) for p, x in zip(prefixes, a)),
            "mean_common_prefix": float(np.mean(prefixes)) if prefixes else 0.0}


def report(result: dict, hf_ref: str | None) -> None:
    rows, base = result["systems"], result["systems"].get("no-adapter", {}).get("tok_s")
    ref = rows.get(hf_ref, {}).get("tok_s") if hf_ref else None
    vs = "vs " + (hf_ref or "HF+PEFT")
    print(f"\n{'system':<26} | {'output tok/s':>12} | {vs:>16} | {'vs jaxserve no-adapter':>22}")
    for name, r in rows.items():
        vs_hf = f"{r['tok_s'] / ref:.2f}x" if ref else "n/a"
        vs_base = f"{r['tok_s'] / base:.2f}x" if base else "n/a"
        print(f"{name:<26} | {r['tok_s']:>12.1f} | {vs_hf:>16} | {vs_base:>22}")
    print()
    for r in result["ratios"]:
        name, value, target = r["ratio"], r["value"], r["target"]
        verdict = "n/a" if value is None else ("met" if value >= target else "NOT met")
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{name:<44} {shown:>7}  (target >= {target}: {verdict})")


def ratios(systems: dict, hf_ref: str | None) -> list:
    tok = {k: v["tok_s"] for k, v in systems.items()}
    div = lambda a, b: tok[a] / tok[b] if a in tok and b in tok else None  # noqa: E731
    rows = [(f"jaxserve+LoRA / {hf_ref or 'HF+PEFT bs 32'}", div("jaxserve+LoRA", hf_ref), 3.0),
            ("jaxserve+LoRA / jaxserve no-adapter", div("jaxserve+LoRA", "no-adapter"), 0.9),
            ("jaxserve no-adapter / minimal-jax (overhead)", div("no-adapter", "minimal-jax"), 0.8)]
    return [{"ratio": name, "value": value, "target": target} for name, value, target in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-len", default="32:64", help="MIN:MAX prompt tokens (uniform, inclusive)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--ranks", default="8,16", help="adapter ranks, cycled over the adapters")
    p.add_argument("--compare", default=",".join(SYSTEMS), help=f"comma list from {', '.join(SYSTEMS)}")
    p.add_argument("--hf-python", default=os.environ.get("JAXSERVE_HF_PYTHON"),
                   help="a python with torch, transformers, peft, gguf (default: $JAXSERVE_HF_PYTHON)")
    p.add_argument("--hf-batch-sizes", default="8,32")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-loras", type=int)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", help="write everything printed as JSON here")
    args = p.parse_args(argv)
    compare = [c for c in args.compare.split(",") if c]
    if unknown := sorted(set(compare) - set(SYSTEMS)):
        p.error(f"--compare: unknown {', '.join(unknown)}; allowed: {', '.join(SYSTEMS)}")
    lo, hi = (int(x) for x in args.prompt_len.split(":"))
    ranks = [int(r) for r in args.ranks.split(",")]
    hf_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    import jax
    from jaxserve import LLM, LoRARequest, SamplingParams
    from jaxserve.model.weights import resolve_model

    logging.getLogger("jaxserve").setLevel(logging.WARNING)
    overrides = {k: v for k, v in (("max_num_seqs", args.max_num_seqs), ("max_loras", args.max_loras),
                                   ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    result = {"command": shlex.join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__,
              "backend": jax.default_backend(), "args": vars(args), "systems": {}, "parity": {}}
    print(f"{result['date']}  {result['machine']}  jax {jax.__version__} on {result['backend']}\n$ {result['command']}")
    start = time.perf_counter()
    llm = LLM(args.model, **overrides)
    result["startup_s"] = time.perf_counter() - start
    ecfg = llm.engine.config
    print(f"jaxserve start-up (load + compile): {result['startup_s']:.1f} s; max_num_seqs {ecfg.max_num_seqs}, "
          f"max_num_batched_tokens {ecfg.max_num_batched_tokens}, max_loras {ecfg.max_loras}, "
          f"max_model_len {llm.max_model_len}", flush=True)
    cfg = llm.model_config
    prompts = make_prompts(args.requests, lo, hi, cfg.vocab_size, args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    total = args.requests * args.output_len
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = make_adapters(tmp, cfg, args.adapters, ranks, args.seed)
        loras = [LoRARequest(f"lora{i}", i + 1, str(f)) for i, f in enumerate(folders)]
        which = [i % args.adapters for i in range(args.requests)]
        per_request = [loras[w] for w in which]
        # Untimed: loads the adapters into the pool and touches every code path once.
        llm.generate([{"prompt_token_ids": q} for q in prompts[:8]],
                     SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), per_request[:8], use_tqdm=False)
        modes = {"jaxserve+LoRA": per_request, **({"no-adapter": None} if "no-adapter" in compare else {})}
        runs = {m: [] for m in modes}
        for _ in range(args.repeats):  # modes alternate, so a drift in machine speed hits both
            for mode, lora in modes.items():
                runs[mode].append(timed_generate(llm, prompts, params, lora))
                print(f"{mode}: {total / runs[mode][-1][0]:.1f} tok/s", flush=True)
        tokens = {}
        for mode, rs in runs.items():
            seconds, tokens[mode] = min(rs, key=lambda r: r[0])
            result["systems"][mode] = {"tok_s": total / seconds, "seconds": seconds}
        if "minimal-jax" in compare:
            seconds, mtokens = run_minimal(llm, prompts, args.output_len, args.repeats)
            result["systems"]["minimal-jax"] = {"tok_s": total / seconds, "seconds": seconds}
            print(f"minimal-jax: {total / seconds:.1f} tok/s", flush=True)
            if "no-adapter" in tokens:
                result["parity"]["minimal-jax vs no-adapter"] = agreement(mtokens.tolist(), tokens["no-adapter"])
        hf_ref = None
        if "hf-peft" in compare:
            why = check_hf_python(args.hf_python)
            if why:
                print(f"hf-peft SKIPPED: {why}; to include it: {HF_INSTALL}, then --hf-python that venv's python")
                result["hf_skipped"] = why
            else:
                path = resolve_model(args.model)
                gguf = path.suffix == ".gguf"
                job = {"model_dir": str(path.parent if gguf else path), "gguf_file": path.name if gguf else None,
                       "prompts": prompts, "adapters": [[r.lora_name, r.lora_path] for r in loras], "which": which,
                       "batch_sizes": hf_sizes, "output_len": args.output_len, "repeats": args.repeats}
                hf = run_hf(args.hf_python, job, tmp)
                if hf:
                    for bs in hf_sizes:
                        result["systems"][f"HF+PEFT bs {bs}"] = hf[str(bs)]
                    result["hf"] = {k: hf[k] for k in ("torch", "transformers", "peft", "threads")}
                    result["parity"][f"HF+PEFT (bs {hf_sizes[0]}, first batch) vs jaxserve+LoRA"] = agreement(
                        hf["tokens"], tokens["jaxserve+LoRA"][:len(hf["tokens"])])
                    hf_ref = f"HF+PEFT bs {32 if 32 in hf_sizes else max(hf_sizes)}"
    result["ratios"] = ratios(result["systems"], hf_ref)
    for name, a in result["parity"].items():
        print(f"parity, {name}: {a['exact']}/{a['rows']} requests identical, mean common prefix "
              f"{a['mean_common_prefix']:.1f}/{args.output_len} tokens")
    report(result, hf_ref)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
