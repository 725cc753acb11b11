"""First come, first served across all clients (vLLM's and SGLang's default)."""
from __future__ import annotations

import heapq

from jaxserve.sched.base import Scheduler
from jaxserve.sequence import Sequence


class FCFSScheduler(Scheduler):
    name = "fcfs"

    def __init__(self):
        self._heap: list[tuple[float, int, Sequence]] = []  # (arrival, admission order, seq)
        self._waiting: set[str] = set()

    def add(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (seq.arrival_time, seq.order, seq))
        self._waiting.add(seq.request_id)

    requeue = add  # same key: a preempted request regains its place by arrival

    def remove(self, seq: Sequence) -> bool:
        if seq.request_id not in self._waiting:
            return False
        self._waiting.discard(seq.request_id)
        self._heap = [e for e in self._heap if e[2] is not seq]
        heapq.heapify(self._heap)
        return True

    def peek(self) -> Sequence | None:
        return self._heap[0][2] if self._heap else None

    def pop(self, seq: Sequence) -> None:
        assert self._heap[0][2] is seq
        heapq.heappop(self._heap)
        self._waiting.discard(seq.request_id)

    def __len__(self) -> int:
        return len(self._heap)
