"""Schedulers behind one interface (base.Scheduler), picked by name.

    make_scheduler("fcfs")
    make_scheduler("vtc", w_p=1, w_q=2, weights={"alice": 2})
    make_scheduler("vtc-predict", prior=256)
    make_scheduler("lcf")
    make_scheduler("rpm", rpm=20, clock=time.monotonic)
"""
from jaxserve.sched.base import Scheduler
from jaxserve.sched.fcfs import FCFSScheduler
from jaxserve.sched.lcf import LCFScheduler
from jaxserve.sched.rpm import RPMScheduler
from jaxserve.sched.vtc import CounterScheduler, VTCPredictScheduler, VTCScheduler

SCHEDULERS = {
    "fcfs": FCFSScheduler,
    "vtc": VTCScheduler,
    "vtc-predict": VTCPredictScheduler,
    "lcf": LCFScheduler,
    "rpm": RPMScheduler,
}


def make_scheduler(name: str, **options) -> Scheduler:
    """A new scheduler by name; options go to its constructor (a bad one raises ValueError)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not available; allowed: {', '.join(SCHEDULERS)}")
    try:
        return SCHEDULERS[name](**options)
    except TypeError as e:
        raise ValueError(f"scheduler={name!r}: bad options {sorted(options)}: {e}") from None


__all__ = ["Scheduler", "SCHEDULERS", "make_scheduler", "FCFSScheduler", "VTCScheduler",
           "VTCPredictScheduler", "LCFScheduler", "RPMScheduler", "CounterScheduler"]
