"""GET /metrics: Prometheus text through prometheus_client, with vLLM's metric names where vLLM
has the metric, and jaxserve's own for the unified pool, the adapters and each tenant's fairness.

State is read on the engine thread (`EngineThread.call(snapshot, ...)`), so one scrape sees one
consistent moment; latency histograms are observed as requests finish.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxserve.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                    160.0, 320.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TenantService:
    """Service each tenant (fairness client) received, as the engine charges it: prompt and
    decoded tokens, and VTC's weighted measure w_p * prompt + w_q * decoded. A charge listener
    of the engine's BatchScheduler: it runs on the engine thread."""

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0):
        self.w_p, self.w_q = w_p, w_q
        self.prefill: dict[str, int] = {}
        self.decode: dict[str, int] = {}

    def charge(self, seq, prefill_tokens: int, decode_tokens: int) -> None:
        c = seq.client
        if prefill_tokens:
            self.prefill[c] = self.prefill.get(c, 0) + prefill_tokens
        if decode_tokens:
            self.decode[c] = self.decode.get(c, 0) + decode_tokens

    def weighted(self, client: str) -> float:
        return self.w_p * self.prefill.get(client, 0) + self.w_q * self.decode.get(client, 0)


def snapshot(engine, service: TenantService) -> dict:
    """The engine's state for one scrape (run on the engine thread)."""
    waiting = engine.waiting()
    waiting_per_tenant: dict[str, int] = {}
    for seq in waiting:
        waiting_per_tenant[seq.client] = waiting_per_tenant.get(seq.client, 0) + 1
    counters = getattr(engine.scheduler, "counters", {})
    tenants = set(service.prefill) | set(service.decode) | set(waiting_per_tenant) | set(counters)
    return {
        "running": len(engine.running), "waiting": engine.batcher.num_waiting,
        "preemptions": engine.num_preemptions, "pool": engine.pool.stats(), "adapters": engine.adapters.metrics(),
        "running_loras": sorted({s.lora_name for s in engine.running if s.lora_name}),
        "waiting_loras": sorted({s.lora_name for s in waiting if s.lora_name}),
        "tenants": {t: {"prefill": service.prefill.get(t, 0), "decode": service.decode.get(t, 0),
                        "weighted": service.weighted(t), "waiting": waiting_per_tenant.get(t, 0),
                        "counter": counters.get(t)} for t in sorted(tenants)},
    }


class ServerMetrics:
    def __init__(self, model_name: str, max_loras: int):
        self.model_name, self.max_loras = model_name, max_loras
        self.registry = CollectorRegistry()  # the app's own: several servers in one process do not mix
        names = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (seconds).", names,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first "
                              "(seconds).", names, buckets=_TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency (seconds).", names,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               names + ["finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.",
                                     names, registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", names,
                                         registry=self.registry)
        self.rejected = Counter("jaxserve:requests_rejected", "Requests refused before reaching the engine.",
                                ["reason"], registry=self.registry)
        self._state: dict = {}
        self.registry.register(_EngineCollector(self))

    def observe(self, out: RequestOutput) -> None:
        """A DELTA output of a request: count its tokens; at its end, its latencies."""
        label, new_tokens = self.model_name, len(out.outputs[0].token_ids)
        if new_tokens:
            self.generation_tokens.labels(label).inc(new_tokens)
        if not out.finished:
            return
        m = out.metrics
        self.prompt_tokens.labels(label).inc(len(out.prompt_token_ids))
        self.success.labels(label, out.outputs[0].finish_reason or "abort").inc()
        if m is None or m.finished_time is None:
            return
        self.e2e.labels(label).observe(m.finished_time - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.labels(label).observe(m.first_token_time - m.arrival_time)
            if m.num_output_tokens > 1:
                self.tpot.labels(label).observe((m.finished_time - m.first_token_time) / (m.num_output_tokens - 1))

    def render(self, state: dict) -> bytes:
        self._state = state
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's gauges and counters, from the scrape's snapshot."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        s, label = self.metrics._state, self.metrics.model_name
        if not s:
            return
        pool, adapters = s["pool"], s["adapters"]

        def gauge(name, doc, value, labels=None, **extra):
            g = GaugeMetricFamily(name, doc, labels=["model_name", *extra])
            g.add_metric([label, *extra.values()], value)
            return g

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s["running"])
        yield gauge("vllm:num_requests_waiting", "Requests waiting for admission.", s["waiting"])
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of the unified pool's pages holding KV cache (1 = all).",
                    pool["pages_kv"] / max(1, pool["pages_total"]))
        c = CounterMetricFamily("vllm:num_preemptions", "Preemptions (recompute).", labels=["model_name"])
        c.add_metric([label], s["preemptions"])
        yield c
        info = GaugeMetricFamily("vllm:lora_requests_info", "Adapters of running and waiting requests.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(self.metrics.max_loras), ",".join(s["running_loras"]), ",".join(s["waiting_loras"])],
                        time.time())
        yield info
        pages = GaugeMetricFamily("jaxserve:pool_pages", "Unified pool pages by what they hold.",
                                  labels=["model_name", "kind"])
        for kind in ("kv", "adapter", "free"):
            pages.add_metric([label, kind], pool[f"pages_{kind}"])
        yield pages
        state = GaugeMetricFamily("jaxserve:adapters", "LoRA adapters: registered (host memory), resident "
                                  "(in the pool), pinned (used by running requests).", labels=["model_name", "state"])
        for name in ("registered", "resident", "pinned"):
            state.add_metric([label, name], adapters[f"adapters_{name}"])
        yield state
        for key, doc in (("adapter_loads", "Adapter loads into the pool."),
                         ("adapter_evictions", "Adapter evictions from the pool.")):
            c = CounterMetricFamily(f"jaxserve:{key}", doc, labels=["model_name"])
            c.add_metric([label], adapters[key])
            yield c
        yield from self._tenants(s["tenants"])

    @staticmethod
    def _tenants(tenants: dict):
        tokens = CounterMetricFamily("jaxserve:tenant_service_tokens", "Tokens processed for each tenant.",
                                     labels=["tenant", "kind"])
        weighted = CounterMetricFamily("jaxserve:tenant_service", "Service each tenant received: w_p x prompt "
                                       "tokens + w_q x generated tokens (VTC's measure).", labels=["tenant"])
        waiting = GaugeMetricFamily("jaxserve:tenant_waiting_requests", "Requests of each tenant waiting for "
                                    "admission.", labels=["tenant"])
        counter = GaugeMetricFamily("jaxserve:tenant_vtc_counter", "Each tenant's virtual token counter "
                                    "(counter-based schedulers).", labels=["tenant"])
        for tenant, t in tenants.items():
            tokens.add_metric([tenant, "prompt"], t["prefill"])
            tokens.add_metric([tenant, "generation"], t["decode"])
            weighted.add_metric([tenant], t["weighted"])
            waiting.add_metric([tenant], t["waiting"])
            if t["counter"] is not None:
                counter.add_metric([tenant], t["counter"])
        yield from (tokens, weighted, waiting, counter)
