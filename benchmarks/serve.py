"""S-LoRA's serving experiment through the real engine: a synthetic trace of requests over many
adapters at a request rate, replayed on the wall clock, measured as vLLM's `bench serve` reports.

    python benchmarks/serve.py --preset smollm2 --num-adapters 100 --request-rate 2 --duration 60
    (or: jaxserve bench serve ...)

The trace (jaxserve.fairness.workloads.slora_trace, S-LoRA's benchmarks' definition): adapter
index int(N x power(alpha)), gamma inter-arrivals (--cv 1: Poisson) at --request-rate, input and
output lengths uniform in their ranges, adapter k owned by tenant k % --tenants. Each request is
its input length of random prompt token ids and exactly its output length of greedy tokens
(ignore_eos), through its adapter: random PEFT LoRA folders (B non-zero) on the attention
projections q/k/v/o (S-LoRA's experiments' adapters; --all-modules: all seven), ranks cycling
through the preset's. Requests arrive at their trace times; the engine
steps in between; every output's time is recorded (TTFT, TPOT, ITL, E2E as vLLM defines them).

Presets (CPU): `tiny` (the test fixture; lengths [4, 24)), `smollm2` (lengths [8, 256)). Prints
vLLM's result block plus the SLO attainment (first token within --slo-ttft seconds: S-LoRA's 6 s),
adapter loads / evictions, and the pool's peak pages by kind; --save-result writes it as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRESETS = {
    # name: model, adapter ranks, default input / output ranges, engine overrides
    "tiny": dict(model="tiny", ranks=(4, 8, 16), input_range=(4, 24), output_range=(4, 24),
                 engine=dict(max_model_len=64, max_lora_rank=16)),
    "smollm2": dict(model="smollm2", ranks=(8, 16, 32), input_range=(8, 256), output_range=(8, 256),
                    engine=dict(max_model_len=512, max_lora_rank=32)),
}


@dataclasses.dataclass
class Timeline:
    """One request's times (seconds since the run's start) and sizes."""
    arrival: float
    input_len: int
    output_len: int = 0
    token_times: list = dataclasses.field(default_factory=list)  # one entry per output token
    finish: float | None = None
    finish_reason: str | None = None


def run_trace(engine, trace, adapters: dict, seed: int, progress=None) -> tuple[list[Timeline], float, dict]:
    """Replay the trace on the wall clock; returns the timelines, the duration (first arrival to
    last finish) and the pool's peak pages by kind."""
    from jaxserve import SamplingParams
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    timelines: dict[str, Timeline] = {}
    peak = {"kv": 0, "adapter": 0}
    start = time.perf_counter()
    next_arrival = 0
    while next_arrival < len(trace) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while next_arrival < len(trace) and trace[next_arrival].arrival <= now:
            r = trace[next_arrival]
            rid = f"r{next_arrival}"
            params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, output_kind="delta")
            engine.add_request(rid, {"prompt_token_ids": rng.integers(3, vocab, r.input_len).tolist()}, params,
                               adapters.get(r.adapter), client=r.client)
            timelines[rid] = Timeline(r.arrival, r.input_len)
            next_arrival += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, trace[next_arrival].arrival - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            t = timelines[out.request_id]
            completion = out.outputs[0]
            t.token_times += [now] * len(completion.token_ids)
            t.output_len += len(completion.token_ids)
            if out.finished:
                t.finish, t.finish_reason = now, completion.finish_reason
                if progress is not None:
                    progress.update(1)
        stats = engine.pool.stats()
        peak = {"kv": max(peak["kv"], stats["pages_kv"]), "adapter": max(peak["adapter"], stats["pages_adapter"])}
    duration = time.perf_counter() - start - (trace[0].arrival if trace else 0.0)
    return list(timelines.values()), duration, peak


def summarize(timelines: list[Timeline], duration: float, slo_ttft: float) -> dict:
    """vLLM's bench-serve figures (ms for latencies) plus the SLO attainment."""
    done = [t for t in timelines if t.finish_reason in ("length", "stop")]
    ttft = [(t.token_times[0] - t.arrival) * 1e3 for t in done if t.token_times]
    tpot = [(t.finish - t.token_times[0]) * 1e3 / (t.output_len - 1) for t in done if t.output_len > 1]
    itl = [(b - a) * 1e3 for t in done for a, b in zip(t.token_times, t.token_times[1:]) if b > a]
    e2e = [(t.finish - t.arrival) * 1e3 for t in done]
    inputs, outputs = sum(t.input_len for t in done), sum(t.output_len for t in done)

    def stats(values):
        values = values or [0.0]
        return {"mean": float(np.mean(values)), "median": float(np.median(values)),
                "p99": float(np.percentile(values, 99))}

    return {"completed": len(done), "failed": len(timelines) - len(done), "duration": duration,
            "total_input_tokens": inputs, "total_output_tokens": outputs,
            "request_throughput": len(done) / duration, "output_throughput": outputs / duration,
            "total_token_throughput": (inputs + outputs) / duration,
            "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2el_ms": stats(e2e),
            "slo_ttft_s": slo_ttft,
            "slo_attainment": sum(v <= slo_ttft * 1e3 for v in ttft) / max(1, len(timelines))}


def result_block(r: dict) -> str:
    """vLLM's `bench serve` printout, line for line, then jaxserve's additions."""
    def line(label, value, fmt="{:<10.2f}"):
        return f"{label:<40} {fmt.format(value) if not isinstance(value, str) else value}"

    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             line("Successful requests:", r["completed"], "{:<10}"),
             line("Benchmark duration (s):", r["duration"]),
             line("Total input tokens:", r["total_input_tokens"], "{:<10}"),
             line("Total generated tokens:", r["total_output_tokens"], "{:<10}"),
             line("Request throughput (req/s):", r["request_throughput"]),
             line("Output token throughput (tok/s):", r["output_throughput"]),
             line("Total Token throughput (tok/s):", r["total_token_throughput"])]
    for key, title, short in (("ttft_ms", "Time to First Token", "TTFT"),
                              ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl_ms", "Inter-token Latency", "ITL"), ("e2el_ms", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(line(f"{name} {short} (ms):", r[key][stat]))
    lines += ["{s:{c}^{n}}".format(s=" jaxserve ", n=50, c="-"),
              line(f"SLO attainment (TTFT <= {r['slo_ttft_s']:g} s):", f"{100 * r['slo_attainment']:.1f} %"),
              line("Failed requests:", r["failed"], "{:<10}"),
              line("Adapters used / loads / evictions:",
                   f"{r['adapters_used']} / {r['adapter_loads']} / {r['adapter_evictions']}"),
              line("Pool pages (peak KV / peak adapter / total):",
                   f"{r['peak_pages']['kv']} / {r['peak_pages']['adapter']} / {r['pool_pages']}"),
              "=" * 50]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from jaxserve.sched import SCHEDULERS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    p.add_argument("--model", help="override the preset's model ('tiny', 'smollm2', an HF folder or a .gguf)")
    p.add_argument("--num-adapters", type=int, default=100)
    p.add_argument("--alpha", type=float, default=1.0, help="adapter popularity: power(alpha); < 1 skews")
    p.add_argument("--request-rate", type=float, default=2.0, help="requests per second")
    p.add_argument("--cv", type=float, default=1.0, help="inter-arrival coefficient of variation (1: Poisson)")
    p.add_argument("--input-len", type=_range, help="LO:HI, uniform in [LO, HI) (default: the preset's)")
    p.add_argument("--output-len", type=_range, help="LO:HI, uniform in [LO, HI) (default: the preset's)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of trace")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scheduler", default="fcfs", choices=sorted(SCHEDULERS))
    p.add_argument("--tenants", type=int, default=1, help="adapter k belongs to tenant k %% tenants")
    p.add_argument("--slo-ttft", type=float, default=6.0, help="seconds (S-LoRA: 6)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--num-pool-pages", type=int, default=None)
    p.add_argument("--max-loras", type=int, default=None, help="distinct adapters in one batch (engine default 32)")
    p.add_argument("--all-modules", action="store_true", help="adapters on all seven projections, not q/k/v/o")
    p.add_argument("--save-result", help="write the figures and the configuration as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        value = (int(lo), int(hi))
    except ValueError:
        value = None
    if not sep or value is None or not 1 <= value[0] < value[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: LO:HI with 1 <= LO < HI")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from jaxserve import LoRARequest, runtime
    from jaxserve.config import ATTN_MODULES, LORA_MODULES
    from jaxserve.engine import Engine
    from jaxserve.fairness.run import TINY_MODEL
    from jaxserve.fairness.workloads import adapter_name, slora_trace
    from jaxserve.lora.demo import write_random_adapter
    runtime.setup_process()
    preset = PRESETS[args.preset]
    model = args.model or preset["model"]
    model = str(TINY_MODEL) if model == "tiny" else model
    input_range, output_range = args.input_len or preset["input_range"], args.output_len or preset["output_range"]
    trace = slora_trace(args.num_adapters, args.alpha, args.request_rate, args.cv, args.duration, input_range,
                        output_range, args.tenants, args.seed)
    if not trace:
        raise ValueError(f"request_rate x duration = {args.request_rate * args.duration:g}: no request to send")
    overrides = {k: v for k, v in (("max_num_seqs", args.max_num_seqs), ("num_pool_pages", args.num_pool_pages),
                                   ("max_loras", args.max_loras)) if v is not None}
    if "max_num_seqs" in overrides:
        overrides["max_num_batched_tokens"] = max(512, overrides["max_num_seqs"])
    engine = Engine(model=model, scheduler=args.scheduler, **preset["engine"], **overrides)
    used = {r.adapter for r in trace}
    with tempfile.TemporaryDirectory() as tmp:
        ranks = preset["ranks"]
        adapters = {}
        for k in range(args.num_adapters):  # only the adapters the trace uses are written (and registered)
            name = adapter_name(k)
            if name not in used:
                continue
            folder = write_random_adapter(Path(tmp) / name, engine.model_config, rank=ranks[k % len(ranks)],
                                          target_modules=LORA_MODULES if args.all_modules else ATTN_MODULES,
                                          seed=args.seed + k)
            adapters[name] = LoRARequest(name, k + 1, str(folder))
            engine.add_lora(adapters[name])
        progress = None if args.no_progress else tqdm(total=len(trace), desc="requests", file=sys.stderr)
        try:
            timelines, duration, peak = run_trace(engine, trace, adapters, args.seed, progress)
        finally:
            if progress is not None:
                progress.close()
    result = summarize(timelines, duration, args.slo_ttft)
    metrics = engine.adapters.metrics()
    result.update(adapters_used=len(used), adapter_loads=metrics["adapter_loads"],
                  adapter_evictions=metrics["adapter_evictions"], peak_pages=peak, pool_pages=engine.pool.num_pages)
    print(result_block(result))
    if args.save_result:
        import jax
        config = {k: v for k, v in vars(args).items() if k != "save_result"}
        Path(args.save_result).write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "jax": jax.__version__, "backend": jax.default_backend(), "command": shlex.join(sys.argv),
            "model": model, "config": config, "num_requests": len(trace), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
