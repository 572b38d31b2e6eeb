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


def test_cache_salt_over_http(server):
    """vLLM's cache_salt on both endpoints: only the same salt finds the blocks; a bad one is a 400 naming it."""
    c = httpx.Client(base_url=server.url, timeout=60)
    prompt = "".join(chr(97 + (7 * i) % 26) for i in range(80))

    def hits() -> float:
        text = c.get("/metrics").text
        return sample(text, "loraplex_prefix_cache_hits_total", model="tiny") if 'model="tiny"' in text else 0.0

    def post(salt, chat=False):
        body = {"model": "tiny", "max_tokens": 2, "temperature": 0, "ignore_eos": True, "cache_salt": salt}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        r = c.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        return r

    def settled(before: float, want: float) -> float:
        deadline = time.monotonic() + 10
        while (now := hits()) - before != want and time.monotonic() < deadline:
            time.sleep(0.1)
        return now - before

    for chat in (False, True):
        start = hits()
        assert post(f"t1-{chat}", chat).status_code == 200
        assert post(f"t2-{chat}", chat).status_code == 200  # another tenant: nothing of t1's
        assert settled(start, 0) == 0
        assert post(f"t1-{chat}", chat).status_code == 200
        assert settled(start, 64) >= 64  # the same salt: its full blocks but the last
    for bad in ("", 3, ["x"]):
        r = post(bad)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "cache_salt"
