"""Least Counter First (LCF): VTC's counters without the lift.

The waiting client that has received the least service so far (w_p per prompt token, w_q per
decoded token, divided by its weight) goes first. With no lift, a client that was idle keeps its
old, low counter: when it returns it takes the server over until it has caught up with the
clients that were busy meanwhile — the unfairness the VTC paper's lift removes (on/off workloads).
"""
from __future__ import annotations

from jaxserve.sched.vtc import CounterScheduler


class LCFScheduler(CounterScheduler):
    name = "lcf"
    lift = False
