"""Research tools for per-tenant fairness, around the runtime policies of jaxserve.sched:

- workloads.py: the JSONL workload format and the VTC paper's suites;
- sim.py: the simulator (the engine's own BatchScheduler over a token-capacity memory and a step-cost model);
- replay.py: a workload through the real engine, recorded like the simulator;
- metrics.py, plots.py: service differences, the 2U bound, latency, figures;
- run.py: the `jaxserve fairness` command.
"""
