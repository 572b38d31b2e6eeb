"""/health, /metrics (Prometheus text), /version, and what happens when the engine loop is gone."""
from __future__ import annotations

import re

import httpx
import pytest
from server_helpers import ServerThread, drain


@pytest.fixture
def server(engine, adapters):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name="tiny", api_key="", allow_runtime_lora_updating=False,
                     lora_modules=[f"a1={adapters['a1']}", f"a2={adapters['a2']}"])
    with ServerThread(app) as srv:
        yield srv


def sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}" + (rf"\{{{re.escape(want)}\}}" if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name} {labels} not in metrics"
    return float(match.group(1))


def test_metrics_after_traffic(server):
    c = httpx.Client(base_url=server.url, timeout=60)
    for model in ("tiny", "a1", "a2", "a1"):
        assert c.post("/v1/completions", json={"model": model, "prompt": "abc", "max_tokens": 5,
                                               "temperature": 0, "ignore_eos": True}).status_code == 200
    with c.stream("POST", "/v1/chat/completions", json={"model": "a2", "stream": True, "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
    assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert c.post("/v1/completions", json={"model": "a1", "prompt": "x", "n": 0}).status_code == 400
    assert c.post("/v1/completions", json={"model": "nope", "prompt": "x", "n": 0}).status_code == 400
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert sample(text, "loraplex_requests_total", model="a1", status="200") == 2
    assert sample(text, "loraplex_requests_total", model="a2", status="200") == 2
    assert sample(text, "loraplex_requests_total", model="<unknown>", status="404") == 1
    # A 400 on a served model counts under its name; a name nobody serves mints no series.
    assert sample(text, "loraplex_requests_total", model="a1", status="400") == 1
    assert sample(text, "loraplex_requests_total", model="<unknown>", status="400") == 1
    assert sample(text, "loraplex_generation_tokens_total", model="a1") == 10
    assert sample(text, "loraplex_prompt_tokens_total", model="tiny") == 3
    assert sample(text, "loraplex_time_to_first_token_seconds_count", model="a1") == 2
    assert sample(text, "loraplex_e2e_request_latency_seconds_count", model="a2") == 2
    assert sample(text, "loraplex_num_requests_running") == 0
    assert sample(text, "loraplex_num_requests_waiting") == 0
    assert sample(text, "loraplex_lora_adapters_registered") == 2
    assert sample(text, "loraplex_lora_adapters_gpu") >= 1
    assert sample(text, "loraplex_lora_adapters_cpu") >= 1
    assert sample(text, "loraplex_lora_cache_hits_total", tier="gpu") >= 1
    assert sample(text, "loraplex_lora_cache_misses_total", tier="gpu") >= 1
    assert sample(text, "loraplex_lora_load_seconds_count") >= 2
    assert sample(text, "loraplex_lora_load_seconds_sum") > 0


def test_each_app_has_its_own_registry(engine, server):
    from loraplex.server import create_app

    other = create_app(engine, served_model_name="tiny", api_key="")
    assert other.state.server.metrics.registry is not server.app.state.server.metrics.registry


def test_health_and_version(server):
    from loraplex import __version__

    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    server.app.state.server.aengine.stop()  # the engine loop is gone: health says so, requests get 503
    assert httpx.get(server.url + "/health").status_code == 503
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
