"""Requests-per-minute limit per client (the VTC paper's "RPM" / LShare baseline).

A client may have at most `rpm` requests admitted in any 60-second window (by `clock`, default
time.monotonic; the simulator replaces it with its virtual clock). Among the admissible
requests — those whose client is under its limit — the earliest arrival goes first (FCFS).
A request of a client over its limit waits until the client's oldest admission in the window is
60 s old (`next_wakeup()` says when), so the policy is not work-conserving: the server may idle
while requests wait. Only first admissions count: a preempted request coming back is not a new
request.

`reject=True` is the artifact's variant: a request that arrives while its client already had
`rpm` requests accepted in the last 60 s is rejected at `add` (never queued); rejected requests
collect in `rejected` for the caller to fail (`drain_rejected()`).
"""
from __future__ import annotations

import collections
import time
from typing import Callable

from jaxserve.sched.base import Scheduler
from jaxserve.sequence import Sequence

WINDOW = 60.0


class RPMScheduler(Scheduler):
    name = "rpm"

    def __init__(self, rpm: int = 20, clock: Callable[[], float] = time.monotonic, reject: bool = False):
        if int(rpm) < 1:
            raise ValueError(f"rpm must be >= 1, got {rpm}")
        self.rpm = int(rpm)
        self.clock = clock
        self.reject = bool(reject)
        self.queues: dict[str, collections.deque] = {}
        self._stamps: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._admitted: set[str] = set()
        self._waiting_ids: set[str] = set()
        self._n = 0
        self.rejected: list[Sequence] = []

    def _recent(self, client: str, now: float) -> collections.deque:
        s = self._stamps[client]
        while s and s[0] <= now - WINDOW:
            s.popleft()
        return s

    def admissible(self, client: str, now: float | None = None) -> bool:
        return len(self._recent(client, self.clock() if now is None else now)) < self.rpm

    def add(self, seq: Sequence) -> None:
        if self.reject:
            now = self.clock()
            s = self._recent(seq.client, now)
            if len(s) >= self.rpm:
                self.rejected.append(seq)
                return
            s.append(now)  # in reject mode the limit counts accepted arrivals
        self._insert(seq)

    def drain_rejected(self) -> list[Sequence]:
        out, self.rejected = self.rejected, []
        return out

    def _insert(self, seq: Sequence) -> None:
        q = self.queues.setdefault(seq.client, collections.deque())
        k = (seq.arrival_time, seq.order)
        i = len(q)
        while i > 0 and (q[i - 1].arrival_time, q[i - 1].order) > k:
            i -= 1
        q.insert(i, seq)
        self._waiting_ids.add(seq.request_id)
        self._n += 1

    def requeue(self, seq: Sequence) -> None:
        self._insert(seq)

    def remove(self, seq: Sequence) -> bool:
        if seq.request_id not in self._waiting_ids:
            return False
        self.queues[seq.client].remove(seq)
        self._waiting_ids.discard(seq.request_id)
        self._admitted.discard(seq.request_id)
        self._n -= 1
        return True

    def peek(self) -> Sequence | None:
        now = self.clock()
        best = None
        for c, q in self.queues.items():
            if not q:
                continue
            head = q[0]
            if (not self.reject and head.request_id not in self._admitted
                    and len(self._recent(c, now)) >= self.rpm):
                continue
            if best is None or (head.arrival_time, head.order) < (best.arrival_time, best.order):
                best = head
        return best

    def pop(self, seq: Sequence) -> None:
        q = self.queues[seq.client]
        assert q and q[0] is seq, "pop() takes the request peek() returned"
        q.popleft()
        self._waiting_ids.discard(seq.request_id)
        self._n -= 1
        if not self.reject and seq.request_id not in self._admitted:
            self._stamps[seq.client].append(self.clock())
        self._admitted.add(seq.request_id)

    def finish(self, seq: Sequence) -> None:
        self._admitted.discard(seq.request_id)

    def __len__(self) -> int:
        return self._n

    def next_wakeup(self) -> float | None:
        """The earliest time a waiting request that is held back by its limit becomes
        admissible (None if none is held back)."""
        now = self.clock()
        t = None
        for c, q in self.queues.items():
            if q:
                s = self._recent(c, now)
                if len(s) >= self.rpm:
                    w = s[len(s) - self.rpm] + WINDOW + 1e-6  # (just past it: no float tie)
                    t = w if t is None else min(t, w)
        return t
