"""The fairness simulator's figures on every suite and on the real trace, under every scheduler:
service difference, throughput, preemptions, first-token latency — and a fingerprint of the run
(finish times), so a refactoring of the batch scheduler can be checked to change nothing.

    python benchmarks/simulator.py --out before.json
    python benchmarks/simulator.py --out after.json --compare before.json

benchmarks/simulator_baseline.json holds the figures from before the simulator drove the
engine's BatchScheduler (issue 11); `--compare` it to see what a change to batching moves.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from jaxserve.sched import make_scheduler
from jaxserve.fairness import metrics as M
from jaxserve.fairness import workloads
from jaxserve.fairness.sim import simulate

REAL_TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "vtc_real_trace.jsonl"
SCHEDULERS = ("vtc", "vtc-predict", "lcf", "fcfs", "rpm")


def fingerprint(result) -> str:
    """Every request's first-token and finish time: equal fingerprints mean identical runs."""
    times = [(r.request_id, r.first_token, r.finish, r.output_len, r.num_preemptions) for r in result.requests]
    return hashlib.sha256(repr(times).encode()).hexdigest()[:16]


def run_all() -> dict:
    jobs = [(suite, workloads.generate(suite)) for suite in workloads.SUITES]
    if REAL_TRACE.exists():
        jobs.append(("real-trace", workloads.load(REAL_TRACE)))
    figures = {}
    for name, workload in jobs:
        weights = workloads.weights_of(workload)
        for sched in SCHEDULERS:
            options = {"rpm": 20} if sched == "rpm" else ({"weights": weights} if weights and sched != "fcfs" else {})
            start = time.perf_counter()
            result = simulate(workload, make_scheduler(sched, **options))
            row = M.summary(result, weights=weights)
            row.update(seconds=round(time.perf_counter() - start, 3), steps=sum(s.steps for s in result.steps),
                       fingerprint=fingerprint(result))
            figures[f"{name}/{sched}"] = row
            print(f"{name:22s} {sched:12s} max_diff {row['max_diff']:9.1f} avg_diff {row['avg_diff']:8.1f} "
                  f"tput {row['throughput']:7.1f} preempt {row['preemptions']:5d} ttft_p50 {row['ttft_p50']:7.2f} "
                  f"steps {row['steps']:7d} {row['seconds']:6.2f}s {row['fingerprint']}", flush=True)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--compare", help="a JSON of an earlier run: print which figures changed")
    args = ap.parse_args()
    figures = run_all()
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        same = [k for k in figures if k in before and before[k]["fingerprint"] == figures[k]["fingerprint"]]
        print(f"{len(same)}/{len(figures)} runs identical to {args.compare}")
        for key in figures:
            if key not in same and key in before:
                b, a = before[key], figures[key]
                print(f"  {key}: " + ", ".join(f"{f} {b[f]:.4g} -> {a[f]:.4g}" for f in
                                                ("max_diff", "avg_diff", "throughput", "preemptions", "ttft_p50")))
        slow = sum(figures[k]["seconds"] for k in figures) / max(1e-9, sum(before[k]["seconds"] for k in figures if k in before))
        print(f"simulation time after/before: {slow:.2f}")


if __name__ == "__main__":
    main()
