"""The HF transformers + PEFT peer of benchmarks/serve.py: the same trace, replayed on the wall clock
by a static-batching HF server (PEFT's serving pattern: mixed-adapter batches).

    /path/to/hf-venv/bin/python benchmarks/hf_serve_peer.py JOB.json OUT.json

Run with a python that has torch, transformers, peft and gguf (as benchmarks/hf_peer.py, whose
`load` and `left_pad` it uses); imports nothing from jaxserve. JOB.json: {"model_dir", "gguf_file"
(or null for an HF folder), "adapters" [[name, folder], ...] (may be empty: the plain base model),
"requests" [{"arrival" (seconds from the start), "prompt_token_ids", "output_len", "adapter" (a
name or null)}, ...] sorted by arrival, "max_batch", "threads" (or null: torch's default)}.

The model (float32) and every adapter are loaded, and one tiny generate warms up, before the clock
starts. Then, in a loop: if nothing has arrived yet, sleep until the next arrival; take up to
max_batch arrived requests in arrival order; run one greedy `generate` for the batch, left-padded,
each row through its own adapter (adapter_names), max_new_tokens = min_new_tokens = the batch's
largest output_len; each row is then cut at its own output_len. Requests arriving meanwhile wait
for the next batch. Every generation step's wall time is recorded; a request's token_times are
the first output_len of them, its finish the last of those. OUT.json: {"timelines" [{"arrival",
"input_len", "output_len", "token_times", "finish", "finish_reason": "length"}, ...] in the
JOB's request order (seconds since the replay's start, trace time 0), "tokens" (each request's
new token ids), "load_seconds", "torch", "transformers", "peft", "threads"}.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peer import PAD, left_pad, load  # noqa: E402  (after the path: run as a script)

BASE = "__base__"  # PEFT's adapter name for "no adapter" in adapter_names (peft >= 0.12)


class StepClock(StoppingCriteria):
    """Appends the time (since `start`) at which each generation step's tokens exist; never stops."""

    def __init__(self, start: float):
        self.start, self.times = start, []

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter() - self.start)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def load_model(job: dict):
    """The model in float32 with every adapter, greedy and EOS-free (as hf_peer.py)."""
    if job["adapters"]:
        model = load(job)
    else:  # no adapter: the plain base model, no PeftModel around it
        kwargs = {"gguf_file": job["gguf_file"]} if job.get("gguf_file") else {}
        model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32, **kwargs).eval()
    # Greedy means greedy, and no EOS (jaxserve's ignore_eos): see hf_peer.main.
    config = model.generation_config
    config.temperature = config.top_p = config.top_k = config.eos_token_id = None
    return model


def generate(model, batch: list[dict], clock: StepClock) -> list[list[int]]:
    """One generate for the batch; each row's new token ids, cut at its own output_len."""
    ids, mask = left_pad([r["prompt_token_ids"] for r in batch])
    steps = max(r["output_len"] for r in batch)
    kwargs = {}
    if isinstance(model, PeftModel):
        kwargs["adapter_names"] = [r["adapter"] or BASE for r in batch]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, pad_token_id=PAD, stopping_criteria=StoppingCriteriaList([clock]),
                         **kwargs)
    new = out[:, ids.shape[1]:].tolist()
    return [row[:r["output_len"]] for row, r in zip(new, batch)]


def timeline(request: dict, step_times: list[float]) -> dict:
    times = step_times[:request["output_len"]]
    return {"arrival": request["arrival"], "input_len": len(request["prompt_token_ids"]),
            "output_len": len(times), "token_times": times, "finish": times[-1], "finish_reason": "length"}


def replay(model, requests: list[dict], max_batch: int) -> tuple[list[dict], list[list[int]]]:
    """Serve the trace on the wall clock; timelines and tokens in request order."""
    timelines, tokens = [], []
    start = time.perf_counter()
    nxt = 0  # requests are served in arrival order, so the waiting ones are requests[nxt:arrived]
    while nxt < len(requests):
        now = time.perf_counter() - start
        if requests[nxt]["arrival"] > now:  # nobody waits: idle until the next arrival
            time.sleep(requests[nxt]["arrival"] - now)
            continue
        end = nxt
        while end < len(requests) and end - nxt < max_batch and requests[end]["arrival"] <= now:
            end += 1
        batch, clock = requests[nxt:end], StepClock(start)
        for request, row in zip(batch, generate(model, batch, clock)):
            timelines.append(timeline(request, clock.times))
            tokens.append(row)
        nxt = end
    return timelines, tokens


def main(argv=None) -> int:
    job_path, out_path = (argv or sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    model = load_model(job)
    with torch.inference_mode():
        # Untimed warm-up (first-call allocations), part of loading, before the clock starts.
        first = job["requests"][0] if job["requests"] else None
        if first:
            generate(model, [dict(first, output_len=2)], StepClock(started))
        load_seconds = time.perf_counter() - started
        print(f"hf-peft loaded in {load_seconds:.1f} s; replaying {len(job['requests'])} requests", flush=True)
        timelines, tokens = replay(model, job["requests"], job["max_batch"])
    result = {"timelines": timelines, "tokens": tokens, "load_seconds": load_seconds, "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__,
              "threads": torch.get_num_threads()}
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
