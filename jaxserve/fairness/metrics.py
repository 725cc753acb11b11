"""Fairness and performance metrics over a simulation (or an engine run turned into records).

Service of a client = w_p * prompt tokens + w_q * output tokens processed for it (recomputation
after a preemption excluded), divided by its weight where weights are given.

* `service_by_client`, `service_rate` (per time window), `accumulated_service` — from the
  per-step records (exact: the tokens each step processed).
* `backlogged_difference` — for each pair of clients and each maximal period in which both have
  requests waiting, D(t) = (accumulated service of one - of the other) since the period began;
  max = the largest max D - min D over any period (= the largest |service difference| over any
  sub-interval in which both are backlogged: what the VTC theorem bounds by 2U), avg = the
  time-average of |D(t)| over all such periods and pairs.
* `vtc_bound` — the theorem's 2U, U = max(w_p * L_input_max, w_q * M), M = the most tokens a batch
  can hold (the KV capacity in tokens).
* `artifact_service_difference` — the metric of the VTC artifact's table for the real trace
  (fair_bench/plot/visualize.py, get_service_diff_over_time): 19 windows of 60 s centred every
  28.5 s after a 30 s warm-up; in each, a request's service (input + 2 * output) is spread evenly
  over [first token, finish] and a client's demand is the service of the requests that arrived in
  the window; the window's difference is the sum over clients of min(max service - its service,
  |its demand - its service|) per second — a client counts as under-served only up to its demand.
  Returns max and average over windows, and the artifact's throughput (input + output tokens of
  served requests / run time).
* `first_token_latency` (p50/p90/p99 per client), `throughput`.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from jaxserve.fairness.sim import SimResult


def _w(weights, c):
    return (weights or {}).get(c, 1.0)


def service_by_client(result: SimResult, w_p: float = 1.0, w_q: float = 2.0,
                      weights: dict | None = None) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for st in result.steps:
        for c, (p, d) in st.service.items():
            out[c] += (w_p * p + w_q * d) / _w(weights, c)
    return dict(out)


def service_matrix(result: SimResult, clients=None, w_p: float = 1.0, w_q: float = 2.0,
                   weights: dict | None = None):
    """(clients, t_end[steps], service[steps, clients], backlogged[steps, clients] bool,
    duration[steps]) from the step records."""
    clients = list(clients or result.clients)
    idx = {c: j for j, c in enumerate(clients)}
    n = len(result.steps)
    S = np.zeros((n, len(clients)))
    B = np.zeros((n, len(clients)), dtype=bool)
    t_end = np.empty(n)
    dur = np.empty(n)
    for k, st in enumerate(result.steps):
        t_end[k] = st.time + st.duration
        dur[k] = st.duration
        for c, (p, d) in st.service.items():
            S[k, idx[c]] = (w_p * p + w_q * d) / _w(weights, c)
        for c in st.backlogged:
            if c in idx:
                B[k, idx[c]] = True
    return clients, t_end, S, B, dur


def accumulated_service(result: SimResult, times, w_p=1.0, w_q=2.0, weights=None) -> dict[str, np.ndarray]:
    """Each client's service up to each of `times` (steps spread evenly over their duration)."""
    clients, t_end, S, _, dur = service_matrix(result, None, w_p, w_q, weights)
    times = np.asarray(times, dtype=float)
    cum = np.vstack([np.zeros(len(clients)), np.cumsum(S, axis=0)])
    t_start = t_end - dur
    out = {}
    for j, c in enumerate(clients):
        # piecewise linear interpolation through (step start, cum before) and (step end, cum after)
        xs = np.empty(2 * len(t_end))
        ys = np.empty(2 * len(t_end))
        xs[0::2], xs[1::2] = t_start, t_end
        ys[0::2], ys[1::2] = cum[:-1, j], cum[1:, j]
        out[c] = np.interp(times, xs, ys, left=0.0) if len(xs) else np.zeros_like(times)
    return out


def service_rate(result: SimResult, window: float = 10.0, w_p=1.0, w_q=2.0, weights=None,
                 end: float | None = None):
    """(window centres, {client: service per second in each window})."""
    end = result.end_time if end is None else end
    edges = np.arange(0.0, end + window, window)
    acc = accumulated_service(result, edges, w_p, w_q, weights)
    centres = (edges[:-1] + edges[1:]) / 2
    return centres, {c: np.diff(v) / window for c, v in acc.items()}


def backlogged_difference(result: SimResult, w_p: float = 1.0, w_q: float = 2.0,
                          weights: dict | None = None, clients=None) -> dict:
    """Service difference between clients while both are backlogged: {"max", "avg",
    "backlogged_time"} (see the module docstring). Service is divided by the weights given."""
    clients, t_end, S, B, dur = service_matrix(result, clients, w_p, w_q, weights)
    best, area, span = 0.0, 0.0, 0.0
    m = len(clients)
    for a in range(m):
        for b in range(a + 1, m):
            mask = B[:, a] & B[:, b]
            if not mask.any():
                continue
            diff = S[:, a] - S[:, b]
            # maximal runs of consecutive masked steps
            padded = np.concatenate([[False], mask, [False]])
            edges = np.flatnonzero(padded[1:] != padded[:-1])
            for s0, s1 in zip(edges[0::2], edges[1::2]):
                D = np.concatenate([[0.0], np.cumsum(diff[s0:s1])])
                best = max(best, float(D.max() - D.min()))
                # time-average of |D| (D at each step's end, weighted by its duration)
                area += float(np.abs(D[1:]) @ dur[s0:s1])
                span += float(dur[s0:s1].sum())
    return {"max": best, "avg": area / span if span > 0 else 0.0, "backlogged_time": span}


def vtc_bound(w_p: float, w_q: float, max_input_len: int, max_batch_tokens: int) -> float:
    """The VTC theorem's 2U, U = max(w_p * L_input_max, w_q * M)."""
    return 2.0 * max(w_p * max_input_len, w_q * max_batch_tokens)


def artifact_service_difference(result: SimResult, T: float = 600.0, window: float = 60.0,
                                warmup: float = 30.0, num_x: int = 20) -> dict:
    """The VTC artifact's per-window service difference (real trace table); see the module
    docstring. {"max", "avg", "throughput", "per_window"}."""
    served = [r for r in result.requests
              if r.first_token is not None and r.finish is not None and not r.rejected]
    clients = sorted({r.client for r in result.requests})
    ticks = [(T - warmup) / num_x * i for i in range(num_x)][1:]
    diffs = []
    for x in ticks:
        lo, hi = x - window / 2 + warmup, x + window / 2 + warmup
        demand = dict.fromkeys(clients, 0.0)
        service = dict.fromkeys(clients, 0.0)
        for r in result.requests:
            if lo <= r.arrival <= hi and not r.rejected:
                demand[r.client] += r.input_len + 2 * r.output_len
        for r in served:
            t0, t1 = r.first_token, r.finish
            if t1 < 1 or t1 - t0 < 1e-5:
                continue
            overlap = max(min(hi, t1) - max(lo, t0), 0.0)
            service[r.client] += (r.input_len + 2 * r.output_len) * overlap / (t1 - t0)
        y = {c: service[c] / window for c in clients}
        q = {c: demand[c] / window for c in clients}
        top = max(y.values())
        diffs.append(sum(min(top - y[c], abs(q[c] - y[c])) for c in clients))
    tokens = sum(r.input_len + r.output_len for r in served)
    return {"max": float(max(diffs)), "avg": float(np.mean(diffs)),
            "throughput": tokens / result.end_time if result.end_time > 0 else 0.0,
            "per_window": diffs}


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else math.nan


def first_token_latency(result: SimResult) -> dict[str, dict[str, float]]:
    """Per client: p50/p90/p99/mean first-token latency (s) and count; "all" for everyone."""
    by: dict[str, list] = defaultdict(list)
    for r in result.requests:
        lat = r.first_token_latency
        if lat is not None:
            by[r.client].append(lat)
            by["all"].append(lat)
    return {c: {"p50": _pct(v, 50), "p90": _pct(v, 90), "p99": _pct(v, 99),
                "mean": float(np.mean(v)), "count": len(v)} for c, v in sorted(by.items())}


def throughput(result: SimResult) -> float:
    """Input + output tokens processed per second of the run."""
    return result.throughput()


def response_time_over_time(result: SimResult, window: float = 10.0, end: float | None = None):
    """(window centres, {client: mean first-token latency of requests whose first token came in
    the window, NaN where none})."""
    end = result.end_time if end is None else end
    edges = np.arange(0.0, end + window, window)
    centres = (edges[:-1] + edges[1:]) / 2
    out = {}
    for c in result.clients:
        rs = [r for r in result.requests if r.client == c and r.first_token is not None]
        t = np.array([r.first_token for r in rs])
        lat = np.array([r.first_token - r.arrival for r in rs])
        vals = np.full(len(centres), np.nan)
        if len(t):
            k = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(centres) - 1)
            sums = np.bincount(k, lat, len(centres))
            cnt = np.bincount(k, None, len(centres))
            vals = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
        out[c] = vals
    return centres, out


def summary(result: SimResult, w_p: float = 1.0, w_q: float = 2.0, weights=None) -> dict:
    d = backlogged_difference(result, w_p, w_q, weights)
    lat = first_token_latency(result).get("all", {})
    return {"scheduler": result.scheduler, "max_diff": d["max"], "avg_diff": d["avg"],
            "backlogged_time": d["backlogged_time"], "throughput": result.throughput(),
            "end_time": result.end_time, "preemptions": result.num_preemptions,
            "ttft_p50": lat.get("p50", math.nan), "ttft_p99": lat.get("p99", math.nan)}
