"""Unit tests of the fair schedulers with hand-computed counters (real Sequence objects)."""
import pytest

from jaxserve.sampling import SamplingParams
from jaxserve.sched import SCHEDULERS, make_scheduler
from jaxserve.sched.fcfs import FCFSScheduler
from jaxserve.sequence import Sequence

_n = [0]


def seq(client, prompt=10, max_tokens=8, t=None):
    _n[0] += 1
    i = _n[0]
    return Sequence(f"r{i}", None, [1] * prompt, SamplingParams(max_tokens=max_tokens), 0, max_tokens,
                    client=client, arrival_time=float(i if t is None else t), order=i)


def admit(s, sched):
    assert sched.schedule(lambda x: x is s, 1) == [s]


def run_to_end(s, sched, outputs):
    """What the engine reports for a request that is prefilled then decodes `outputs` tokens:
    the prompt when processed, each decoded token once when sampled (the last one included)."""
    new = len(s.prompt_token_ids) - s.num_charged_prefill
    s.num_charged_prefill += new
    sched.charge(s, new, 0)
    for _ in range(outputs):
        s.append_token(7)
        sched.charge(s, 0, 1)
    s.finish_reason = "length"
    sched.finish(s)


def test_registry():
    assert set(SCHEDULERS) == {"fcfs", "vtc", "vtc-predict", "lcf", "rpm"}
    assert isinstance(make_scheduler("fcfs"), FCFSScheduler)
    assert make_scheduler("vtc", weights={"a": 2}).weight("a") == 2
    with pytest.raises(ValueError, match="not available"):
        make_scheduler("nope")
    with pytest.raises(ValueError, match="bad options"):
        make_scheduler("fcfs", weights={})
    with pytest.raises(ValueError):
        make_scheduler("vtc", weights={"a": 0})


def test_vtc_picks_smallest_counter_then_earliest():
    v = make_scheduler("vtc")
    a1, a2, b1 = seq("A"), seq("A"), seq("B")
    for s in (a1, a2, b1):
        v.add(s)
    assert v.peek() is a1  # tie 0/0: earliest head
    admit(a1, v)           # A's prompt charged at admission: 10
    assert v.counters["A"] == 10 and v.peek() is b1
    # one schedule() call alternates: B (0) then A (10) vs B (10): A's head is older
    v2 = make_scheduler("vtc")
    xs = [seq("A"), seq("A"), seq("B"), seq("B")]
    for s in xs:
        v2.add(s)
    got = v2.schedule(lambda s: True, 4)
    assert [s.client for s in got] == ["A", "B", "A", "B"]


def test_charges_w_p_w_q_and_no_double_charge_of_last_token():
    v = make_scheduler("vtc")
    s = seq("A", prompt=10, max_tokens=5)
    v.add(s)
    admit(s, v)
    assert v.counters["A"] == 10           # prompt, charged ahead at admission
    run_to_end(s, v, 5)                    # engine: prefill 10 (covered), 5 decodes
    assert v.counters["A"] == 10 + 2 * 5   # w_p * 10 + w_q * 5, the last token once


def test_weighted_charges_divide_by_weight():
    v = make_scheduler("vtc", w_p=1, w_q=2, weights={"A": 2, "B": 0.5})
    a, b = seq("A", 10), seq("B", 10)
    v.add(a)
    v.add(b)
    admit(a, v)
    admit(b, v)
    run_to_end(a, v, 3)
    run_to_end(b, v, 3)
    assert v.counters["A"] == pytest.approx((10 + 6) / 2)
    assert v.counters["B"] == pytest.approx((10 + 6) / 0.5)


def test_lift_to_min_waiting_counter():
    v = make_scheduler("vtc")
    v.counters.update({"A": 0.0, "B": 50.0, "C": 80.0})
    b, c = seq("B"), seq("C")
    v.add(b)
    v.add(c)
    a = seq("A")
    v.add(a)                              # A's queue was empty: max(0, min(50, 80)) = 50
    assert v.counters["A"] == 50
    v.counters["A"] = 100.0
    a2 = seq("A")
    v.add(a2)                             # A already waiting: no lift
    assert v.counters["A"] == 100
    d = seq("D")
    v.counters["D"] = 70.0
    v.add(d)                              # max(70, min(B 50, C 80, A 100)) = 70: never lowered
    assert v.counters["D"] == 70


def test_lift_when_nobody_waits_uses_last_served_client():
    v = make_scheduler("vtc")
    a = seq("A", prompt=10)
    v.add(a)
    admit(a, v)
    run_to_end(a, v, 3)                   # A: 10 + 6 = 16; A was the last admitted
    b = seq("B")
    v.add(b)                              # nobody waiting: max(0, counter of A) = 16
    assert v.counters["B"] == 16
    # LCF: no lift at all
    lcf = make_scheduler("lcf")
    a = seq("A", prompt=10)
    lcf.add(a)
    admit(a, lcf)
    run_to_end(a, lcf, 3)
    lcf.add(seq("B"))
    assert lcf.counters["B"] == 0 and lcf.counters["A"] == 16


def test_requeue_does_not_lift_and_goes_first():
    v = make_scheduler("vtc")
    old, new = seq("A", t=1), seq("A", t=5)
    v.add(old)
    admit(old, v)
    v.counters["B"] = 500.0
    v.add(seq("B", t=2))
    v.requeue(old)                        # preempted: back in front, counter untouched
    v.add(new)
    assert v.counters["A"] == 10 and v.peek() is old


def test_preemption_recompute_not_charged():
    """After a preemption the engine re-prefills prompt + generated tokens but charges only
    prompt tokens never charged (num_charged_prefill); the scheduler reserves nothing again."""
    v = make_scheduler("vtc")
    s = seq("A", prompt=10, max_tokens=6)
    v.add(s)
    admit(s, v)
    s.num_charged_prefill = 10
    v.charge(s, 10, 0)
    for _ in range(3):
        s.append_token(7)
        v.charge(s, 0, 1)
    assert v.counters["A"] == 16
    v.requeue(s)                          # preempted
    admit(s, v)                           # readmitted: nothing more at admission
    assert v.counters["A"] == 16
    # the engine's recompute charges no prefill (all 10 prompt tokens were charged before)
    for _ in range(3):
        s.append_token(7)
        v.charge(s, 0, 1)
    s.finish_reason = "length"
    v.finish(s)
    assert v.counters["A"] == 10 + 2 * 6


def test_partial_prefill_then_abort_refunds():
    v = make_scheduler("vtc")
    s = seq("A", prompt=100)
    v.add(s)
    admit(s, v)
    assert v.counters["A"] == 100
    s.num_charged_prefill = 40
    v.charge(s, 40, 0)                    # a first chunk of 40
    assert v.counters["A"] == 100
    v.finish(s)                           # aborted while running: the unprocessed 60 refunded
    assert v.counters["A"] == 40


def test_remove_waiting():
    for name in ("vtc", "lcf", "vtc-predict", "rpm", "fcfs"):
        sch = make_scheduler(name)
        a, b = seq("A"), seq("B")
        sch.add(a)
        sch.add(b)
        assert len(sch) == 2 and sch.remove(a) and not sch.remove(a)
        assert len(sch) == 1 and sch.peek() is b


def test_vtc_predict_reconciles():
    v = make_scheduler("vtc-predict", prior=256)
    s = seq("A", prompt=10, max_tokens=1000)
    v.add(s)
    admit(s, v)
    assert v.counters["A"] == 10 + 2 * 256          # prompt + predicted output at admission
    s.num_charged_prefill = 10
    v.charge(s, 10, 0)
    for _ in range(100):
        s.append_token(7)
        v.charge(s, 0, 1)
    assert v.counters["A"] == 10 + 2 * 256          # nothing more below the prediction
    s.finish_reason = "stop"
    v.finish(s)
    assert v.counters["A"] == 10 + 2 * 100          # reconciled to the true service
    assert v.predict("A") == 100
    # the next request is predicted at 100 and runs past it
    t = seq("A", prompt=5, max_tokens=1000)
    v.add(t)
    admit(t, v)
    assert v.counters["A"] == 210 + 5 + 2 * 100
    t.num_charged_prefill = 5
    v.charge(t, 5, 0)
    for _ in range(100):
        t.append_token(7)
        v.charge(t, 0, 1)
    assert v.counters["A"] == 210 + 5 + 200
    for _ in range(200):
        t.append_token(7)
        v.charge(t, 0, 1)
    assert v.counters["A"] == 210 + 5 + 600          # charged past the prediction
    t.finish_reason = "length"
    v.finish(t)
    assert v.counters["A"] == 210 + 5 + 600
    assert v.predict("A") == 200                      # moving average of 100 and 300


def test_vtc_predict_bulk_decode_charge_is_linear():
    v = make_scheduler("vtc-predict", prior=50)
    s = seq("A", prompt=1, max_tokens=80)
    v.add(s)
    admit(s, v)
    v.charge(s, 1, 0)
    v.charge(s, 0, 30)
    v.charge(s, 0, 50)                                # crosses the prediction inside one call
    s.output_token_ids = [7] * 80
    s.finish_reason = "length"
    v.finish(s)
    assert v.counters["A"] == 1 + 2 * 80


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_rpm_limits_admissions_per_minute():
    clk = Clock()
    r = make_scheduler("rpm", rpm=2, clock=clk)
    a = [seq("A", t=0.1 * i) for i in range(3)]
    b = seq("B", t=5)
    for s in a + [b]:
        r.add(s)
    got = r.schedule(lambda s: True, 10)
    assert got == [a[0], a[1], b]                    # A's third is over its limit: B goes (FCFS)
    assert r.peek() is None and len(r) == 1
    clk.t = 30.0
    assert r.peek() is None
    assert r.next_wakeup() == pytest.approx(60.0)    # A's first admission (t=0) leaves the window
    clk.t = r.next_wakeup()
    assert r.peek() is a[2]


def test_rpm_requeue_is_not_a_new_request():
    clk = Clock()
    r = make_scheduler("rpm", rpm=1, clock=clk)
    s = seq("A")
    r.add(s)
    admit(s, r)
    r.requeue(s)                                     # preempted: comes back despite the limit
    assert r.peek() is s


def test_rpm_reject_mode():
    clk = Clock()
    r = make_scheduler("rpm", rpm=2, clock=clk, reject=True)
    a = [seq("A") for _ in range(3)]
    for s in a:
        r.add(s)
    assert len(r) == 2 and r.drain_rejected() == [a[2]]
    clk.t = 61.0
    r.add(seq("A"))
    assert len(r) == 3 and r.drain_rejected() == []
