"""Schedulers (FCFS, VTC and baselines) arrive with the engine and fairness issues."""
