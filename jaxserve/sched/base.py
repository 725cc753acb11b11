"""The scheduler interface the engine (and later the fairness simulator) drives.

A scheduler owns the waiting requests, kept per client. Each step the engine asks it for
admissions through `schedule(try_admit, limit)`: the scheduler offers candidates in its policy's
order and the engine admits each if the budgets and the pool allow. The engine reports service
actually processed (`charge`), and finished, aborted and preempted requests.
"""
from __future__ import annotations

import abc
from typing import Callable

from jaxserve.sequence import Sequence


class Scheduler(abc.ABC):
    name = "base"

    @abc.abstractmethod
    def add(self, seq: Sequence) -> None:
        """A new request joins its client's queue."""

    @abc.abstractmethod
    def requeue(self, seq: Sequence) -> None:
        """A preempted request goes back; it should be admitted again before newer ones."""

    @abc.abstractmethod
    def remove(self, seq: Sequence) -> bool:
        """Drop a waiting request (abort); False if it was not waiting."""

    @abc.abstractmethod
    def peek(self) -> Sequence | None:
        """The next request the policy would admit, or None."""

    @abc.abstractmethod
    def pop(self, seq: Sequence) -> None:
        """`seq` (the one peek returned) was admitted."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Waiting requests."""

    def charge(self, seq: Sequence, prefill_tokens: int, decode_tokens: int) -> None:
        """Service processed for seq this step (recomputed prefill after preemption excluded)."""

    def finish(self, seq: Sequence) -> None:
        """seq finished or was aborted while running."""

    def drain_rejected(self) -> list[Sequence]:
        """Requests the policy refused at `add` since the last call (rpm's reject mode); the
        engine finishes them as aborted."""
        return []

    def next_wakeup(self) -> float | None:
        """When a request the policy holds back (not the pool) may go, on its clock; None if none."""
        return None

    def schedule(self, try_admit: Callable[[Sequence], bool], limit: int) -> list[Sequence]:
        """Offer candidates in policy order until one does not fit or `limit` are admitted.
        Stopping at the first misfit keeps the order fair (no small request jumps the queue)."""
        admitted = []
        while len(admitted) < limit:
            seq = self.peek()
            if seq is None or not try_admit(seq):
                break
            self.pop(seq)
            admitted.append(seq)
        return admitted
