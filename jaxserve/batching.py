"""BatchScheduler: forms each step's batch — continuous batching — for the engine and the
fairness simulator alike.

It owns the running sequences and drives two collaborators: the fairness policy (jaxserve.sched:
the waiting requests and their order) and a memory model (the engine's `KVManager` over the
unified page pool, or the simulator's `TokenMemory`). It calls no model code. Each step:

1. `schedule()`: every running sequence with one token to process decodes, after claiming room
   for it; when memory has none, the most recently admitted running sequence is preempted
   (recompute: its memory is freed, it goes back to the policy and later re-prefills prompt +
   generated tokens). Then the policy offers waiting requests in its order; each is admitted if
   max_num_seqs, the token budget left after decode tokens and memory allow. Then prefill
   chunks in admission order under that budget (a long prompt is split across steps).
2. `commit(batch)` once the batch is on its way: each sequence's cache advances, and the policy
   is charged for prompt tokens processed for the first time (a preempted request's
   recomputation is not charged again: the client did not cause it). A decode token is charged
   when it is sampled (`charge`), so a request's last step is not charged twice.
3. `finish(seq)` when a request ends or is aborted: memory released, the policy told.

Charges go through `charge()`, which tells the listeners (`add_charge_listener`) too: the replay
and the simulator record per-step service there.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Callable, Protocol

from jaxserve.sched.base import Scheduler
from jaxserve.sequence import Sequence


@dataclasses.dataclass
class Chunk:
    """Tokens [start, start + length) of seq to process this step; sample after them if wants_token."""
    seq: Sequence
    start: int
    length: int
    wants_token: bool


@dataclasses.dataclass
class ScheduledBatch:
    decode: list[Sequence]        # one token each
    prefill: list[Chunk]
    admitted: list[Sequence]      # admitted this step (in admission order)
    preempted: list[Sequence]     # preempted this step (back with the policy)
    num_running: int = 0          # running sequences once it was formed

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_prefill_tokens(self) -> int:
        return sum(chunk.length for chunk in self.prefill)


class Memory(Protocol):
    """A running sequence's claim on KV memory. Only the memory model writes seq.capacity (the
    tokens its claim covers)."""

    def can_admit(self, seq: Sequence, num_running: int) -> bool: ...
    def admit(self, seq: Sequence) -> None: ...
    def grow(self, seq: Sequence, num_tokens: int) -> bool: ...   # False: nothing changed
    def release(self, seq: Sequence) -> None: ...


class BatchScheduler:
    def __init__(self, policy: Scheduler, memory: Memory, *, max_num_seqs: int, max_num_batched_tokens: int,
                 clock: Callable[[], float] = time.monotonic):
        self.policy, self.memory = policy, memory
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.clock = clock
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0
        self.last_batch: ScheduledBatch | None = None  # the latest schedule() (records, replay)
        self._charge_listeners: list[Callable[[Sequence, int, int], None]] = []

    # ---- requests in and out --------------------------------------------------------------
    def add(self, seq: Sequence) -> list[Sequence]:
        """A new request; returns the requests the policy refused meanwhile (rpm's reject mode),
        finished as aborted."""
        self.policy.add(seq)
        rejected = self.policy.drain_rejected()
        for seq in rejected:
            seq.finish("abort", f"rejected by the {self.policy.name} scheduler")
            seq.metrics.finished_time = self.clock()
        return rejected

    def finish(self, seq: Sequence) -> None:
        """seq ended (or was aborted): running, its memory is freed; waiting (preempted while its
        last token was in flight, or never admitted), it leaves the policy's queue."""
        if seq in self.running:
            self.running.remove(seq)
            self.memory.release(seq)
            self.policy.finish(seq)
        else:
            self.policy.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.policy) > 0

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self, pending: Mapping[Sequence, int] = MappingProxyType({})) -> ScheduledBatch:
        """pending: sequences with a sampled token still on the device (async overlap) -> its row."""
        decode, preempted = self._decoders(pending)
        admitted = self._admit(len(decode), pending)
        # A newly admitted one-token prompt (or remainder) decodes right away.
        decode += [s for s in admitted if s.num_tokens - s.num_computed_tokens == 1]
        prefill = self._prefill_chunks(self.max_num_batched_tokens - len(decode))
        self.last_batch = ScheduledBatch(decode, prefill, admitted, preempted, len(self.running))
        return self.last_batch

    def _decoders(self, pending: Mapping[Sequence, int]) -> tuple[list[Sequence], list[Sequence]]:
        """The running sequences whose next step processes one token (every token but the newest
        is in the cache), in running order, each with room for that token. A token still on the
        device (async overlap: in `pending`) counts as known; a sequence whose pending token
        is its last (max_tokens) has nothing to schedule."""
        decode, short = [], []
        for seq in self.running:
            in_flight = seq in pending
            known = seq.num_tokens + in_flight
            if known - seq.num_computed_tokens == 1:
                if in_flight and len(seq.output_token_ids) + 1 >= seq.max_tokens:
                    continue
                decode.append(seq)
                if known > seq.capacity:  # rare: its memory is full
                    short.append(seq)
        preempted: list[Sequence] = []
        for seq in short:
            if seq in preempted:
                continue
            while not self.memory.grow(seq, seq.num_tokens + (seq in pending)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        if preempted:
            decode = [s for s in decode if s not in preempted]
        return decode, preempted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.memory.release(seq)
        seq.preempted()
        self.num_preemptions += 1
        self.policy.requeue(seq)

    def _admit(self, num_decode: int, pending: Mapping[Sequence, int]) -> list[Sequence]:
        limit = self.max_num_seqs - len(self.running)
        if limit <= 0 or not len(self.policy):
            return []
        budget = self.max_num_batched_tokens - num_decode
        memory, running = self.memory, self.running

        def try_admit(seq: Sequence) -> bool:
            nonlocal budget
            # (a preempted request whose last token is still on the device waits a step)
            if budget <= 0 or seq in pending or not memory.can_admit(seq, len(running)):
                return False
            memory.admit(seq)
            running.append(seq)
            budget -= seq.num_tokens - seq.num_computed_tokens
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = self.clock()
            return True

        return self.policy.schedule(try_admit, limit)

    def _prefill_chunks(self, budget: int) -> list[Chunk]:
        prefill = []
        for seq in self.running:
            if budget <= 0:
                break
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1:
                length = min(remaining, budget)
                prefill.append(Chunk(seq, seq.num_computed_tokens, length, length == remaining))
                budget -= length
        return prefill

    def commit(self, batch: ScheduledBatch) -> None:
        """The batch is on its way: advance the cache, charge new prompt tokens."""
        charge = self.charge
        for seq in batch.decode:
            pos = seq.num_computed_tokens
            seq.num_computed_tokens = pos + 1
            if pos < seq.num_prompt_tokens:  # a prompt's last token processed alone
                new_prefill = pos + 1 - seq.num_charged_prefill
                if new_prefill > 0:
                    seq.num_charged_prefill = pos + 1
                    charge(seq, new_prefill, 0)
        for chunk in batch.prefill:
            seq = chunk.seq
            end = seq.num_computed_tokens + chunk.length
            new_prefill = max(0, min(end, seq.num_prompt_tokens) - seq.num_charged_prefill)
            seq.num_charged_prefill += new_prefill
            seq.num_computed_tokens = end
            if new_prefill:
                charge(seq, new_prefill, 0)

    # ---- service --------------------------------------------------------------------------
    def charge(self, seq: Sequence, prefill_tokens: int, decode_tokens: int) -> None:
        self.policy.charge(seq, prefill_tokens, decode_tokens)
        for listener in self._charge_listeners:
            listener(seq, prefill_tokens, decode_tokens)

    def add_charge_listener(self, listener: Callable[[Sequence, int, int], None]) -> None:
        self._charge_listeners.append(listener)

    def remove_charge_listener(self, listener: Callable[[Sequence, int, int], None]) -> None:
        self._charge_listeners.remove(listener)
