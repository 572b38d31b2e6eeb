"""Prefix cache counters in /metrics: vLLM's (label model_name, the base model) and ours by model, over both
transports (the engine process publishes them in its state)."""
from __future__ import annotations

import time

import httpx
import pytest
from server_helpers import ServerThread, drain
from test_health_metrics import sample


@pytest.fixture
def server(engine, adapters):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name="tiny", api_key="", allow_runtime_lora_updating=False,
                     lora_modules=[f"a1={adapters['a1']}"])
    with ServerThread(app) as srv:
        yield srv


def test_prefix_cache_counters(server):
    c = httpx.Client(base_url=server.url, timeout=60)
    prompt = "".join(chr(97 + i % 26) for i in range(80))  # 80 byte tokens: 5 full blocks of 16
    for model in ("tiny", "tiny", "a1", "a1"):
        assert c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2,
                                               "temperature": 0, "ignore_eos": True}).status_code == 200
    deadline = time.monotonic() + 10
    while True:  # the engine process's state arrives within a heartbeat
        text = c.get("/metrics").text
        if sample(text, "vllm:prefix_cache_queries_total", model_name="tiny") == 320 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # The second request of each model finds 4 blocks (the last token is always computed); none crosses models.
    assert sample(text, "vllm:prefix_cache_queries_total", model_name="tiny") == 320
    assert sample(text, "vllm:prefix_cache_hits_total", model_name="tiny") == 128
    for model in ("tiny", "a1"):
        assert sample(text, "loraplex_prefix_cache_queries_total", model=model) == 160
        assert sample(text, "loraplex_prefix_cache_hits_total", model=model) == 64
