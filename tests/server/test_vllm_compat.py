"""What a vLLM deployment relies on besides the API: vLLM's metric names, labels and values in /metrics (scraped
with prometheus_client's parser after a known workload, both transports), /health, and `vllm serve` flags (the CLI
as a subprocess: accepted, refused by name, described in --help)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_helpers import CLIServer, ServerThread, drain, make_engine

prometheus_parser = pytest.importorskip("prometheus_client.parser")

BASE = "tiny"
PROMPT_IDS = [5, 17, 42, 99, 7]  # 5 prompt tokens
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def engine(tiny_llama, engine_transport):
    """Room for a long generation (a request that is still running while /metrics is scraped)."""
    return make_engine(tiny_llama, max_model_len=512)


@pytest.fixture(scope="module")
def server(engine, adapters):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name=[BASE, "tiny-alias"], api_key="", allow_runtime_lora_updating=False,
                     lora_modules=[f"a1={adapters['a1']}", f"a2={adapters['a2']}"])
    with ServerThread(app) as srv:
        yield srv


def scrape(url: str) -> dict:
    """{(sample name, frozenset of labels): value} of one /metrics answer, through prometheus_client's parser."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name} {labels} not in /metrics: " + ", ".join(
        sorted(f"{n}{dict(l)}" for n, l in samples if n == name))
    return samples[key]


def series(samples: dict, name: str) -> list[dict]:
    return [dict(labels) for n, labels in samples if n == name]


def wait_for(url: str, check, timeout: float = 15.0) -> dict:
    """Scrape until ``check(samples)`` holds: the engine process publishes its state every 250 ms at most."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_vllm_metrics_after_a_known_workload(server):
    c = httpx.Client(base_url=server.url, timeout=120)
    before = wait_for(server.url, lambda s: value(s, "vllm:num_requests_running", model_name=BASE) == 0)
    num = 3
    for model in ("a1", "a1", "tiny-alias"):
        r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT_IDS, "max_tokens": MAX_TOKENS,
                                            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    with c.stream("POST", "/v1/completions", json={"model": "a2", "prompt": PROMPT_IDS, "max_tokens": 1,
                                                   "stream": True, "ignore_eos": True}) as r:
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    num += 1
    prompt, generated = num * len(PROMPT_IDS), (num - 1) * MAX_TOKENS + 1

    def delta(samples, name, **labels):
        return value(samples, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    after = wait_for(server.url, lambda s: delta(s, "vllm:generation_tokens_total", model_name=BASE) >= generated)
    # Token counters and per-request metrics carry the base model's served name, whichever adapter ran (vLLM's).
    assert delta(after, "vllm:prompt_tokens_total", model_name=BASE) == prompt
    assert delta(after, "vllm:generation_tokens_total", model_name=BASE) == generated
    assert delta(after, "vllm:request_success_total", model_name=BASE, finished_reason="length") == num
    for reason in ("stop", "abort"):
        assert delta(after, "vllm:request_success_total", model_name=BASE, finished_reason=reason) == 0
    assert delta(after, "vllm:time_to_first_token_seconds_count", model_name=BASE) == num
    assert delta(after, "vllm:e2e_request_latency_seconds_count", model_name=BASE) == num
    # One interval per generated token after a sequence's first.
    assert delta(after, "vllm:inter_token_latency_seconds_count", model_name=BASE) == (num - 1) * (MAX_TOKENS - 1)
    assert 0 < delta(after, "vllm:inter_token_latency_seconds_sum", model_name=BASE) \
        <= delta(after, "vllm:e2e_request_latency_seconds_sum", model_name=BASE)
    # vLLM's buckets, cumulative, the last one +Inf equal to the count.
    assert value(after, "vllm:time_to_first_token_seconds_bucket", model_name=BASE, le="0.001") >= 0
    assert value(after, "vllm:e2e_request_latency_seconds_bucket", model_name=BASE, le="7680.0") == value(
        after, "vllm:e2e_request_latency_seconds_count", model_name=BASE)
    assert value(after, "vllm:inter_token_latency_seconds_bucket", model_name=BASE, le="+Inf") == value(
        after, "vllm:inter_token_latency_seconds_count", model_name=BASE)
    assert value(after, "vllm:num_requests_running", model_name=BASE) == 0
    assert value(after, "vllm:num_requests_waiting", model_name=BASE) == 0
    assert 0.0 <= value(after, "vllm:kv_cache_usage_perc", model_name=BASE) < 1.0
    # Idle: the LoRA gauge names no adapter; its value is the time of the snapshot.
    (info,) = series(after, "vllm:lora_requests_info")
    assert info == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(value(after, "vllm:lora_requests_info", **info) - time.time()) < 60
    # Ours stay beside vLLM's, by the model each request named.
    assert delta(after, "loraplex_generation_tokens_total", model="a1") == 2 * MAX_TOKENS
    assert delta(after, "loraplex_requests_total", model="a1", status="200") == 2
    # Prefix cache counters of the other metrics set are there too.
    assert value(after, "vllm:prefix_cache_queries_total", model_name=BASE) >= 0


def test_running_adapter_and_abort_are_seen(server):
    """While an adapter request runs, vllm:lora_requests_info names it running, the queue gauges count its
    sequences and the KV cache is in use; a client that leaves counts its sequences as aborted."""
    before = scrape(server.url)
    started, release = threading.Event(), threading.Event()

    def stream():
        body = {"model": "a1", "prompt": PROMPT_IDS, "max_tokens": 500, "n": 2, "temperature": 1.0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                started.set()
                if release.is_set():
                    break  # leaving mid-stream aborts the request

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert started.wait(60)
        during = wait_for(server.url, lambda s: any(
            i["running_lora_adapters"] == "a1" for i in series(s, "vllm:lora_requests_info")))
    finally:
        release.set()
        t.join(60)
    (info,) = series(during, "vllm:lora_requests_info")
    assert info == {"max_lora": "2", "running_lora_adapters": "a1", "waiting_lora_adapters": ""}
    assert value(during, "vllm:num_requests_running", model_name=BASE) == 2
    assert value(during, "vllm:kv_cache_usage_perc", model_name=BASE) > 0
    after = wait_for(server.url, lambda s: value(s, "vllm:num_requests_running", model_name=BASE) == 0)
    aborted = value(after, "vllm:request_success_total", model_name=BASE, finished_reason="abort") - before[
        ("vllm:request_success_total", frozenset({"model_name": BASE, "finished_reason": "abort"}.items()))]
    assert aborted == 2
    assert series(after, "vllm:lora_requests_info")[0]["running_lora_adapters"] == ""


def test_a_400_on_a_known_model_counts_under_its_name(server):
    c = httpx.Client(base_url=server.url, timeout=60)
    before = scrape(server.url)
    for model in ("a1", "tiny-alias", None):
        body = {"prompt": "x", "n": 0} | ({"model": model} if model else {})
        assert c.post("/v1/completions", json=body).status_code == 400
    assert c.post("/v1/completions", json={"model": "nobody", "prompt": "x", "n": 0}).status_code == 400
    after = scrape(server.url)

    def delta(model):
        key = ("loraplex_requests_total", frozenset({"model": model, "status": "400"}.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert (delta("a1"), delta("tiny-alias"), delta(BASE), delta("<unknown>")) == (1, 1, 1, 1)
    assert not any(dict(labels).get("model") == "nobody" for _, labels in after)


def test_served_model_names_first_reported_all_accepted(server):
    c = httpx.Client(base_url=server.url, timeout=60)
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids[:2] == [BASE, "tiny-alias"]
    for name in (BASE, "tiny-alias"):
        r = c.post("/v1/completions", json={"model": name, "prompt": PROMPT_IDS, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == name


def test_health_is_json(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == "ok"
