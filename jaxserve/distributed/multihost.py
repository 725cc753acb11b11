"""Multi-host: one engine over the devices of several processes (one per host, as JAX runs on
multi-host GPU and TPU systems), joined by jax.distributed into one tensor-parallel mesh.

Process 0, the leader, is the engine that users talk to: it schedules, batches, samples and
answers. Every other process, a follower (`jaxserve follow ...` / `follow(**engine options)`),
builds the same engine from the same options — params read into its own devices' shards, the
pool, the compiled step — and then only repeats the leader's device calls. Multi-controller JAX
needs every process to run the same jitted programs in the same order with the same inputs, so
before each adapter page write and each step the leader sends that call's host inputs (the
packed batch, the adapters' tables, the sampler's rows, the static choices; a page write's rows)
to the followers over one TCP connection each (multiprocessing.connection, HMAC-authenticated
with JAXSERVE_MULTIHOST_KEY, on the coordinator's port + 1), in order, and each follower makes the
same call. The step's collectives run between the processes' devices (gloo on CPU, NCCL on GPU);
the sampled tokens come back replicated, and the leader reads its own copy.

A follower ends when the leader sends "stop" (at its exit) or its connection drops.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
from multiprocessing.connection import Client, Listener

import jax

logger = logging.getLogger("jaxserve")
_initialized: tuple | None = None


def _authkey() -> bytes:
    return os.environ.get("JAXSERVE_MULTIHOST_KEY", "jaxserve").encode()


def _plan_address(coordinator: str) -> tuple[str, int]:
    host, _, port = coordinator.rpartition(":")
    return host, int(port) + 1


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """jax.distributed.initialize, once per process (before anything touches a device)."""
    global _initialized
    if _initialized is not None:
        if _initialized != (coordinator, num_processes, process_id):
            raise ValueError(f"this process already joined {_initialized}; a process joins one group")
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices: collectives over TCP
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    _initialized = (coordinator, num_processes, process_id)


class Leader:
    """The leader's side: the followers' connections, and what is sent to them."""

    def __init__(self, coordinator: str, num_followers: int):
        address = _plan_address(coordinator)
        with Listener(address, authkey=_authkey()) as listener:  # closed once all have joined
            logger.info("multi-host: waiting for %d follower(s) on %s:%d", num_followers, *address)
            self._followers = [listener.accept() for _ in range(num_followers)]
        atexit.register(self.close)

    def send(self, message: tuple) -> None:
        for conn in self._followers:
            conn.send(message)

    def close(self) -> None:
        """Tell the followers to stop (once; at exit at the latest)."""
        followers, self._followers = self._followers, []
        for conn in followers:
            try:
                conn.send(("stop",))
                conn.close()
            except OSError:  # already gone
                pass


def _connect(address: tuple[str, int], timeout: float = 600.0):
    """The follower's connection, retried while the leader is still building its engine."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, authkey=_authkey())
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def follow(**engine_options) -> int:
    """Run a follower: build the engine of these options (process_id > 0) and repeat the
    leader's device calls until it stops. Returns the number of steps repeated."""
    from jaxserve.config import EngineConfig
    from jaxserve.engine import Engine

    config = EngineConfig(**engine_options)
    if config.num_processes < 2 or config.process_id == 0:
        raise ValueError(f"process_id={config.process_id!r} with num_processes={config.num_processes!r} is not a "
                         f"follower; allowed: num_processes >= 2 and process_id 1..num_processes-1")
    engine = Engine(config)
    steps = 0
    with _connect(_plan_address(config.coordinator_address)) as conn:
        while True:
            try:
                kind, *args = conn.recv()
            except EOFError:
                logger.error("multi-host: the leader's connection dropped; this follower stops")
                break
            if kind == "stop":
                break
            if kind == "write":
                engine.device_pool.write_pages(*args)
            else:  # "step": the same forward + sampler; waiting here keeps the queue short
                jax.block_until_ready(engine.runner.launch(*args))
                steps += 1
    return steps
