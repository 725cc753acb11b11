"""`jaxserve demo`, the main job: the mission in a few minutes on a CPU.

SmolLM2 serves --adapters generated PEFT adapters (ranks 4/8/16/32 in turn, on the attention
projections as in S-LoRA's experiments) to 4 tenants that
send at different rates (tenant k owns adapters k, k + 4, ...), through the real engine (one
unified pool for KV cache and adapters, batches mixing adapters and ranks): a few real answers
first, then the same workload under FCFS and under VTC, each with a progress bar and a table —
requests, tokens/s, TTFT and TPOT (mean, P99), service and TTFT per tenant, the largest service
difference between backlogged tenants (VTC's bound 2U is in the JSON) — then the fairness plot and
a JSON result in --out. `--quick`: one batch of four chat prompts (two through adapters) and tokens/s.
"""
from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

QUICK_REQUESTS = [
    ("What is the capital of France?", None),
    ("Write a haiku about the sea.", None),
    ("Name three primary colors.", "demo-a"),
    ("Why is the sky blue?", "demo-b"),
]
RANKS = (4, 8, 16, 32)
TENANTS = 4


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="only one batch of four chat prompts")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    p.add_argument("--adapters", type=int, default=32, help="generated adapters (shared by 4 tenants)")
    p.add_argument("--rates", default="0.25,0.25,0.5,1.5", help="requests/s of each of the 4 tenants")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per scheduler")
    p.add_argument("--drain", type=float, default=15.0,
                   help="seconds after the last arrival before what is unfinished is aborted (bounds the run)")
    p.add_argument("--input-len", default="16:96", help="prompt tokens, uniform in [LO, HI)")
    p.add_argument("--output-len", default="16:48", help="output tokens, uniform in [LO, HI)")
    p.add_argument("--schedulers", default="fcfs,vtc", help="the policies to compare, in this order")
    p.add_argument("--out", default="jaxserve-demo", help="where the plots and demo.json go")


def _range(text: str, flag: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) < int(hi)):
        raise ValueError(f"{flag} {text!r} is invalid; allowed: LO:HI with 1 <= LO < HI")
    return int(lo), int(hi)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        rates = []
    if len(rates) != TENANTS or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"--rates {text!r} is invalid; allowed: {TENANTS} numbers > 0, comma-separated")
    return rates


def workload(rates: list[float], duration: float, adapters: int, input_range, output_range, seed: int = 0):
    """Each tenant a Poisson stream at its rate; each request through one of its own adapters."""
    from jaxserve.fairness.workloads import Request, adapter_name, client_name
    rng = np.random.default_rng(seed)
    reqs = []
    for k, rate in enumerate(rates):
        owned = list(range(k, adapters, TENANTS)) or [k % adapters]
        t = rng.exponential(1 / rate)
        while t < duration:
            reqs.append(Request(client_name(k), float(t), int(rng.integers(*input_range)),
                                int(rng.integers(*output_range)), adapter_name(int(rng.choice(owned)))))
            t += rng.exponential(1 / rate)
    return sorted(reqs, key=lambda r: r.arrival)


def _engine_kwargs(args) -> dict:
    from jaxserve.cli import ENGINE_FLAGS
    return {"model": args.model, **{name: getattr(args, name) for name in ENGINE_FLAGS}}


def quick(args, llm, loras: dict) -> list:
    """The four chat prompts in one batch (two through adapters); prints and returns them."""
    from jaxserve import SamplingParams
    conversations = [[{"role": "user", "content": p}] for p, _ in QUICK_REQUESTS]
    lora_requests = [loras.get(name) for _, name in QUICK_REQUESTS]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, lora_requests, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for (prompt, name), out in zip(QUICK_REQUESTS, outputs):
        print(f"\n[{name or 'base model'}] {prompt}\n  -> {out.outputs[0].text.strip()}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests in one batch, {tokens} generated tokens in {elapsed:.2f} s: "
          f"{tokens / elapsed:.1f} tokens/s (adapters loaded into the pool on demand, no compilation)")
    return outputs


def describe(result) -> dict:
    """One scheduler's row: requests, tokens/s, TTFT / TPOT, per-tenant service and TTFT, the
    backlogged service difference and VTC's bound."""
    from jaxserve.fairness import metrics as M
    done = [r for r in result.requests if r.finish is not None and not r.rejected]
    ttft = [r.first_token - r.arrival for r in done if r.first_token is not None]
    tpot = [(r.finish - r.first_token) / (r.output_len - 1) for r in done if r.output_len > 1]
    latency = M.first_token_latency(result)
    diff = M.backlogged_difference(result)
    return {"scheduler": result.scheduler, "requests": len(result.requests), "finished": len(done),
            "output_tokens_per_s": sum(r.output_len for r in done) / result.end_time,
            "tokens_per_s": result.throughput(),
            "ttft_s": {"mean": float(np.mean(ttft)), "p99": float(np.percentile(ttft, 99))} if ttft else None,
            "tpot_ms": {"mean": 1e3 * float(np.mean(tpot)), "p99": 1e3 * float(np.percentile(tpot, 99))}
            if tpot else None,
            "service_per_tenant": M.service_by_client(result),
            "ttft_mean_per_tenant_s": {c: v["mean"] for c, v in latency.items() if c != "all"},
            "max_backlogged_difference": diff["max"], "backlogged_seconds": diff["backlogged_time"],
            "bound_2U": M.vtc_bound(1, 2, max((r.input_len for r in result.requests), default=0),
                                    result.config.kv_capacity),
            "preemptions": result.num_preemptions, "seconds": result.end_time}


def print_table(rows: list[dict], rates: list[float]) -> None:
    print(f"\n{'scheduler':10s} {'finished':>9s} {'tok/s':>7s} {'out tok/s':>9s} {'TTFT mean':>9s} "
          f"{'TTFT P99':>8s} {'TPOT mean':>9s} {'TPOT P99':>8s} {'max diff':>8s}")
    for r in rows:
        ttft, tpot = r["ttft_s"] or {"mean": math.nan, "p99": math.nan}, r["tpot_ms"] or {"mean": math.nan,
                                                                                          "p99": math.nan}
        print(f"{r['scheduler']:10s} {r['finished']:>4d}/{r['requests']:<4d} {r['tokens_per_s']:7.1f} "
              f"{r['output_tokens_per_s']:9.1f} {ttft['mean']:8.2f}s {ttft['p99']:7.2f}s {tpot['mean']:7.0f}ms "
              f"{tpot['p99']:6.0f}ms {r['max_backlogged_difference']:8.0f}")
    print(f"\n{'tenant':10s} {'req/s':>6s} " + " ".join(f"{r['scheduler'] + ' service':>14s} "
                                                   f"{r['scheduler'] + ' TTFT':>10s}" for r in rows))
    for k, rate in enumerate(rates):
        c = f"client{k}"
        cells = " ".join(f"{r['service_per_tenant'].get(c, 0):14.0f} "
                         f"{r['ttft_mean_per_tenant_s'].get(c, math.nan):9.2f}s" for r in rows)
        print(f"{c:10s} {rate:6.2f} {cells}")


def _adapters(folder: Path) -> dict:
    from jaxserve.lora.request import LoRARequest
    return {p.name: LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(sorted(folder.iterdir()))}


def run_scheduler(args, name: str, reqs, adapters_dir: Path):
    """The workload on a fresh engine under one policy (wall clock), with a progress bar; what
    is still unfinished a while after the last arrival is aborted (it counts as unfinished)."""
    from tqdm import tqdm

    from jaxserve.engine import Engine
    from jaxserve.fairness.replay import replay
    engine = Engine(**_engine_kwargs(args), scheduler=name)
    adapters = _adapters(adapters_dir)
    with tqdm(total=len(reqs), desc=f"{name:5s} requests", dynamic_ncols=True) as bar:
        result = replay(engine, reqs, adapters=adapters, until=args.duration + args.drain, progress=bar)
    engine.abort_all()
    while engine.has_unfinished_requests():
        engine.step()
    return result


def main(args) -> int:
    from jaxserve import LLM, LoRARequest
    from jaxserve.config import ATTN_MODULES
    from jaxserve.fairness.plots import plot_compare
    from jaxserve.fairness.run import scheduler_names
    from jaxserve.fairness.workloads import adapter_name
    from jaxserve.lora.demo import write_random_adapter

    rates = _rates(args.rates)
    schedulers = scheduler_names(args.schedulers)
    input_range, output_range = _range(args.input_len, "--input-len"), _range(args.output_len, "--output-len")
    if args.adapters < 2:
        raise ValueError(f"--adapters {args.adapters} is invalid; allowed: an integer >= 2")
    if args.max_lora_rank < max(RANKS):
        raise ValueError(f"--max-lora-rank {args.max_lora_rank} is invalid for the demo; allowed: >= {max(RANKS)} "
                         f"(its adapters have ranks {'/'.join(map(str, RANKS))})")
    llm = LLM(**_engine_kwargs(args))
    cfg, runner = llm.model_config, llm.runner
    print(f"loaded {args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size} in {llm.load_time:.1f} s "
          f"(of which warm-up {runner.compile_seconds:.1f} s: {len(runner.shape_variants())} batch shapes "
          f"compiled or loaded from the compilation cache)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [adapter_name(i) for i in range(args.adapters)]
        for i, name in enumerate(names):
            write_random_adapter(folder / name, cfg, rank=RANKS[i % len(RANKS)], target_modules=ATTN_MODULES,
                                 seed=i + 1)
        loras = {"demo-a": LoRARequest("demo-a", 1, str(folder / names[0])),
                 "demo-b": LoRARequest("demo-b", 2, str(folder / names[-1]))}
        quick(args, llm, loras)
        if args.quick:
            return 0
        reqs = workload(rates, args.duration, args.adapters, input_range, output_range)
        del llm
        gc.collect()  # (one engine at a time: each holds its pool)
        print(f"\nworkload: {len(reqs)} requests in {args.duration:g} s from 4 tenants at "
              f"{', '.join(f'{r:g}' for r in rates)} req/s, each through one of its own {args.adapters // TENANTS} "
              f"adapters (of {args.adapters}, ranks {'/'.join(map(str, RANKS))}); prompts {input_range[0]}-"
              f"{input_range[1] - 1} tokens, outputs {output_range[0]}-{output_range[1] - 1}")
        results = [run_scheduler(args, name, reqs, folder) for name in schedulers]
    rows = [describe(r) for r in results]
    print_table(rows, rates)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_compare(results, out / f"{'_vs_'.join(schedulers)}.png",
                        title="service rate and first-token latency per tenant")
    (out / "demo.json").write_text(json.dumps({"rates": rates, "adapters": args.adapters, "duration": args.duration,
                                               "requests": len(reqs), "schedulers": rows}, indent=1))
    print("\nThe largest service difference between backlogged tenants: " + ", ".join(
        f"{r['scheduler']} {r['max_backlogged_difference']:.0f} (at {r['tokens_per_s']:.0f} tok/s)" for r in rows)
        + f".\nplots: {plot.resolve()}\n"
          f"result: {(out / 'demo.json').resolve()}")
    return 0
