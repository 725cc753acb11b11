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

Presets: `tiny` (the test fixture; lengths [4, 24)) and `smollm2` (lengths [8, 256)) for a CPU;
`s1`, `s2`, `s4` (S-LoRA's settings: random weights in Llama-7B / -13B shapes) for a GPU. Prints
vLLM's result block plus the SLO attainment (first token within --slo-ttft seconds: S-LoRA's 6 s),
adapter loads / evictions, and the pool's peak pages by kind; --save-result writes it as JSON.

--compare runs baselines on the same trace and prompts, one after another in this process, and
prints a table with jaxserve's throughput ratio to each and how many requests got jaxserve's tokens:
- padded: vLLM's fixed slots — max_loras slots set apart beside the KV pages, each adapter stored
  and computed at max_lora_rank on every module (S-LoRA's padded "bmm" ablation);
- separate-memory: adapters paged at their own ranks, but in that same region set apart instead of
  the unified pool (S-LoRA's "no-unify-mem" ablation);
- merged: one adapter at a time merged into the base weights, batches of one adapter (PEFT's way);
- hf-peft: HF transformers + PEFT (benchmarks/hf_serve_peer.py) run by --hf-python.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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
PRESETS = {
    # name: model, adapter ranks (cycled over the adapters), default input / output ranges, engine
    # overrides. S-LoRA's settings (its Table 3): S1 Llama-7B rank 8; S2 Llama-7B ranks 64/32/16/8;
    # S4 Llama-13B ranks 64/32/16; lengths uniform in [8, 512). Random weights, bf16 on a GPU.
    "tiny": dict(model="tiny", ranks=(4, 8, 16), input_range=(4, 24), output_range=(4, 24),
                 engine=dict(max_model_len=64, max_lora_rank=16)),
    "smollm2": dict(model="smollm2", ranks=(4, 8, 16, 32), input_range=(8, 256), output_range=(8, 256),
                    engine=dict(max_model_len=512, max_lora_rank=32)),
    "s1": dict(model="random:llama-7b", ranks=(8,), input_range=(8, 512), output_range=(8, 512),
               engine=dict(max_model_len=1024, max_lora_rank=8, max_num_seqs=256, max_num_batched_tokens=2048)),
    "s2": dict(model="random:llama-7b", ranks=(64, 32, 16, 8), input_range=(8, 512), output_range=(8, 512),
               engine=dict(max_model_len=1024, max_lora_rank=64, max_num_seqs=256, max_num_batched_tokens=2048)),
    "s4": dict(model="random:llama-13b", ranks=(64, 32, 16), input_range=(8, 512), output_range=(8, 512),
               engine=dict(max_model_len=1024, max_lora_rank=64, max_num_seqs=256, max_num_batched_tokens=2048)),
}
# The systems --compare runs beside jaxserve; the engine ones differ only in where adapters live.
ADAPTER_MEMORY = {"jaxserve": "unified", "padded": "padded", "separate-memory": "separate", "merged": "unified"}
BASELINES = ("padded", "separate-memory", "merged", "hf-peft")


@dataclasses.dataclass
class Timeline:
    """One request's times (seconds since the run's start) and sizes."""
    arrival: float
    input_len: int
    output_len: int = 0
    token_times: list = dataclasses.field(default_factory=list)  # one entry per output token
    tokens: list = dataclasses.field(default_factory=list)
    finish: float | None = None
    finish_reason: str | None = None


def trace_prompts(trace, vocab_size: int, seed: int) -> list[list[int]]:
    """Each request's prompt: input_len random token ids, the same for every system compared."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, r.input_len).tolist() for r in trace]


class DirectDispatch:
    """jaxserve (and the padded / separate-memory baselines): every request goes to the engine the
    moment it arrives, with its adapter; the engine batches whatever adapters it has."""

    def __init__(self, engine, adapters: dict):
        self.engine, self.adapters = engine, adapters

    def arrive(self, rid: str, request, prompt: list[int], params) -> None:
        self.engine.add_request(rid, {"prompt_token_ids": prompt}, params, self.adapters.get(request.adapter),
                                client=request.client)

    def pending(self) -> bool:
        return False

    def before_step(self) -> None:
        pass


class MergedDispatch:
    """The `merged` baseline, PEFT's way of serving a fine-tune: one adapter merged into the base
    weights at a time. When the engine is idle, the adapter of the oldest waiting request is
    merged in (the merge is timed with the run) and every waiting request of that adapter runs as
    one batch, without LoRA; the others wait for their adapter's turn."""

    def __init__(self, engine, adapters: dict):
        from jaxserve.lora.peft import load_peft_adapter
        cfg, rank = engine.model_config, engine.config.max_lora_rank
        self.engine = engine
        self.peft = {name: load_peft_adapter(req.lora_path, cfg, rank) for name, req in adapters.items()}
        self.base, self.current = engine.runner.params, None
        self.waiting: list[tuple] = []
        self.merges = 0

    def arrive(self, rid: str, request, prompt: list[int], params) -> None:
        self.waiting.append((rid, request, prompt, params))

    def pending(self) -> bool:
        return bool(self.waiting)

    def before_step(self) -> None:
        if self.engine.has_unfinished_requests() or not self.waiting:
            return
        adapter = self.waiting[0][1].adapter
        if adapter != self.current:
            import jax

            from jaxserve.lora.merge import merge_adapter
            params = merge_adapter(self.base, self.peft.get(adapter), self.engine.model_config)
            self.engine.runner.params = jax.block_until_ready(params)
            self.current, self.merges = adapter, self.merges + 1
        batch = [w for w in self.waiting if w[1].adapter == adapter]
        self.waiting = [w for w in self.waiting if w[1].adapter != adapter]
        for rid, request, prompt, params in batch:
            self.engine.add_request(rid, {"prompt_token_ids": prompt}, params, None, client=request.client)


def run_trace(engine, trace, prompts, dispatch, progress=None, time_limit: float | None = None
              ) -> tuple[list[Timeline], float, dict]:
    """Replay the trace on the wall clock; returns the timelines, the duration (first arrival to
    last finish) and the pool's peak pages by kind. Past time_limit seconds, what is unfinished is
    aborted (it counts as failed) and requests not yet arrived are not sent."""
    from jaxserve import SamplingParams
    timelines: dict[str, Timeline] = {}
    peak = {"kv": 0, "adapter": 0}
    start = time.perf_counter()
    next_arrival = 0
    while next_arrival < len(trace) or dispatch.pending() or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        if time_limit is not None and now > time_limit:
            engine.abort_all()
            break
        while next_arrival < len(trace) and trace[next_arrival].arrival <= now:
            r = trace[next_arrival]
            rid = f"r{next_arrival}"
            params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, output_kind="delta")
            dispatch.arrive(rid, r, prompts[next_arrival], params)
            timelines[rid] = Timeline(r.arrival, r.input_len)
            next_arrival += 1
        dispatch.before_step()
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(trace[next_arrival].arrival, time_limit or float("inf")) - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            t = timelines[out.request_id]
            completion = out.outputs[0]
            t.token_times += [now] * len(completion.token_ids)
            t.tokens += completion.token_ids
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
              line("Failed requests:", r["failed"], "{:<10}")]
    if "adapter_loads" in r:  # (the engine's systems; not the HF peer)
        lines.append(line("Adapters used / loads / evictions:",
                          f"{r['adapters_used']} / {r['adapter_loads']} / {r['adapter_evictions']}"))
        region = f" (adapters only in {r['adapter_region_pages']})" if r.get("adapter_region_pages") else ""
        lines.append(line("Pool pages (peak KV / peak adapter / total):",
                          f"{r['peak_pages']['kv']} / {r['peak_pages']['adapter']} / {r['pool_pages']}{region}"))
    if r.get("merges") is not None:
        lines.append(line("Adapter switches (merges):", r["merges"], "{:<10}"))
    return "\n".join(lines + ["=" * 50])


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
    p.add_argument("--time-limit", type=float, help="seconds of wall clock per system; then the rest is aborted "
                   "(counted as failed) and throughput is what finished by then")
    p.add_argument("--slo-ttft", type=float, default=6.0, help="seconds (S-LoRA: 6)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--num-pool-pages", type=int, default=None)
    p.add_argument("--max-loras", type=int, default=None, help="distinct adapters in one batch (engine default 32)")
    p.add_argument("--all-modules", action="store_true", help="adapters on all seven projections, not q/k/v/o")
    p.add_argument("--compare", type=_systems, default=(),
                   help=f"baselines to run on the same trace after jaxserve, comma-separated: {', '.join(BASELINES)}")
    p.add_argument("--hf-python", default=os.environ.get("JAXSERVE_HF_PYTHON"),
                   help="a python with torch, transformers, peft and gguf, for --compare hf-peft")
    p.add_argument("--hf-max-batch", type=int, default=32, help="the HF peer's batch size")
    p.add_argument("--save-result", help="write the figures and the configuration as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _systems(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BASELINES]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: distinct names among {', '.join(BASELINES)}")
    return names


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        value = (int(lo), int(hi))
    except ValueError:
        value = None
    if not sep or value is None or not 1 <= value[0] < value[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: LO:HI with 1 <= LO < HI")
    return value


def run_engine_system(system: str, engine_kwargs: dict, trace, prompts, adapters: dict, args) -> dict:
    """One engine system on the trace: jaxserve, or a baseline (padded, separate-memory, merged)."""
    from jaxserve.engine import Engine
    engine = Engine(**engine_kwargs, adapter_memory=ADAPTER_MEMORY[system])
    if system == "merged":
        dispatch = MergedDispatch(engine, adapters)
    else:
        for request in adapters.values():
            engine.add_lora(request)
        dispatch = DirectDispatch(engine, adapters)
    timelines, duration, peak = run_trace(engine, trace, prompts, dispatch, progress_bar(args, system, len(trace)),
                                          args.time_limit)
    result = summarize(timelines, duration, args.slo_ttft)
    metrics = engine.adapters.metrics()
    paged = [engine.adapters.pages_of(name) for name in adapters] if system != "merged" else []
    result.update(adapters_used=len(adapters), adapter_loads=metrics["adapter_loads"],
                  adapter_evictions=metrics["adapter_evictions"], peak_pages=peak, pool_pages=engine.pool.num_pages,
                  adapter_region_pages=None if engine.pool.unified else engine.pool.capacity("adapter"),
                  mean_adapter_pages=float(np.mean(paged)) if paged else None,
                  slot_pages=engine.adapters.max_adapter_pages(), merges=getattr(dispatch, "merges", None))
    return result, [t.tokens for t in timelines]


def run_hf_system(args, model: str, trace, prompts, adapters: dict, tmp: Path) -> tuple[dict | None, list | None]:
    """The HF transformers + PEFT peer (benchmarks/hf_serve_peer.py, run by --hf-python) on the
    same trace; (None, None) with a message when it cannot run."""
    sys.path.insert(0, str(HERE))
    from throughput import HF_INSTALL, PEER_FLAGS, check_hf_python

    from jaxserve.model.weights import resolve_model
    why = check_hf_python(args.hf_python)
    if why is None and model.startswith("random:"):
        why = f"model {model!r} has no checkpoint for transformers to load"
    if why:
        print(f"hf-peft SKIPPED: {why}; to include it: {HF_INSTALL}, then --hf-python that venv's python")
        return None, None
    path = resolve_model(model)
    job = {"model_dir": str(path.parent if path.suffix == ".gguf" else path),
           "gguf_file": path.name if path.suffix == ".gguf" else None,
           "adapters": [[name, req.lora_path] for name, req in adapters.items()],
           "requests": [{"arrival": r.arrival, "prompt_token_ids": p, "output_len": r.output_len, "adapter": r.adapter}
                        for r, p in zip(trace, prompts)],
           "max_batch": args.hf_max_batch, "threads": None}
    job_path, out_path = tmp / "hf_job.json", tmp / "hf_out.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run([args.hf_python, *PEER_FLAGS, str(HERE / "hf_serve_peer.py"), str(job_path), str(out_path)],
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"hf-peft FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None, None
    out = json.loads(out_path.read_text())
    timelines = [Timeline(**t) for t in out["timelines"]]
    duration = max(t.finish for t in timelines) - (trace[0].arrival if trace else 0.0)
    result = summarize(timelines, duration, args.slo_ttft)
    result.update(adapters_used=len(adapters), peer={k: out.get(k) for k in ("torch", "transformers", "peft",
                                                                              "threads", "load_seconds")})
    return result, out["tokens"]


def progress_bar(args, system: str, total: int):
    from tqdm import tqdm
    return None if args.no_progress else tqdm(total=total, desc=f"{system} requests", file=sys.stderr)


def agreement(tokens: list, reference: list) -> float:
    """The fraction of requests whose tokens equal the reference's exactly."""
    return sum(list(a) == list(b) for a, b in zip(tokens, reference)) / max(1, len(reference))


def comparison_table(results: dict) -> str:
    """One line per system, and jaxserve's ratio to each (output tok/s)."""
    ours = results["jaxserve"]["output_throughput"]
    lines = [f"{'system':<16} {'req/s':>7} {'out tok/s':>10} {'TTFT mean/P99 (ms)':>22} {'SLO %':>6} "
             f"{'loads/evict':>12} {'same tokens':>11} {'jaxserve x':>10}"]
    for system, r in results.items():
        churn = f"{r['adapter_loads']}/{r['adapter_evictions']}" if "adapter_loads" in r else "-"
        if r.get("merges") is not None:
            churn = f"{r['merges']} merges"
        ratio = ours / r["output_throughput"] if r["output_throughput"] else float("inf")
        lines.append(f"{system:<16} {r['request_throughput']:>7.2f} {r['output_throughput']:>10.1f} "
                     f"{r['ttft_ms']['mean']:>10.0f} / {r['ttft_ms']['p99']:<9.0f} {100 * r['slo_attainment']:>6.1f} "
                     f"{churn:>12} {100 * r['same_tokens']:>10.0f}% {ratio:>9.2f}x")
    return "\n".join(lines)


def capacity_line(results: dict) -> str | None:
    """Adapters that fit in the padded baseline's adapter memory: paged at their own ranks
    against fixed slots of the largest rank."""
    padded, ours = results.get("padded"), results["jaxserve"]
    if not padded or not ours.get("mean_adapter_pages"):
        return None
    region = padded["adapter_region_pages"]
    paged, slots = region / ours["mean_adapter_pages"], region // padded["slot_pages"]
    return (f"Adapter capacity in {region} pages: paged {paged:.1f} (mean {ours['mean_adapter_pages']:.1f} pages "
            f"each) vs padded slots {slots} ({padded['slot_pages']} pages each): {paged / slots:.2f}x")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxserve import LoRARequest, runtime
    from jaxserve.config import ATTN_MODULES, LORA_MODULES, ModelConfig
    from jaxserve.fairness.run import TINY_MODEL
    from jaxserve.fairness.workloads import adapter_name, slora_trace
    from jaxserve.lora.demo import write_random_adapter
    from jaxserve.model.weights import model_hf_config
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
    modules = LORA_MODULES if args.all_modules else ATTN_MODULES
    # The engine's LoRA modules are the adapters' (vLLM-style slots then hold only those).
    engine_kwargs = dict(model=model, scheduler=args.scheduler, lora_modules=modules,
                         **{**preset["engine"], **overrides})
    cfg = ModelConfig.from_hf(model_hf_config(model))
    prompts = trace_prompts(trace, cfg.vocab_size, args.seed)
    used = {r.adapter for r in trace}
    results, tokens = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for k in range(args.num_adapters):  # only the adapters the trace uses are written (and registered)
            name = adapter_name(k)
            if name in used:
                folder = write_random_adapter(Path(tmp) / name, cfg, rank=preset["ranks"][k % len(preset["ranks"])],
                                              target_modules=modules, seed=args.seed + k)
                adapters[name] = LoRARequest(name, k + 1, str(folder))
        for system in ("jaxserve", *args.compare):
            if system == "hf-peft":
                result, toks = run_hf_system(args, model, trace, prompts, adapters, Path(tmp))
            else:
                result, toks = run_engine_system(system, engine_kwargs, trace, prompts, adapters, args)
            if result is not None:
                results[system], tokens[system] = result, toks
    for system, result in results.items():
        result["same_tokens"] = agreement(tokens[system], tokens["jaxserve"])
        print(f"\n{system}" + (" (greedy tokens equal to jaxserve's: "
                                f"{100 * result['same_tokens']:.0f}% of requests)" if system != "jaxserve" else ""))
        print(result_block(result))
    if len(results) > 1:
        print("\n" + comparison_table(results))
        capacity = capacity_line(results)
        if capacity:
            print(capacity)
    if args.save_result:
        import jax
        config = {k: v for k, v in vars(args).items() if k != "save_result"}
        Path(args.save_result).write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "jax": jax.__version__, "backend": jax.default_backend(), "command": shlex.join(sys.argv),
            "model": model, "config": config, "num_requests": len(trace), **results["jaxserve"],
            "systems": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
