"""Virtual Token Counter (VTC) fair scheduling (Sheng, Cao, Li et al., "Fairness in Serving Large
Language Models", OSDI 2024), its weighted form and a length-predicting variant.

Each client has a counter of the service it received: w_p per prefill (prompt) token and w_q per
decoded token (defaults 1 and 2), divided by the client's weight. Waiting requests are kept per
client in arrival order. Every admission offers the head request of the waiting client with the
smallest counter (tie: the earliest-arriving head); `schedule` (base class) stops at the first
request that does not fit, so a small request never jumps the queue — the paper's behaviour.

Charging: the counters follow the tokens actually processed, reported by the engine through
`charge(seq, prefill_tokens, decode_tokens)`. Two accounting details:

* A request's prompt is charged when it is admitted (as the paper's Algorithm 2 does), so the
  next pick inside the same `schedule` call already sees it — otherwise one client would get
  every slot freed in a step. The engine's later prefill charges are taken off that reservation
  rather than added, so the total still equals the tokens processed; a request aborted before its
  prompt was processed gets the unprocessed rest refunded in `finish`/`remove`.
* After a preemption (recompute) the engine re-prefills prompt + generated tokens but charges only
  prompt tokens never charged before (`Sequence.num_charged_prefill`); the client did not cause
  the recomputation, so it is not charged for it, and a requeued request reserves nothing again.
  Each decoded token is charged once, when sampled — the last one included, never twice.
  (`charge` is linear: several decoded tokens may come in one call, as the simulator does.)

The lift (at `add`, i.e. on a request's arrival, when its client had nothing waiting):

    counter[c] = max(counter[c], min(counter[v] for v with waiting requests, v != c))
    and when no other client is waiting:
    counter[c] = max(counter[c], counter[l]),  l = the client most recently admitted from the queue

Why: a client that was idle must not bank credit. Without the lift, a client returning after a
quiet period would have a counter far below the busy clients' and would monopolise the server
until it caught up (that is LCF's failure mode). Lifting to the smallest waiting counter makes the
returning client start level with the least-served backlogged client, which is what the 2U bound
for continuously backlogged clients needs. When nobody else is waiting the paper's Algorithm 2
lifts to the counter of the last client that left the queue: the other clients may still be
running (in the batch), and without this rule a client arriving during such a lull would keep a
stale low counter and later starve them. A preempted request going back (`requeue`) is not an
arrival and lifts nothing; it returns to the front of its client's queue.

Variants:
* weighted VTC — option `weights={client: w}` (default 1): charges are divided by w, so
  backlogged clients get service in proportion to their weights.
* `vtc-predict` (VTCPredictScheduler) — at admission it also charges w_q times a predicted output
  length (a per-client moving average of finished requests' output lengths, prior 256); decoded
  tokens are charged only once they exceed the prediction; at finish the difference is
  reconciled so the total charged equals the true service.
* `lcf` (lcf.py) — least counter first, the same counters without the lift.
"""
from __future__ import annotations

import collections

from jaxserve.sched.base import Scheduler
from jaxserve.sequence import Sequence


def _key(seq) -> tuple[float, int]:
    return (seq.arrival_time, seq.order)


class CounterScheduler(Scheduler):
    """Per-client FIFO queues plus a service counter per client; the waiting client with the
    smallest counter goes first. Subclasses choose the lift and the decode charging."""
    name = "counter"
    lift = True

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0, weights: dict[str, float] | None = None):
        if w_p < 0 or w_q < 0:
            raise ValueError("w_p and w_q must be >= 0")
        self.w_p, self.w_q = float(w_p), float(w_q)
        self.weights = {str(k): float(v) for k, v in (weights or {}).items()}
        for c, w in self.weights.items():
            if not w > 0:
                raise ValueError(f"weight of client {c!r} must be > 0, got {w}")
        self.counters: dict[str, float] = collections.defaultdict(float)
        self.lifted: dict[str, float] = collections.defaultdict(float)  # total added by lifts
        self.queues: dict[str, collections.deque] = {}
        self._waiting_ids: set[str] = set()
        self._backlogged: set[str] = set()      # clients with a non-empty queue
        self._reserved_prefill: dict[str, int] = {}  # request_id -> prompt tokens charged ahead
        self.last_served: str | None = None      # client most recently admitted from the queue
        self._n = 0

    # ---- weights and charges -------------------------------------------------------------
    def weight(self, client: str) -> float:
        return self.weights.get(client, 1.0)

    def _add_cost(self, client: str, prefill: float, decode: float) -> None:
        if prefill or decode:
            self.counters[client] += (self.w_p * prefill + self.w_q * decode) / self.weight(client)

    # ---- queue ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        c = seq.client
        q = self.queues.get(c)
        if q is None:
            q = self.queues[c] = collections.deque()
            self.counters[c] += 0.0
        if not q and self.lift:
            self._lift(c)
        self._insert(q, seq)

    def _lift(self, c: str) -> None:
        others = [self.counters[v] for v in self._backlogged if v != c]
        if others:
            target = min(others)
        elif self.last_served is not None and self.last_served != c:
            target = self.counters[self.last_served]
        else:
            return
        if target > self.counters[c]:
            self.lifted[c] += target - self.counters[c]
            self.counters[c] = target

    def _insert(self, q: collections.deque, seq: Sequence) -> None:
        k = _key(seq)
        if not q or _key(q[-1]) <= k:
            q.append(seq)
        else:  # a preempted (older) request: back in arrival order, ahead of newer ones
            i = 0
            while i < len(q) and _key(q[i]) <= k:
                i += 1
            q.insert(i, seq)
        self._waiting_ids.add(seq.request_id)
        self._backlogged.add(seq.client)
        self._n += 1

    def requeue(self, seq: Sequence) -> None:
        q = self.queues.setdefault(seq.client, collections.deque())
        self._insert(q, seq)

    def remove(self, seq: Sequence) -> bool:
        if seq.request_id not in self._waiting_ids:
            return False
        q = self.queues[seq.client]
        q.remove(seq)
        self._waiting_ids.discard(seq.request_id)
        self._n -= 1
        if not q:
            self._backlogged.discard(seq.client)
        self._release(seq)
        return True

    def peek(self) -> Sequence | None:
        best, best_key = None, None
        counters, queues = self.counters, self.queues
        for c in self._backlogged:
            head = queues[c][0]
            k = (counters[c], head.arrival_time, head.order)
            if best_key is None or k < best_key:
                best, best_key = head, k
        return best

    def pop(self, seq: Sequence) -> None:
        c = seq.client
        q = self.queues[c]
        assert q and q[0] is seq, "pop() takes the request peek() returned"
        q.popleft()
        self._waiting_ids.discard(seq.request_id)
        self._n -= 1
        if not q:
            self._backlogged.discard(c)
        self.last_served = c
        self._on_admit(seq)

    def __len__(self) -> int:
        return self._n

    def waiting_clients(self) -> set[str]:
        return set(self._backlogged)

    # ---- accounting -----------------------------------------------------------------------
    def _on_admit(self, seq: Sequence) -> None:
        rid = seq.request_id
        if rid not in self._reserved_prefill:
            ahead = len(seq.prompt_token_ids) - seq.num_charged_prefill
            self._reserved_prefill[rid] = ahead
            self._add_cost(seq.client, ahead, 0)

    def charge(self, seq: Sequence, prefill_tokens: int, decode_tokens: int) -> None:
        if prefill_tokens:
            rid = seq.request_id
            ahead = self._reserved_prefill.get(rid, 0)
            covered = min(ahead, prefill_tokens)
            if covered:
                self._reserved_prefill[rid] = ahead - covered
            prefill_tokens -= covered
        decode_tokens = self._decode_cost(seq, decode_tokens)
        self._add_cost(seq.client, prefill_tokens, decode_tokens)

    def _decode_cost(self, seq: Sequence, decode_tokens: int) -> float:
        return decode_tokens

    def _release(self, seq: Sequence) -> None:
        """The request left for good (finished, aborted): refund what was charged ahead."""
        ahead = self._reserved_prefill.pop(seq.request_id, 0)
        if ahead:
            self._add_cost(seq.client, -ahead, 0)

    def finish(self, seq: Sequence) -> None:
        self._release(seq)


class VTCScheduler(CounterScheduler):
    """VTC with the lift (see the module docstring); weighted with `weights={client: w}`."""
    name = "vtc"
    lift = True


class VTCPredictScheduler(VTCScheduler):
    """VTC charging a predicted output length at admission (w_q * prediction), nothing more while
    decoding until the prediction is exceeded, and the true service after the request ends.

    The prediction is a per-client moving average of the output lengths of its last `window`
    finished requests (`prior` before any finished)."""
    name = "vtc-predict"

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0, weights: dict[str, float] | None = None,
                 prior: float = 256.0, window: int = 20):
        super().__init__(w_p, w_q, weights)
        self.prior = float(prior)
        self._history: dict[str, collections.deque] = {}
        self._window = int(window)
        self._predicted: dict[str, int] = {}   # request_id -> output tokens charged ahead
        self._decoded: dict[str, int] = {}     # request_id -> decoded tokens reported

    def predict(self, client: str) -> float:
        h = self._history.get(client)
        return sum(h) / len(h) if h else self.prior

    def _on_admit(self, seq: Sequence) -> None:
        super()._on_admit(seq)
        rid = seq.request_id
        if rid not in self._predicted:
            done = len(seq.output_token_ids)  # (0 unless it was admitted before this scheduler saw it)
            guess = max(0, int(round(self.predict(seq.client))) - done)
            guess = min(guess, max(0, seq.max_tokens - done))
            self._predicted[rid] = guess
            self._decoded[rid] = 0
            self._add_cost(seq.client, 0, guess)

    def _decode_cost(self, seq: Sequence, decode_tokens: int) -> float:
        rid = seq.request_id
        if rid not in self._predicted:
            return decode_tokens
        before = self._decoded[rid]
        after = before + decode_tokens
        self._decoded[rid] = after
        p = self._predicted[rid]
        return max(0, after - p) - max(0, before - p)

    def _release(self, seq: Sequence) -> None:
        super()._release(seq)
        rid = seq.request_id
        if rid in self._predicted:
            p, d = self._predicted.pop(rid), self._decoded.pop(rid)
            if d < p:  # reconcile: refund the over-prediction
                self._add_cost(seq.client, 0, -(p - d))
            if seq.finish_reason not in (None, "abort"):
                h = self._history.setdefault(seq.client, collections.deque(maxlen=self._window))
                h.append(len(seq.output_token_ids))
