"""Multi-host (jaxserve/distributed/multihost.py): two processes on this machine, one CPU device
each, joined by jax.distributed into one TP-2 mesh (collectives over gloo). Process 0 serves the
golden prompts through LLM; process 1 is `jaxserve follow` and repeats its device calls. The
tokens must be TP 1's (HF's golden greedy tokens), adapters included."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

from jaxserve import LLM
from jaxserve.config import EngineConfig

HERE = Path(__file__).parent


def free_port_pair() -> int:
    """A port p with p + 1 free too (the coordinator and the leader's plan channel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("localhost", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def test_two_processes_give_tp1_tokens(tmp_path, golden):
    port, out = free_port_pair(), tmp_path / "leader.json"
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    follower = subprocess.Popen(
        [sys.executable, "-m", "jaxserve.cli", "follow", "--model", str(TINY), "--max-model-len", "64",
         "--tensor-parallel-size", "2", "--max-loras", "4", "--max-lora-rank", "16",
         "--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "JAXSERVE_WARMUP": "0"})
    try:
        leader = subprocess.run([sys.executable, str(HERE / "multihost_worker.py"), str(port), str(out)],
                                capture_output=True, text=True, timeout=600, env=env)
        follower_out, follower_err = follower.communicate(timeout=120)
    finally:
        follower.kill()
    assert leader.returncode == 0, leader.stderr[-3000:]
    assert follower.returncode == 0, follower_err[-3000:]
    result = json.loads(out.read_text())
    assert (result["processes"], result["devices"]) == (2, 2)
    seen = {}
    for name, ids in zip(result["names"], result["ids"], strict=True):
        k = seen[name] = seen.get(name, -1) + 1
        assert ids == golden["tiny-llama"][name]["greedy"][k], (name, k)
    steps = int(follower_out.split("follower 1: ")[1].split()[0])
    assert steps > 0, follower_out


@pytest.mark.parametrize("options,message", [
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"), r"process_id=2 is invalid; allowed: 0\.\.1"),
    (dict(num_processes=2, process_id=1), r"coordinator_address=None is invalid with num_processes=2"),
    (dict(num_processes=0), r"num_processes=0 is invalid"),
])
def test_bad_process_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model=str(TINY), **options)


def test_llm_on_a_follower_points_to_follow():
    with pytest.raises(ValueError, match=r"process_id=1 is a multi-host follower.*jaxserve follow"):
        LLM(str(TINY), num_processes=2, process_id=1, coordinator_address="localhost:1")


def test_cli_commands_but_follow_refuse_a_follower(capsys):
    from jaxserve import cli
    code = cli.main(["generate", "--model", str(TINY), "--process-id", "1", "--num-processes", "2",
                     "--coordinator-address", "localhost:1", "hi"])
    assert code == 2
    assert "process_id=1 is a multi-host follower" in capsys.readouterr().err
