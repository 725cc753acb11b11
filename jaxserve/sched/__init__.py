"""Schedulers behind one interface (base.Scheduler), picked by name."""
from jaxserve.sched.base import Scheduler
from jaxserve.sched.fcfs import FCFSScheduler

SCHEDULERS = {"fcfs": FCFSScheduler}


def make_scheduler(name: str) -> Scheduler:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not available; allowed: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]()
