"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide).

Two sets side by side: loraplex's own (``loraplex_*``, label ``model``: the base or adapter a request named) and
vLLM's (``vllm:*``, label ``model_name``: the base model's served name, as vLLM labels everything), so dashboards
and LoRA-aware routers built for vLLM read this server unchanged (docs/server.md, "Metrics").

Per-request numbers (requests, latencies, finish reasons) are recorded by the server as requests end; engine
numbers (queues, KV cache, token counters, inter-token latency, adapter cache) come from the engine side's
published snapshot at scrape time, so a scrape never touches the engine itself.
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    SummaryMetricFamily)

from loraplex.engine.stats_logger import ITL_BUCKETS

# Label for requests whose model was not (yet) known to exist: unknown names must not mint series.
UNKNOWN_MODEL = "<unknown>"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)
# vLLM's (vllm/v1/metrics/loggers.py), so its dashboards' quantiles mean the same here.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)
# vLLM's finish reasons; each has its series from the start, as in vLLM.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


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
        yield from self._vllm(state)

    def _base(self) -> str:
        info = getattr(self.aengine, "info", None) or {}
        return self.model_name or info.get("served_model_name") or info.get("model") or ""

    def _vllm(self, state: dict):
        """vLLM's engine metrics, from the same snapshot: queue and KV gauges, token counters, inter-token latency,
        and the LoRA gauge that LoRA-aware routers read."""
        base, stats = self._base(), state.get("engine_stats", {})
        for name, doc, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches.",
                 state.get("num_running", 0)),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                 state.get("num_waiting", 0)),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 state.get("kv_cache_usage", 0.0))):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([base], value)
            yield family
        for name, doc, key in (("vllm:prompt_tokens", "Number of prefill tokens processed.", "num_prompt_tokens"),
                               ("vllm:generation_tokens", "Number of generation tokens processed.",
                                "num_generation_tokens")):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([base], stats.get(key, 0))
            yield family
        counts, total = state.get("itl") or [[0] * (len(ITL_BUCKETS) + 1), 0.0]
        family = HistogramMetricFamily("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in "
                                       "seconds.", labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, ITL_BUCKETS), "+Inf"], counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([base], buckets, sum_value=total)
        yield family
        info = getattr(self.aengine, "info", None) or {}
        if info.get("is_lora_enabled"):
            # vLLM sets this gauge to the current time under the labels of the moment; a router takes the series
            # with the newest value. Only the current one is shown here (vLLM also keeps older combinations).
            family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                       labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            family.add_metric([str(info.get("max_loras", "")), ",".join(state.get("waiting_lora_adapters", ())),
                               ",".join(state.get("running_lora_adapters", ()))], time.time())
            yield family

    def _prefix_cache(self, stats: dict):
        """Prefix cache lookups in tokens: vLLM's two counters (label model_name, the base model), and ours by
        the model a request named (the base or an adapter)."""
        base = self._base()
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
        # vLLM's per-request metrics, labelled with the base model's served name whatever adapter ran.
        self.model_name = model_name or ""
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                                   "seconds.", ["model_name"], buckets=VLLM_TTFT_BUCKETS, registry=r)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                  ["model_name"], buckets=VLLM_E2E_BUCKETS, registry=r)
        self.vllm_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                    ["model_name", "finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.vllm_success.labels(self.model_name, reason)
        self.registry.register(_EngineCollector(aengine, model_name))

    def count(self, model: str | None, status: int) -> None:
        self.requests.labels(model or UNKNOWN_MODEL, str(status)).inc()

    def observe(self, model: str, group, usage: dict) -> None:
        """A request answered whole. ``usage``: the response's usage counts (a stream's outputs are deltas: no
        output holds them all)."""
        self.prompt_tokens.labels(model).inc(usage["prompt_tokens"])
        self.generation_tokens.labels(model).inc(usage["completion_tokens"])
        if group.first_token_at is not None:
            self.ttft.labels(model).observe(group.first_token_at - group.created)
            self.vllm_ttft.labels(self.model_name).observe(group.first_token_at - group.created)
        if group.finished_at is not None:
            self.e2e.labels(model).observe(group.finished_at - group.created)
            self.vllm_e2e.labels(self.model_name).observe(group.finished_at - group.created)
        self._count_finished(group)

    def observe_aborted(self, group) -> None:
        """A request that ended before all its sequences did (the client left, or stopped reading): those count
        as ``abort``, as in vLLM; the ones that finished under their own reason."""
        self._count_finished(group, abort=True)

    def _count_finished(self, group, abort: bool = False) -> None:
        if group.is_counted:
            return
        group.is_counted = True
        reasons = list(group.finish_reasons)
        if abort:
            reasons += ["abort"] * max(0, group.num_seqs - len(reasons))
        for reason in reasons:
            self.vllm_success.labels(self.model_name, reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
