"""The HTTP server under a real load generator (NVIDIA's aiperf) against LLM.generate on the same
job, in one run: what the HTTP layer costs at saturation.

    python benchmarks/serving_http.py --aiperf /path/to/aiperf-venv/bin/aiperf [--requests 128]
    (or: jaxserve bench serving_http ...)

aiperf lives in a venv of its own (`python3.11 -m venv V && V/bin/pip install aiperf`), never in
jaxserve's dependencies. It needs a local tokenizer folder: this script writes one from the
model's own tokenizer (tokenizer.json + tokenizer_config.json).

The job: --requests chat requests, each a user message of --prompt-words random common words,
--output-len forced output tokens (greedy, ignore_eos), request i through adapter i % --adapters
(random PEFT LoRA folders on all seven projections, ranks cycling through 8 and 16) for tenant
i % --tenants (the request's `user` field). Systems:

- llm-generate: one LLM (engine defaults), an untimed warm-up, then ONE LLM.chat of all requests,
  timed before AND after the server's run (this machine is shared and noisy: the two bracket the
  server's run; the better one is the reference, so the ratio errs against the server);
- http-server: `jaxserve serve` (a subprocess, the same engine flags and adapters) driven by aiperf
  over /v1/chat/completions with streaming: the same requests (an aiperf single_turn file, each
  entry naming its model, tenant and output length), --concurrency in flight (default: all), a
  few warm-up requests first; aiperf counts output tokens from the server's usage.

Prints output tokens/s of both and their ratio (target >= 0.9 at saturation, i.e. the default
concurrency: every request at once, as LLM.chat has them), and aiperf's TTFT / ITL / request
latency. aiperf's own processes share this machine's cores with the server.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than "
         "first been its who now people my made over did down only way find use may water long little very "
         "after words called just where most know get through back much before go good new write our used me "
         "man too any day same right look think also around another came come work three word must because "
         "does part even place well such here take why things help put years different away again off went "
         "old number great tell men say small every found still between name should home big give air line "
         "set own under read last never us left end along while might next sound below saw something thought "
         "both few those always looked show large often together asked house world going want school important "
         "until form food keep children feet land side without boy once animals life enough took sometimes "
         "four head above kind began almost live page got earth need far hand high year mother light parts "
         "country father let night following picture being study second eyes soon times story boys since white "
         "days paper hard near sentence better best across during today others however sure means knew").split()


def make_requests(count: int, words: int, adapters: int, tenants: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, words)), "adapter": f"lora{i % adapters}",
             "tenant": f"tenant{i % tenants}"} for i in range(count)]


def write_tokenizer_folder(tokenizer, folder: Path) -> Path:
    """The model's tokenizer as an HF folder, for aiperf (which counts tokens with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tokenizer.chat_template,
              **tokenizer.special_tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def run_llm(llm, args, adapter_paths: list[Path], requests: list[dict]) -> dict:
    from jaxserve import LoRARequest, SamplingParams
    loras = {f"lora{i}": LoRARequest(f"lora{i}", i + 1, str(p)) for i, p in enumerate(adapter_paths)}
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    conversations = [[{"role": "user", "content": r["text"]}] for r in requests]
    lora_list = [loras[r["adapter"]] for r in requests]
    llm.chat(conversations[:8], params, lora_list[:8], use_tqdm=False)  # warm-up (adapters loaded)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, lora_list, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
    return {"output_tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "prompt_tokens_mean": float(np.mean(prompt_tokens))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, adapter_paths: list[Path], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--model", args.model, "--port", str(port),
           "--served-model-name", "base", "--scheduler", args.scheduler,
           "--max-waiting-requests", str(max(1024, args.requests)), "--log-level", "warning"]
    for i, path in enumerate(adapter_paths):
        cmd += ["--lora", f"lora{i}={path}"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); its log: {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server did not start in 900 s; its log: {log_path}")


def run_aiperf(args, url: str, requests: list[dict], tokenizer_dir: Path, out: Path) -> dict:
    dataset = out / "requests.jsonl"
    with open(dataset, "w") as f:
        for r in requests:
            f.write(json.dumps({"text": r["text"], "output_length": args.output_len,
                                "extra": {"model": r["adapter"], "user": r["tenant"], "ignore_eos": True,
                                          "temperature": 0}}) + "\n")
    concurrency = args.concurrency or args.requests
    cmd = [args.aiperf, "profile", "--model", "base", "--url", url, "--endpoint-type", "chat", "--streaming",
           "--tokenizer", str(tokenizer_dir), "--input-file", str(dataset), "--custom-dataset-type", "single_turn",
           "--dataset-sampling-strategy", "sequential", "--request-count", str(args.requests),
           "--warmup-request-count", str(args.warmup_requests), "--concurrency", str(concurrency),
           "--request-rate", "1000", "--arrival-pattern", "constant", "--use-server-token-count",
           "--workers-max", "1", "--record-processors", "1", "--ui", "none", "--no-server-metrics",
           "--no-gpu-telemetry", "--random-seed", "0", "--artifact-dir", str(out / "aiperf")]
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}  # never the hub
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL if args.quiet else None)
    summary = json.loads((out / "aiperf" / "profile_export_aiperf.json").read_text())
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aiperf", required=True, help="the aiperf executable (in its own venv)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight (default: all of them)")
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--scheduler", default="vtc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep aiperf's artifacts and the server log here")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--quiet", action="store_true", help="hide aiperf's own tables")
    args = p.parse_args(argv)

    from jaxserve import LLM
    from jaxserve.config import LORA_MODULES
    from jaxserve.lora.demo import write_random_adapter
    out = Path(args.out or tempfile.mkdtemp(prefix="jaxserve-http-"))
    out.mkdir(parents=True, exist_ok=True)
    requests = make_requests(args.requests, args.prompt_words, args.adapters, args.tenants, args.seed)

    engine = LLM(args.model)
    adapter_paths = [write_random_adapter(out / "adapters" / f"lora{i}", engine.model_config, rank=(8, 16)[i % 2],
                                          target_modules=LORA_MODULES, seed=args.seed + i)
                     for i in range(args.adapters)]
    def timed_llm(when: str) -> dict:
        result = run_llm(engine, args, adapter_paths, requests)
        print(f"llm-generate ({when}): {result['output_tokens']} tokens in {result['seconds']:.1f} s = "
              f"{result['tok_s']:.1f} tok/s (mean prompt {result['prompt_tokens_mean']:.0f} tokens)", flush=True)
        return result

    before = timed_llm("before")
    tokenizer_dir = write_tokenizer_folder(engine.get_tokenizer(), out / "tokenizer")
    server, url = start_server(args, adapter_paths, out / "server.log")
    try:
        summary = run_aiperf(args, url, requests, tokenizer_dir, out)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(300)
    after = timed_llm("after")
    llm = max(before, after, key=lambda r: r["tok_s"])
    http_tok_s = summary["output_token_throughput"]["avg"]
    ratio = http_tok_s / llm["tok_s"]
    ms = {k: summary[k] for k in ("time_to_first_token", "inter_token_latency", "request_latency")}
    print(f"\n{'system':14s} {'output tok/s':>12s}")
    print(f"{'llm-generate':14s} {llm['tok_s']:12.1f}   (before {before['tok_s']:.1f}, after {after['tok_s']:.1f}: "
          f"the better one)")
    print(f"{'http-server':14s} {http_tok_s:12.1f}   ratio {ratio:.3f} (target >= 0.9)")
    for name, m in ms.items():
        print(f"  {name:22s} avg {m['avg']:9.1f} ms  p50 {m['p50']:9.1f}  p99 {m['p99']:9.1f}")
    print(f"  requests {summary['request_count']['avg']:.0f}, errors {summary.get('error_summary') or 'none'}, "
          f"server exit code after SIGTERM: {code}")
    if args.json:
        import jax
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "jax": jax.__version__, "command": shlex.join(sys.argv), "llm_generate": {"before": before, "after": after},
            "http_server_tok_s": http_tok_s, "ratio": ratio, "aiperf": {k: summary[k] for k in ms}}, indent=1))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
