"""One process of the 2-process multi-host test (tests/test_multihost.py): the leader generates
the golden prompts (the base model and the fixture adapters mixed in one batch) over a mesh of
its CPU device and the follower's, and writes the token ids as JSON."""
import json
import os
import sys

os.environ["JAXSERVE_WARMUP"] = "0"

from conftest import ADAPTERS, FIXTURES, TINY, lora_request  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402


def main(port: str, out_path: str) -> None:
    golden = json.loads((FIXTURES / "golden.json").read_text())
    llm = LLM(str(TINY), max_model_len=64, tensor_parallel_size=2, max_loras=4, max_lora_rank=16,
              coordinator_address=f"localhost:{port}", num_processes=2, process_id=0)
    names = ["base", *ADAPTERS]
    cases = [(a, p) for a in names for p in golden["tiny-llama"][a]["prompts"]]
    outs = llm.generate([{"prompt_token_ids": p} for _, p in cases],
                        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                        [None if a == "base" else lora_request(a) for a, _ in cases], use_tqdm=False)
    import jax
    with open(out_path, "w") as f:
        json.dump({"names": [a for a, _ in cases], "ids": [o.outputs[0].token_ids for o in outs],
                   "processes": jax.process_count(), "devices": len(jax.devices())}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
