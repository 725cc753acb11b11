"""The GPU run in one command, within a time budget: kernel correctness, kernel speed, S-LoRA's
serving settings against their baselines, and the rows for benchmarks/RESULTS.md.

    bash benchmarks/gpu.sh [--out DIR] [--budget 470]     (sets up a bare GPU machine, then this)
    python benchmarks/gpu.py [--out DIR] [--budget 470] [--smoke]
    (or: jaxserve bench gpu ...)

Steps, each a subprocess with its own time limit, run in order while the budget lasts (a step
that would not fit in what is left is skipped and says so):
1. the Pallas kernels compiled for the GPU against their references (the kernel tests, which run
   compiled wherever jax's backend is a GPU);
2. `bench kernels --quick`: paged decode attention's KV bandwidth against a measured device copy
   and jax's own paged_attention; LoRA time added to a Llama-7B decode layer at 64 / 1,000
   adapters against the padded baseline; the decode layer (projections + attention) against its
   memory-bandwidth floor;
3. one short s1 run that fills the persistent compilation cache, so that no timed run compiles;
4. `bench serve` on S-LoRA's settings: s1 (Llama-7B, rank 8) at 1, 100 and 1,000 adapters (1,000
   with --compare merged,padded), s2 (ranks 64-8) at 100 with --compare padded, s4 (Llama-13B) at
   100 with --compare merged — at --rate requests/s (above S-LoRA's saturation) for --duration s.
Every step's output goes to DIR/<step>.log and its figures to DIR/<step>.json; DIR/results.md
gets the table rows for benchmarks/RESULTS.md and DIR/summary.json all the figures.

--smoke runs the same sequence on a CPU with the tiny model in a few seconds per step (the
kernels in interpret mode; step 1 skipped: the CPU suite runs it): how CI checks this script.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL_TESTS = ("tests/test_pallas_attention.py", "tests/test_pallas_lora.py", "tests/test_engine_pallas.py")
# (preset, adapters, baselines): S-LoRA's settings, as many as fit in the budget.
SERVE_RUNS = (("s1", 1000, "merged,padded"), ("s1", 100, ""), ("s1", 1, ""), ("s2", 100, "padded"),
              ("s4", 100, "merged"))


def steps(args) -> list[dict]:
    """The run's steps: name, argv, time limit (s) and the least time worth starting it with."""
    python, out = sys.executable, Path(args.out)
    serve = [python, str(HERE / "serve.py"), "--no-progress", "--alpha", "1"]
    plan = []
    if not args.smoke:
        plan.append(dict(name="kernels_correct", argv=[python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                                       *KERNEL_TESTS], limit=150, least=60))
    plan.append(dict(name="kernels_bench", argv=[python, str(HERE / "kernels.py"), "--quick", "--json",
                                                 str(out / "kernels_bench.json")], limit=120, least=40))
    if args.smoke:
        runs = [("tiny", 8, "merged,padded"), ("tiny", 1, "")]
        rate, duration, limit = "20", "1.5", 20
    else:
        runs = list(SERVE_RUNS)
        rate, duration, limit = str(args.rate), str(args.duration), args.duration + 30
        plan.append(dict(name="compile_warm", argv=serve + ["--preset", "s1", "--num-adapters", "64", "--request-rate",
                                                            rate, "--duration", "3", "--time-limit", "60"],
                         limit=240, least=60))
    for preset, adapters, compare in runs:
        name = f"serve_{preset}_{adapters}"
        argv = serve + ["--preset", preset, "--num-adapters", str(adapters), "--request-rate", rate, "--duration",
                        duration, "--time-limit", str(limit), "--save-result", str(out / f"{name}.json")]
        if compare:
            argv += ["--compare", compare]
        systems = 1 + len(compare.split(",")) if compare else 1
        plan.append(dict(name=name, argv=argv, limit=systems * (limit + 40), least=systems * 20))
    return plan


def run_step(step: dict, out: Path, left: float) -> dict:
    """Run one step (its output to out/<name>.log); its status and seconds."""
    limit = min(step["limit"], left)
    start = time.perf_counter()
    with open(out / f"{step['name']}.log", "w") as log:
        try:
            proc = subprocess.run(step["argv"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return {"status": status, "seconds": round(time.perf_counter() - start, 1)}


def serve_rows(out: Path, names: list[str]) -> list[str]:
    """benchmarks/RESULTS.md rows from the serve steps' JSON: one per system."""
    rows = []
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        preset, adapters = result["config"]["preset"], result["config"]["num_adapters"]
        ours = result["systems"]["jaxserve"]["output_throughput"]
        for system, r in result["systems"].items():
            ratio = ours / r["output_throughput"] if r["output_throughput"] else float("inf")
            rows.append(f"| {preset} | {adapters} | {system} | {r['completed']}/{result['num_requests']} | "
                        f"{r['request_throughput']:.2f} | {r['output_throughput']:.0f} | {r['ttft_ms']['mean']:.0f} / "
                        f"{r['ttft_ms']['p99']:.0f} | {r['tpot_ms']['mean']:.1f} | {100 * r['slo_attainment']:.0f}% | "
                        f"{ratio:.2f}x |")
    return rows


def environment() -> dict:
    import jax
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "command": " ".join(sys.argv)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-results", help="folder for the logs, JSON and results.md")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (steps that would not "
                   "fit are skipped)")
    p.add_argument("--rate", type=float, default=24.0, help="requests/s of the serve runs (S-LoRA's s1 saturates "
                   "at 7.6 on an A100)")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of trace per serve run")
    p.add_argument("--smoke", action="store_true", help="the same sequence on a CPU with the tiny model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    if env["backend"] != "gpu" and not args.smoke:
        print(f"jax's backend is {env['backend']!r}, not a GPU: this run is for a GPU machine (use --smoke to try "
              f"the sequence on a CPU)")
        return 2
    print(f"{env['date']} | {env['machine']} | python {env['python']} | jax {env['jax']} | {env['devices']}")
    start, report = time.perf_counter(), {}
    for step in steps(args):
        left = args.budget - (time.perf_counter() - start)
        if left < step["least"]:
            report[step["name"]] = {"status": f"skipped: {left:.0f} s left of the budget"}
        else:
            report[step["name"]] = run_step(step, out, left)
        print(f"{step['name']:<20} {report[step['name']]['status']:<28} {report[step['name']].get('seconds', '')}",
              flush=True)
    rows = serve_rows(out, [n for n in report if n.startswith("serve_")])
    header = ("| preset | adapters | system | done | req/s | out tok/s | TTFT mean / P99 (ms) | TPOT mean (ms) | "
              "SLO | jaxserve x |\n|---|---|---|---|---|---|---|---|---|---|")
    (out / "results.md").write_text("\n".join([f"{env['date']}, {env['devices']}, jax {env['jax']}", header, *rows]) + "\n")
    (out / "summary.json").write_text(json.dumps({**env, "steps": report}, indent=1))
    print("\n" + header + "\n" + "\n".join(rows))
    print(f"\n{time.perf_counter() - start:.0f} s in all; logs, JSON and results.md in {out}")
    return 0 if all(r["status"] == "ok" for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
