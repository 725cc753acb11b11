"""Engine throughput and the host/device split per step, at several concurrencies.

    python benchmarks/engine.py [--models tiny,smollm2] [--concurrency 1,8,64,256]
    (or: jaxserve bench engine ...)

For each model and concurrency N: N requests arrive at once (prompts of --prompt-len random
tokens, --output-len generated tokens each, greedy, ignore_eos) into an engine with
max_num_seqs = N; after a warm-up round, the fastest of --repeats timed rounds. Both engine
modes run side by side, their rounds alternating:

- sync (async_overlap=False): each step dispatches its batch and waits for its tokens, so the
  split is clean — device ms = forward + sampler until the tokens are on the host, host ms =
  scheduling + batch building + output processing; host % is the host share of the step;
- overlap (the default): step N+1 is dispatched before step N's tokens are read, so host work
  runs while the device computes. Its exposed host share is (wall per step - sync device ms) /
  wall per step: the time the device would sit idle waiting for the host.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = {"tiny": str(REPO / "tests" / "fixtures" / "tiny-llama"), "smollm2": "smollm2"}


def one_round(engine, n: int, prompt_len: int, output_len: int, seed: int) -> dict:
    """One round of n simultaneous requests; figures for this round only."""
    from jaxserve import SamplingParams
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, output_kind="final_only")
    for i in range(n):
        engine.add_request(f"{seed}-{i}", {"prompt_token_ids": rng.integers(3, vocab, prompt_len).tolist()}, params)
    steps0, host0, dev0, tok0 = (engine.stats.steps, engine.stats.host_seconds, engine.stats.device_seconds,
                                 engine.stats.tokens)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - start
    steps = engine.stats.steps - steps0
    host, device = engine.stats.host_seconds - host0, engine.stats.device_seconds - dev0
    tokens = engine.stats.tokens - tok0
    return {"concurrency": n, "tokens_per_s": tokens / elapsed, "steps": steps, "seconds": elapsed,
            "wall_ms_per_step": 1e3 * elapsed / steps,
            "host_ms_per_step": 1e3 * host / steps, "device_ms_per_step": 1e3 * device / steps,
            "host_fraction": host / (host + device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--concurrency", default="1,8,64,256")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per mode; the fastest is reported")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    import jax
    from jaxserve import runtime
    from jaxserve.engine import Engine

    runtime.setup_process()

    logging.getLogger("jaxserve").setLevel(logging.WARNING)
    print(f"jax {jax.__version__} on {jax.default_backend()}; prompt {args.prompt_len} + output "
          f"{args.output_len} tokens per request, greedy")
    print(f"{'model':>8} {'N':>5} | {'sync tok/s':>10} {'host ms':>8} {'device ms':>9} {'host %':>7} | "
          f"{'overlap tok/s':>13} {'wall ms':>8} {'exposed host %':>14} | {'gain':>5}")
    results = []
    for model in args.models.split(","):
        for n in (int(c) for c in args.concurrency.split(",")):
            row = {"model": model, "concurrency": n}
            engines = {mode: Engine(model=MODELS.get(model, model), max_model_len=args.prompt_len + args.output_len + 16,
                                    max_num_seqs=n, max_num_batched_tokens=max(512, n), seed=0, async_overlap=overlap)
                       for mode, overlap in (("sync", False), ("overlap", True))}
            runtime.freeze_startup_heap()
            rounds = {mode: [] for mode in engines}
            for mode, engine in engines.items():
                one_round(engine, n, args.prompt_len, args.output_len, seed=1)  # warm-up round
            # The two modes alternate round by round, so a drift in the (shared, noisy) machine's
            # speed hits both alike; the fastest round of each is reported.
            for r in range(args.repeats):
                for mode, engine in engines.items():
                    rounds[mode].append(one_round(engine, n, args.prompt_len, args.output_len, seed=2 + r))
            for mode in engines:
                row[mode] = max(rounds[mode], key=lambda x: x["tokens_per_s"])
            del engines
            sync, ov = row["sync"], row["overlap"]
            row["exposed_host_fraction"] = max(0.0, 1 - sync["device_ms_per_step"] / ov["wall_ms_per_step"])
            row["overlap_gain"] = ov["tokens_per_s"] / sync["tokens_per_s"]
            results.append(row)
            print(f"{model:>8} {n:>5} | {sync['tokens_per_s']:>10.1f} {sync['host_ms_per_step']:>8.2f} "
                  f"{sync['device_ms_per_step']:>9.2f} {100 * sync['host_fraction']:>6.1f}% | "
                  f"{ov['tokens_per_s']:>13.1f} {ov['wall_ms_per_step']:>8.2f} {100 * row['exposed_host_fraction']:>13.1f}% | "
                  f"{row['overlap_gain']:>5.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
