"""Workloads: a JSONL format, seeded generators for the VTC paper's fairness suites, and
S-LoRA's synthetic serving trace (`slora_trace`).

One request per line: {"client": str, "arrival": seconds, "input_len": int, "output_len": int}
with optional "adapter" (a LoRA name) and "weight" (the client's fair-share weight).
`../shared/data/vtc_real_trace.jsonl` (the paper artifact's real trace) is in this format.

The suites follow the definitions of the paper's artifact (Ying1123/VTC-artifact,
fair_bench/exp_suite.py and trace.py) where it has one: "constant" arrivals are evenly spaced at
1/rate with a random phase; "poisson" arrivals have gamma-distributed gaps (cv=1: Poisson), every
request drawn for one client or the other by its share of the total rate. Lengths are fixed
(256/256) unless a suite says otherwise. Each generator takes `duration` (seconds) so tests can
run shorter versions, and `seed`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


@dataclasses.dataclass
class Request:
    client: str
    arrival: float
    input_len: int
    output_len: int
    adapter: str | None = None
    weight: float | None = None

    def to_json(self) -> dict:
        d = {"client": self.client, "arrival": round(float(self.arrival), 6),
             "input_len": int(self.input_len), "output_len": int(self.output_len)}
        if self.adapter is not None:
            d["adapter"] = self.adapter
        if self.weight is not None:
            d["weight"] = self.weight
        return d


def load(path) -> list[Request]:
    """Read a JSONL workload (blank lines skipped); sorted by arrival. Every field is checked:
    a bad line is a ValueError naming the file, the line, the field and what is allowed."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            out.append(request_from_json(d))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}:{n}: bad workload line ({e}): {line[:200]}") from None
    if not out:
        raise ValueError(f"{path}: the workload has no requests")
    out.sort(key=lambda r: r.arrival)
    return out


def _number(d: dict, field: str, allowed: str, integer: bool = False, low: float = 0.0,
            low_inclusive: bool = True) -> float:
    value = d[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = value >= low if low_inclusive else value > low
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid; allowed: {allowed}")
    return int(value) if integer else float(value)


def request_from_json(d: dict) -> Request:
    client = d["client"]
    if not isinstance(client, str) or not client:
        raise ValueError(f"client={client!r} is invalid; allowed: a non-empty string")
    adapter, weight = d.get("adapter"), d.get("weight")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise ValueError(f"adapter={adapter!r} is invalid; allowed: absent, null or a non-empty string")
    return Request(client, _number(d, "arrival", "a finite number of seconds >= 0"),
                   _number(d, "input_len", "an integer >= 1", integer=True, low=1),
                   _number(d, "output_len", "an integer >= 1", integer=True, low=1), adapter,
                   None if weight is None else _number(d, "weight", "a finite number > 0", low_inclusive=False))


def save(requests: Iterable[Request], path) -> None:
    Path(path).write_text("".join(json.dumps(r.to_json()) + "\n" for r in requests))


def weights_of(requests: Iterable[Request]) -> dict[str, float]:
    """The per-client weights a workload carries (clients without one are left out)."""
    return {r.client: r.weight for r in requests if r.weight is not None}


def client_name(i: int) -> str:
    return f"client{i}"


# ---- arrival processes ------------------------------------------------------------------
def _constant(rng, rate: float, start: float, end: float, client: str, inp: int, out: int,
              on_off: float | None = None) -> list[Request]:
    """Evenly spaced at 1/rate from a random phase; with on_off=P, none in odd periods."""
    reqs = []
    n = int(rate * (end - start))
    t = start + rng.random() / rate
    for _ in range(n):
        t += 1.0 / rate
        if on_off and int(t // on_off) % 2 == 1:
            continue
        reqs.append(Request(client, t, inp, out))
    return reqs


def _poisson_two(rng, rates, duration, lens, cv: float = 1.0) -> list[Request]:
    """A gamma (cv=1: Poisson) arrival process of total rate sum(rates); each request belongs to
    client0 with probability rates[0]/sum(rates). lens: [(in, out) of client0, (in, out) of client1]."""
    total = float(sum(rates))
    n = int(total * duration)
    which = (rng.random(n) > rates[0] / total).astype(int)
    gaps = rng.gamma(1.0 / (cv * cv), cv * cv / total, n)
    t, reqs = 0.0, []
    for i in range(n):
        t += gaps[i]
        inp, out = lens[which[i]]
        reqs.append(Request(client_name(int(which[i])), t, inp, out))
    return reqs


def _sorted(reqs):
    reqs.sort(key=lambda r: r.arrival)
    return reqs


def adapter_name(i: int) -> str:
    return f"lora{i}"


def slora_trace(num_adapters: int, alpha: float, request_rate: float, cv: float, duration: float,
                input_range: tuple[int, int], output_range: tuple[int, int], tenants: int = 1,
                seed: int = 42) -> list[Request]:
    """S-LoRA's synthetic serving trace (its benchmarks): int(request_rate x duration) requests;
    request i's adapter index is int(num_adapters x U_i) with U_i ~ numpy's power(alpha) (alpha < 1
    skews toward the first adapters: P(index < k) = (k / num_adapters) ** alpha); gaps between
    arrivals are gamma with mean 1 / request_rate and coefficient of variation cv (1: Poisson);
    input and output lengths uniform in [lo, hi). Adapter k belongs to tenant k % tenants (each
    tenant owns its fine-tunes), named client0, client1, ..."""
    for name, value in (("num_adapters", num_adapters), ("tenants", tenants)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
    for name, value in (("alpha", alpha), ("request_rate", request_rate), ("cv", cv), ("duration", duration)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} is invalid; allowed: a number > 0")
    for name, (lo, hi) in (("input_range", input_range), ("output_range", output_range)):
        if not (1 <= lo < hi):
            raise ValueError(f"{name}=({lo}, {hi}) is invalid; allowed: 1 <= lo < hi (lengths are drawn from [lo, hi))")
    rng = np.random.default_rng(seed)
    n = int(request_rate * duration)
    which = np.minimum((num_adapters * rng.power(alpha, n)).astype(int), num_adapters - 1)
    inputs = rng.integers(input_range[0], input_range[1], n)
    outputs = rng.integers(output_range[0], output_range[1], n)
    arrivals = np.cumsum(rng.gamma(1.0 / (cv * cv), cv * cv / request_rate, n))
    return [Request(client_name(int(k) % tenants), float(t), int(i), int(o), adapter_name(int(k)))
            for k, t, i, o in zip(which, arrivals, inputs, outputs)]


# ---- the suites -------------------------------------------------------------------------
def overload(duration: float = 360, seed: int = 42) -> list[Request]:
    """2 clients, constant arrivals at 1.5 and 3 req/s, 256 in / 256 out, 6 min: both far above
    the server's capacity (both backlogged throughout)."""
    rng = np.random.default_rng(seed)
    return _sorted([r for i, rate in enumerate((1.5, 3.0))
                    for r in _constant(rng, rate, 0, duration, client_name(i), 256, 256)])


def overload_multi(duration: float = 360, seed: int = 42) -> list[Request]:
    """8 clients, constant arrivals: three at 0.4 req/s, five at 0.6 req/s, 256/256, 6 min."""
    rng = np.random.default_rng(seed)
    rates = (0.4, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6)
    return _sorted([r for i, rate in enumerate(rates)
                    for r in _constant(rng, rate, 0, duration, client_name(i), 256, 256)])


OVERLOAD_WEIGHTS = (1.0, 2.0, 3.0, 4.0)


def overload_weighted(duration: float = 360, seed: int = 42) -> list[Request]:
    """4 clients with weights 1:2:3:4, each at a constant 1 req/s, 256/256, 6 min (the artifact
    names the suite without its rates here; 1 req/s each keeps even the weight-4 client, whose
    fair share is 40% of the server, backlogged). Each request carries its client's weight."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i, w in enumerate(OVERLOAD_WEIGHTS):
        for r in _constant(rng, 1.0, 0, duration, client_name(i), 256, 256):
            r.weight = w
            reqs.append(r)
    return _sorted(reqs)


def proportional(duration: float = 600, seed: int = 42) -> list[Request]:
    """3 clients, constant arrivals at 0.25, 0.5 and 1.5 req/s, 256/256, 10 min: the two light
    clients ask less than a fair share and should get all they ask; the heavy one the rest."""
    rng = np.random.default_rng(seed)
    return _sorted([r for i, rate in enumerate((0.25, 0.5, 1.5))
                    for r in _constant(rng, rate, 0, duration, client_name(i), 256, 256)])


def on_off_less(duration: float = 600, seed: int = 42) -> list[Request]:
    """client0 at 0.5 req/s, on for 60 s then off for 60 s (sending less than its share even when
    on); client1 at a constant 2 req/s (overloaded); 256/256, 10 min."""
    rng = np.random.default_rng(seed)
    return _sorted(_constant(rng, 0.5, 0, duration, "client0", 256, 256, on_off=60)
                   + _constant(rng, 2.0, 0, duration, "client1", 256, 256))


def on_off_overload(duration: float = 600, seed: int = 42) -> list[Request]:
    """client0 at 2 req/s on/off every 60 s (overloaded while on), client1 at a constant 3 req/s;
    256/256, 10 min."""
    rng = np.random.default_rng(seed)
    return _sorted(_constant(rng, 2.0, 0, duration, "client0", 256, 256, on_off=60)
                   + _constant(rng, 3.0, 0, duration, "client1", 256, 256))


def increase(duration: float = 600, seed: int = 42) -> list[Request]:
    """client0 at a constant 0.5 req/s; client1's rate rises linearly from 0.2 to 2 req/s over the
    run (gap 1/rate(t)); 256/256, 10 min."""
    rng = np.random.default_rng(seed)
    reqs = _constant(rng, 0.5, 0, duration, "client0", 256, 256)
    lo, hi = 0.2, 2.0
    t = 0.0
    for _ in range(int(0.5 * (lo + hi) * duration)):
        t += 1.0 / (lo + (hi - lo) * t / duration)
        reqs.append(Request("client1", t, 256, 256))
    return _sorted(reqs)


def poisson_short_long(duration: float = 600, seed: int = 42) -> list[Request]:
    """Poisson arrivals at 9.5 req/s in total: client0 8 req/s of short requests (64 in / 64 out),
    client1 1.5 req/s of long ones (256/256), 10 min."""
    rng = np.random.default_rng(seed)
    return _poisson_two(rng, (8.0, 1.5), duration, [(64, 64), (256, 256)])


def poisson_short_long_2(duration: float = 600, seed: int = 42) -> list[Request]:
    """Poisson arrivals at 9.5 req/s in total: client0 8 req/s of long prompts with short answers
    (512 in / 32 out), client1 1.5 req/s of short prompts with long answers (32 in / 512 out),
    10 min: the weighting w_p=1, w_q=2 matters."""
    rng = np.random.default_rng(seed)
    return _poisson_two(rng, (8.0, 1.5), duration, [(512, 32), (32, 512)])


def dist_shift(duration: float = 900, seed: int = 42) -> list[Request]:
    """Three phases of duration/3 (15 min in all), 256/256 constant arrivals: on/off (client0 at
    0.5 req/s on/off every 60 s, client1 at 2), overload (1 and 1 req/s), proportional (0.5 and
    1.5 req/s)."""
    rng = np.random.default_rng(seed)
    third = duration / 3
    reqs = []
    for k, (rates, on_off) in enumerate((((0.5, 2.0), 60), ((1.0, 1.0), None), ((0.5, 1.5), None))):
        for i, rate in enumerate(rates):
            reqs += _constant(rng, rate, k * third, (k + 1) * third, client_name(i), 256, 256,
                              on_off=on_off if i == 0 else None)
    return _sorted(reqs)


SUITES: dict[str, Callable[..., list[Request]]] = {
    "overload": overload,
    "overload-multi": overload_multi,
    "overload-weighted": overload_weighted,
    "proportional": proportional,
    "on_off_less": on_off_less,
    "on_off_overload": on_off_overload,
    "increase": increase,
    "poisson_short_long": poisson_short_long,
    "poisson_short_long_2": poisson_short_long_2,
    "dist_shift": dist_shift,
}


def generate(suite: str, duration: float | None = None, seed: int = 42) -> list[Request]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; allowed: {', '.join(SUITES)}")
    fn = SUITES[suite]
    return fn(seed=seed) if duration is None else fn(duration=duration, seed=seed)
