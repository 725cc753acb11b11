"""The HF transformers + PEFT peer of benchmarks/throughput.py: same model, prompts and adapters.

    /path/to/hf-venv/bin/python benchmarks/hf_peer.py JOB.json OUT.json

Run by throughput.py with a python that has torch, transformers, peft and gguf (the CPU build:
`pip install torch==2.13.0 transformers peft gguf` in a venv of its own); imports nothing from
jaxserve. JOB.json: {"model_dir", "gguf_file" (or null for an HF folder), "prompts" (token id
lists), "adapters" [[name, folder], ...], "which" (adapter index per request), "batch_sizes",
"output_len", "repeats"}.

The base model is loaded once in float32, every adapter is loaded into one PeftModel, and each
batch is generated with PEFT's mixed-adapter inference (adapter_names, one per row), greedy,
exactly output_len new tokens, prompts left-padded. For each batch size, all requests are run in
order; the best of `repeats` full passes is reported. OUT.json: {"<bs>": {"tok_s", "seconds"},
"tokens": output ids of the first batch of the first batch size, "torch", "transformers", "peft",
"threads"}.
"""
from __future__ import annotations

import json
import sys
import time

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

PAD = 0  # any id: padded positions are masked out (attention_mask 0)


def load(job: dict):
    kwargs = {"gguf_file": job["gguf_file"]} if job.get("gguf_file") else {}
    base = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32, **kwargs)
    (name0, folder0), *rest = job["adapters"]
    model = PeftModel.from_pretrained(base, folder0, adapter_name=name0)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def generate(model, prompts: list[list[int]], names: list[str], output_len: int) -> torch.Tensor:
    """Greedy new tokens [len(prompts), output_len]; each row through its own adapter."""
    ids, mask = left_pad(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=output_len,
                         min_new_tokens=output_len, do_sample=False, pad_token_id=PAD)
    return out[:, ids.shape[1]:]


def one_pass(model, job: dict, names: list[str], bs: int) -> tuple[float, list[list[int]]]:
    """Seconds for all requests in order, bs at a time, and the first batch's output ids."""
    prompts, first = job["prompts"], None
    start = time.perf_counter()
    for i in range(0, len(prompts), bs):
        out = generate(model, prompts[i:i + bs], names[i:i + bs], job["output_len"])
        first = out.tolist() if first is None else first
    return time.perf_counter() - start, first


def main(argv=None) -> int:
    job_path, out_path = (argv or sys.argv[1:])[:2]
    job = json.loads(open(job_path).read())
    transformers.logging.set_verbosity_error()
    model = load(job)
    config = model.generation_config
    # Greedy means greedy: drop the model's own sampling defaults. And no EOS at all, as jaxserve's
    # ignore_eos (EOS may be generated, nothing stops): with an eos id, min_new_tokens would mask
    # EOS out of the argmax instead, and the two systems would differ where EOS is the top token.
    config.temperature = config.top_p = config.top_k = config.eos_token_id = None
    names = [job["adapters"][i][0] for i in job["which"]]
    result = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "threads": torch.get_num_threads()}
    total = len(job["prompts"]) * job["output_len"]
    with torch.inference_mode():
        generate(model, job["prompts"][:2], names[:2], 2)  # untimed warm-up
        for bs in job["batch_sizes"]:
            runs = [one_pass(model, job, names, bs) for _ in range(job.get("repeats", 1))]
            seconds = min(r[0] for r in runs)
            result[str(bs)] = {"tok_s": total / seconds, "seconds": seconds}
            result.setdefault("tokens", runs[0][1])
            print(f"hf-peft bs {bs}: {total / seconds:.1f} tok/s ({seconds:.1f} s)", flush=True)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
