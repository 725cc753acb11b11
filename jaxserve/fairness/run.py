"""`jaxserve fairness`: run a workload under one or more schedulers — in the simulator or through
the real engine — and write summary.json plus plots.

    jaxserve fairness --suite overload --scheduler vtc,fcfs,lcf --simulate --out out/overload
    jaxserve fairness --workload ../shared/data/vtc_real_trace.jsonl --scheduler vtc --simulate --out out/real
    jaxserve fairness --suite overload --scheduler vtc,fcfs --model tiny --duration 20 \\
        --length-scale 0.0625 --step-seconds 0.05 --out out/real-engine

A real-engine run with `--fit-cost-model cost.json` fits the simulator's step-cost model to the
engine's measured steps; `--simulate --cost-model cost.json` then simulates that engine.

summary.json holds, per scheduler: service per client (w_p * input + w_q * output tokens
processed, divided by the weights given), the maximum / average service difference between
clients while both are backlogged, the theorem's bound 2U, throughput, first-token latency
percentiles per client, and, for the real trace, the VTC artifact's per-window metric.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from jaxserve.sched import SCHEDULERS, make_scheduler
from jaxserve.fairness import metrics as M
from jaxserve.fairness import workloads
from jaxserve.fairness.sim import CostModel, SimConfig, simulate

TINY_MODEL = Path(__file__).resolve().parent.parent.parent / "tests" / "fixtures" / "tiny-llama"


def parse_weights(text: str | None) -> dict[str, float]:
    """'client0=1,client1=2' -> {"client0": 1.0, "client1": 2.0}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or out[name.strip()] <= 0:
            raise ValueError(f"--weights item {item!r} is invalid; allowed: CLIENT=WEIGHT with WEIGHT > 0")
    return out


def scheduler_options(name: str, weights: dict, rpm: int | None, rpm_reject: bool = False) -> dict:
    if name == "rpm":
        return {"rpm": 20 if rpm is None else rpm, "reject": rpm_reject}
    if name in ("vtc", "vtc-predict", "lcf") and weights:
        return {"weights": weights}
    return {}


def scheduler_names(text: str) -> list[str]:
    """--scheduler a,b,c, every name checked before anything runs."""
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if n not in SCHEDULERS]
    if bad:
        raise ValueError(f"--scheduler {bad[0]!r} is invalid; allowed: a comma-separated list of "
                         f"{', '.join(SCHEDULERS)}")
    return names


def check_numbers(args) -> None:
    """The numeric flags' ranges (argparse checks only their types)."""
    positive = {"--duration": args.duration, "--rpm": args.rpm, "--kv-capacity": args.kv_capacity,
                "--max-num-seqs": args.max_num_seqs, "--max-num-batched-tokens": args.max_num_batched_tokens,
                "--max-model-len": args.max_model_len, "--pool-pages": args.pool_pages,
                "--step-seconds": args.step_seconds, "--speedup": args.speedup, "--length-scale": args.length_scale}
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value} is invalid; allowed: a number > 0")


def load_workload(args) -> list[workloads.Request]:
    if bool(args.suite) == bool(args.workload):
        raise ValueError("give exactly one of --suite NAME or --workload FILE.jsonl")
    if args.suite:
        reqs = workloads.generate(args.suite, duration=args.duration, seed=args.seed)
    else:
        reqs = workloads.load(args.workload)
        if args.duration is not None:
            reqs = [r for r in reqs if r.arrival < args.duration]
    if not reqs:
        raise ValueError(f"the workload has no requests{' in the first ' + str(args.duration) + ' s' if args.duration else ''}")
    return reqs


def run_one(name: str, reqs, args, weights: dict):
    sched = make_scheduler(name, **scheduler_options(name, weights, args.rpm, args.rpm_reject))
    if args.simulate:
        cost = CostModel(**json.loads(Path(args.cost_model).read_text())) if args.cost_model else CostModel()
        config = SimConfig(kv_capacity=args.kv_capacity, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens, cost=cost)
        return simulate(reqs, sched, config)
    from jaxserve.engine import Engine
    from jaxserve.fairness.replay import replay
    model = str(TINY_MODEL) if args.model == "tiny" else args.model
    engine = Engine(model=model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, scheduler=sched,
                    num_pool_pages=args.pool_pages, seed=args.seed)
    adapters = demo_adapters(engine, reqs, Path(args.out) / "adapters") if args.demo_adapters else None
    return replay(engine, reqs, step_seconds=args.step_seconds, speedup=args.speedup,
                  length_scale=args.length_scale, seed=args.seed, adapters=adapters)


def demo_adapters(engine, reqs, folder: Path) -> dict:
    """A random PEFT adapter (ranks 4/8/16 in turn, q/v projections) for every adapter name the
    workload uses, so a replay exercises the unified pool as S-LoRA's experiments do."""
    from jaxserve.lora.demo import write_random_adapter
    from jaxserve.lora.request import LoRARequest
    names = sorted({r.adapter for r in reqs if r.adapter})
    out = {}
    for i, name in enumerate(names):
        path = folder / name
        if not (path / "adapter_config.json").exists():
            write_random_adapter(path, engine.model_config, rank=(4, 8, 16)[i % 3], seed=i)
        out[name] = LoRARequest(name, i + 1, str(path))
    return out


def fit_cost_model(results) -> CostModel:
    """The simulator's step-cost model fitted to real engine steps (wall clock): least squares of
    seconds on (prefill tokens, decode tokens, running requests)."""
    samples = [(st.prefill, st.decode, st.batch, st.duration) for r in results for st in r.steps if st.steps == 1]
    if len(samples) < 4:
        raise ValueError(f"only {len(samples)} engine steps to fit a cost model; run a longer workload")
    return CostModel.fit(samples)


def describe(result, reqs, weights: dict, w_p: float = 1.0, w_q: float = 2.0) -> dict:
    diff = M.backlogged_difference(result, w_p, w_q, weights)
    max_input = max((r.input_len for r in result.requests), default=0)
    out = {"scheduler": result.scheduler,
           "service_per_client": M.service_by_client(result, w_p, w_q, weights),
           "max_backlogged_difference": diff["max"], "avg_backlogged_difference": diff["avg"],
           "backlogged_seconds": diff["backlogged_time"],
           # M, the most tokens a running batch holds, is the KV capacity
           "bound_2U": M.vtc_bound(w_p, w_q, max_input, result.config.kv_capacity),
           "throughput_tokens_per_s": result.throughput(), "duration_s": result.end_time,
           "requests": len(result.requests), "finished": sum(r.finish is not None for r in result.requests),
           "rejected": sum(r.rejected for r in result.requests), "preemptions": result.num_preemptions,
           "first_token_latency": M.first_token_latency(result), "wall_seconds": result.wall_seconds}
    span = max((r.arrival for r in reqs), default=0.0)  # the workload's own length (600 s for the trace)
    if len({r.client for r in reqs}) > 2 and span >= 120:  # the real trace's table metric
        art = M.artifact_service_difference(result, T=float(round(span)))
        out["artifact_window_difference"] = {"max": art["max"], "avg": art["avg"], "throughput": art["throughput"]}
    return out


def run(args) -> dict:
    check_numbers(args)
    names = scheduler_names(args.scheduler)
    reqs = load_workload(args)
    weights = parse_weights(args.weights) or workloads.weights_of(reqs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, summary = [], {"workload": args.suite or str(args.workload), "requests": len(reqs),
                            "mode": "simulator" if args.simulate else f"engine ({args.model})",
                            "weights": weights, "schedulers": {}}
    for name in names:
        result = run_one(name, reqs, args, weights)
        results.append(result)
        key, k = name, 1
        while key in summary["schedulers"]:  # a scheduler listed again (a repeat run): name#2, ...
            k += 1
            key = f"{name}#{k}"
        summary["schedulers"][key] = describe(result, reqs, weights)
    if args.fit_cost_model:
        if args.simulate or args.step_seconds is not None:
            raise ValueError("--fit-cost-model needs real engine steps on the wall clock (no --simulate, "
                             "no --step-seconds)")
        cost = fit_cost_model(results)
        Path(args.fit_cost_model).write_text(json.dumps(dataclasses.asdict(cost), indent=2))
        summary["fitted_cost_model"] = dataclasses.asdict(cost)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    try:
        from jaxserve.fairness.plots import plot_compare, plot_run
        for name, result in zip(summary["schedulers"], results):
            plot_run(result, out / f"{name.replace('#', '-')}.png", weights=weights)
        if len(results) > 1:
            plot_compare(results, out / "compare.png", weights=weights, title=summary["workload"])
    except ImportError:  # matplotlib is a declared dependency; a stripped install still gets the numbers
        print("matplotlib is not installed: no plots")
    return summary


def print_table(summary: dict) -> None:
    print(f"workload {summary['workload']}: {summary['requests']} requests, {summary['mode']}")
    print(f"{'scheduler':>12} | {'max diff':>10} {'avg diff':>10} {'bound 2U':>10} | {'tok/s':>9} | "
          f"{'TTFT p50':>8} {'p99':>8} | {'finished':>8}")
    for name, s in summary["schedulers"].items():
        lat = s["first_token_latency"].get("all", {})
        print(f"{name:>12} | {s['max_backlogged_difference']:>10.1f} {s['avg_backlogged_difference']:>10.1f} "
              f"{s['bound_2U']:>10.0f} | {s['throughput_tokens_per_s']:>9.1f} | {lat.get('p50', float('nan')):>8.2f} "
              f"{lat.get('p99', float('nan')):>8.2f} | {s['finished']:>8}")


def add_arguments(p) -> None:
    p.add_argument("--suite", choices=sorted(workloads.SUITES), help="a generated workload of the VTC paper")
    p.add_argument("--workload", help="a JSONL workload file (client, arrival, input_len, output_len)")
    p.add_argument("--scheduler", default="vtc,fcfs,lcf", help="one or more of fcfs, vtc, vtc-predict, lcf, rpm")
    p.add_argument("--weights", help="CLIENT=WEIGHT,... (default: the workload's own weights)")
    p.add_argument("--rpm", type=int, help="requests per minute per client for --scheduler rpm (default 20)")
    p.add_argument("--rpm-reject", action="store_true", help="rpm: reject requests over the limit (as the "
                   "VTC artifact does) instead of delaying them")
    p.add_argument("--simulate", action="store_true", help="the simulator (seconds) instead of the real engine")
    p.add_argument("--out", required=True, help="folder for summary.json and the plots")
    p.add_argument("--duration", type=float, help="seconds of workload (suites: their own default)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--kv-capacity", type=int, default=10_000, help="simulator: KV cache tokens")
    p.add_argument("--cost-model", help="simulator: a JSON step-cost model (from --fit-cost-model)")
    p.add_argument("--fit-cost-model", metavar="FILE.json",
                   help="real engine: fit the simulator's step-cost model to this run's steps and save it")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--model", default="tiny", help="real engine: 'tiny' (the test fixture), 'smollm2' or a path")
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--pool-pages", type=int, default=None, help="real engine: pool size in pages")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="real engine: a virtual clock advancing this much per step (default: wall clock)")
    p.add_argument("--speedup", type=float, default=1.0, help="real engine, wall clock: workload seconds per second")
    p.add_argument("--demo-adapters", action="store_true",
                   help="real engine: serve each workload 'adapter' through a random PEFT adapter of its own")
    p.add_argument("--length-scale", type=float, default=1.0, help="real engine: scale token lengths to fit the model")


def main(args) -> int:
    if args.max_num_seqs is None:
        args.max_num_seqs = 256 if args.simulate else 32
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = 4096 if args.simulate else max(256, args.max_num_seqs)
    print_table(run(args))
    print(f"summary and plots in {args.out}")
    return 0
