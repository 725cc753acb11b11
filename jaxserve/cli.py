"""`jaxserve` command line: generate, demo, serve, follow, bench, fairness."""
from __future__ import annotations

import argparse
import sys
import time


# Engine knobs the CLI exposes, generated from EngineConfig (same names, types and defaults, so
# they cannot drift from the Python API's); tests/test_cli.py checks them field by field.
ENGINE_FLAGS = ("dtype", "max_model_len", "max_lora_rank", "max_loras", "seed", "page_size", "max_num_seqs",
                "max_num_batched_tokens", "pool_bytes", "gpu_memory_utilization", "num_pool_pages", "kernels",
                "tensor_parallel_size", "coordinator_address", "num_processes", "process_id")
_FLAG_TYPES = {"int": int, "float": float, "str": str}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from jaxserve.config import EngineConfig
    p.add_argument("--model", default=EngineConfig.model, help="'smollm2', an HF folder or a .gguf file")
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    for name in ENGINE_FLAGS:
        field = fields[name]
        kind = _FLAG_TYPES[str(field.type).split(" ")[0]]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=field.default,
                       help=f"EngineConfig.{name} (default {field.default})")


def _engine_kwargs(args) -> dict:
    return {"model": args.model, **{name: getattr(args, name) for name in ENGINE_FLAGS}}


def _sampling(args):
    from jaxserve import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.sampling_seed)


def cmd_generate(args) -> int:
    from jaxserve import LLM, LoRARequest
    llm = LLM(**_engine_kwargs(args))
    lora = None
    if args.lora:
        name, _, path = args.lora.partition("=")
        if not path:
            raise SystemExit(f"--lora {args.lora!r} is invalid; allowed: NAME=PATH_TO_PEFT_FOLDER")
        lora = LoRARequest(name, 1, path)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], _sampling(args), lora)
    else:
        outputs = llm.generate(prompts, _sampling(args), lora)
    elapsed = time.perf_counter() - start
    for out in outputs:
        print(f"--- {out.prompt!r}\n{out.outputs[0].text}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s, JIT compilation included)")
    return 0


BENCHMARKS = ("adapters", "compile", "engine", "gpu", "kernels", "serve", "serving_http", "tensor_parallel",
              "throughput")


def cmd_follow(args) -> int:
    from jaxserve.distributed import multihost
    steps = multihost.follow(**_engine_kwargs(args))
    print(f"follower {args.process_id}: {steps} steps repeated; the leader stopped")
    return 0


def cmd_bench(args) -> int:
    """Run benchmarks/<name>.py (from the source checkout) with the remaining arguments."""
    import runpy
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.exists():
        raise SystemExit(f"{script} not found: `jaxserve bench` runs from a source checkout")
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:  # the script's own exit status (argparse's 2 for bad flags too)
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for prompts (arguments or stdin lines)")
    _add_model_args(gen)
    gen.add_argument("prompt", nargs="*")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--lora", help="NAME=PATH of a PEFT adapter folder to use for every prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
    from jaxserve import demo as demo_job
    demo = sub.add_parser("demo", help="the main job: SmolLM2, 32 adapters, 4 tenants, FCFS vs VTC (--quick: "
                          "four prompts in one batch)")
    _add_model_args(demo)
    # Batch shapes for a CPU demo: fewer to compile at start-up, big enough for 4 tenants' traffic.
    demo.set_defaults(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64, max_lora_rank=32)
    demo_job.add_arguments(demo)
    demo.set_defaults(func=demo_job.main)
    from jaxserve.server import cli as serve_cli
    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server (adapters by `model`, tenants "
                           "as fairness clients, /metrics)")
    _add_model_args(serve)
    serve_cli.add_arguments(serve)
    serve.set_defaults(func=lambda args: serve_cli.main(args, _engine_kwargs(args)))
    follow = sub.add_parser("follow", help="a multi-host follower (process_id > 0): repeats process 0's device "
                            "calls over its own devices (jaxserve/distributed/multihost.py)")
    _add_model_args(follow)
    follow.set_defaults(func=cmd_follow)
    bench = sub.add_parser("bench", help=f"run a benchmark: {', '.join(BENCHMARKS)} (args after it pass through)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    from jaxserve.fairness import run as fairness_run
    fair = sub.add_parser("fairness", help="per-client fairness of schedulers on a workload (simulator or engine)")
    fairness_run.add_arguments(fair)
    fair.set_defaults(func=fairness_run.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxserve import runtime  # (here, not at import: --help stays instant)
    runtime.setup_process()
    try:
        if args.command != "follow" and getattr(args, "process_id", 0):
            raise ValueError(f"process_id={args.process_id} is a multi-host follower; allowed: `jaxserve "
                             f"{args.command}` on process 0 and `jaxserve follow` on the others")
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, as argparse does
        print(f"jaxserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
