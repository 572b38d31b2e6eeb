"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide).

Per-request numbers (requests, tokens, latencies) are recorded by the server as requests end;
engine numbers (queues, adapter cache) come from the engine thread's published snapshot at scrape
time, so a scrape never touches the engine itself.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

# Label for requests whose model was not (yet) known to exist: unknown names must not mint series.
UNKNOWN_MODEL = "<unknown>"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    def __init__(self, aengine, model_name: str | None = None):
        self.aengine = aengine
        self.model_name = model_name  # the base model's served name

    def collect(self):
        state = self.aengine.state
        lora = state.get("lora_stats", {})
        for name, doc, key in (
            ("loraplex_num_requests_running", "Sequences running in the engine.", "num_running"),
            ("loraplex_num_requests_waiting", "Sequences waiting to be scheduled.", "num_waiting"),
            ("loraplex_lora_adapters_gpu", "Adapters resident in GPU (device) slots.", "num_gpu_loras"),
            ("loraplex_lora_adapters_cpu", "Adapters held in the CPU cache.", "num_cpu_loras"),
            ("loraplex_lora_adapters_registered", "Adapters the server answers to.", "num_loras"),
        ):
            yield GaugeMetricFamily(name, doc, value=state.get(key, 0))
        hits = CounterMetricFamily("loraplex_lora_cache_hits", "Adapter cache hits.", labels=["tier"])
        misses = CounterMetricFamily("loraplex_lora_cache_misses", "Adapter cache misses.", labels=["tier"])
        for tier in ("cpu", "gpu"):
            hits.add_metric([tier], lora.get(f"{tier}_hits", 0))
            misses.add_metric([tier], lora.get(f"{tier}_misses", 0))
        yield hits
        yield misses
        yield SummaryMetricFamily("loraplex_lora_load_seconds", "Time spent loading adapters from storage.",
                                  count_value=lora.get("num_loads", 0), sum_value=lora.get("load_seconds", 0.0))
        yield from self._prefix_cache(state.get("engine_stats", {}))

    def _prefix_cache(self, stats: dict):
        """Prefix cache lookups in tokens: vLLM's two counters (label model_name, the base model), and ours by
        the model a request named (the base or an adapter)."""
        info = getattr(self.aengine, "info", None) or {}
        base = self.model_name or info.get("served_model_name") or info.get("model") or ""
        for name, doc, key in (("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.",
                                "num_prefix_cache_queries"),
                               ("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", "num_prefix_cache_hits")):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([base], stats.get(key, 0))
            yield family
        by_model = stats.get("prefix_cache_by_model", {})
        for i, (name, doc) in enumerate((("loraplex_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                          "cache, by model (base or adapter)."),
                                         ("loraplex_prefix_cache_hits", "Prompt tokens found in the prefix cache, by "
                                          "model (base or adapter)."))):
            family = CounterMetricFamily(name, doc, labels=["model"])
            for model, counts in by_model.items():
                family.add_metric([model or base], counts[i])
            yield family


class ServerMetrics:
    """With ``PROMETHEUS_MULTIPROC_DIR`` set (several API server processes), the request counters are kept in
    prometheus_client's shared files and a scrape adds up every process's; the engine's gauges come from this
    process's snapshot, the same in each."""

    def __init__(self, aengine, model_name: str | None = None):
        """``model_name``: the base model's served name (label of the engine's per-model counters)."""
        from loraplex import envs

        self.registry = CollectorRegistry()
        r = self.registry
        multiproc_dir = envs.prometheus_multiproc_dir()
        if multiproc_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry, path=multiproc_dir)
            r = CollectorRegistry()  # the counters' own: values live in the shared files, read by the collector
        self.requests = Counter("loraplex_requests", "Generation requests answered, by model and HTTP status.",
                                ["model", "status"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to the first generated token.",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             ["model"], buckets=_E2E_BUCKETS, registry=r)
        self.registry.register(_EngineCollector(aengine, model_name))

    def count(self, model: str | None, status: int) -> None:
        self.requests.labels(model or UNKNOWN_MODEL, str(status)).inc()

    def observe(self, model: str, group, usage: dict) -> None:
        """``usage``: the response's usage counts (a stream's outputs are deltas: no output holds them all)."""
        self.prompt_tokens.labels(model).inc(usage["prompt_tokens"])
        self.generation_tokens.labels(model).inc(usage["completion_tokens"])
        if group.first_token_at is not None:
            self.ttft.labels(model).observe(group.first_token_at - group.created)
        if group.finished_at is not None:
            self.e2e.labels(model).observe(group.finished_at - group.created)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
