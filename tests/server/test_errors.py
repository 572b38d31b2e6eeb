"""Every error answers its status and OpenAI JSON body, and the server answers the next request."""
from __future__ import annotations

import os
import time

import httpx
import pytest
from server_helpers import ServerThread, drain, make_engine

OK = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(engine, adapters, tmp_path_factory):
    from loraplex.server import create_app

    drain(engine)
    allowed = tmp_path_factory.mktemp("allowed")
    os.symlink(adapters["a2"], allowed / "link-out")  # a symlink that leads outside the allowed root
    app = create_app(engine, served_model_name="tiny", api_key="user-key", admin_api_key="admin-key",
                     allow_runtime_lora_updating=True, allowed_lora_paths=[str(allowed), str(adapters["a1"])],
                     max_request_body_bytes=4096)
    with ServerThread(app) as srv:
        srv.allowed = allowed
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer user-key"}, timeout=60) as c:
        yield c


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


BAD_COMPLETIONS = [
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "stop": [1]}, "stop"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "tiny", "prompt": 42}, "prompt"),
    ({"model": "tiny"}, "prompt"),
    ({"model": 7, "prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS)
def test_bad_completion_params(client, body, param):
    assert error_of(client.post("/v1/completions", json=body), 400)["param"] == param
    assert client.post("/v1/completions", json=OK).status_code == 200


@pytest.mark.parametrize("body", [
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"content": "no role"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
])
def test_bad_chat(client, body):
    error_of(client.post("/v1/chat/completions", json=body), 400)
    assert client.post("/v1/completions", json=OK).status_code == 200


def test_invalid_json_and_non_object(client):
    assert "Invalid JSON" in error_of(client.post("/v1/completions", content=b"{nope"), 400)["message"]
    error_of(client.post("/v1/completions", content=b"[1, 2]"), 400)
    error_of(client.post("/v1/completions", content=b"\xff\xfe"), 400)


def test_prompt_too_long(client):
    err = error_of(client.post("/v1/completions", json={**OK, "prompt": "x" * 200}), 400)
    assert "maximum context length is 128 tokens" in err["message"]
    err = error_of(client.post("/v1/completions", json={**OK, "prompt": "x" * 100, "max_tokens": 60}), 400)
    assert err["message"].startswith("This model's maximum context length is 128 tokens. However, you requested 160")
    error_of(client.post("/v1/completions", json={**OK, "prompt": [99999]}), 400)
    # One bad prompt in a batch refuses the whole request and leaves nothing running.
    error_of(client.post("/v1/completions", json={**OK, "prompt": ["fine", "x" * 200]}), 400)
    assert client.post("/v1/completions", json=OK).status_code == 200


def test_unknown_model(client):
    err = error_of(client.post("/v1/completions", json={**OK, "model": "nope"}), 404)
    assert err["type"] == "NotFoundError" and err["param"] == "model"
    assert err["message"].startswith("The model `nope` does not exist.")


def test_body_too_large(client):
    err = error_of(client.post("/v1/completions", json={**OK, "prompt": "x" * 5000}), 413)
    assert "4096" in err["message"]
    # Chunked upload without a Content-Length: counted while reading.
    err = error_of(client.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 5000, b'"}'])), 413)
    assert client.post("/v1/completions", json=OK).status_code == 200


def test_auth(server, client):
    assert error_of(httpx.get(server.url + "/v1/models"), 401)["type"] == "AuthenticationError"
    error_of(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    error_of(httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic user-key"}), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # /health and /metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200
    admin = {"Authorization": "Bearer admin-key"}
    assert httpx.get(server.url + "/v1/models", headers=admin).status_code == 200
    body = {"lora_name": "nope"}
    error_of(client.post("/v1/unload_lora_adapter", json=body), 403)  # the user key cannot manage adapters
    error_of(httpx.post(server.url + "/v1/unload_lora_adapter", json=body), 401)
    error_of(httpx.post(server.url + "/v1/unload_lora_adapter", json=body, headers=admin), 404)


def test_allowed_lora_paths(server, adapters):
    admin = {"Authorization": "Bearer admin-key"}
    load = lambda name, path: httpx.post(server.url + "/v1/load_lora_adapter", headers=admin,  # noqa: E731
                                         json={"lora_name": name, "lora_path": str(path)})
    err = error_of(load("outside", adapters["a3"]), 403)
    assert "--allowed-lora-paths" in err["message"] and err["param"] == "lora_path"
    error_of(load("sneaky", server.allowed / "link-out"), 403)
    error_of(load("dots", server.allowed / ".." / adapters["a3"].name), 403)
    assert load("inside", adapters["a1"]).status_code == 200
    assert httpx.post(server.url + "/v1/unload_lora_adapter", headers=admin,
                      json={"lora_name": "inside"}).status_code == 200


def test_unknown_route_and_method(client):
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "NotFoundError"
    error_of(client.get("/v1/completions"), 405)


def wait_idle(aengine, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while aengine.submit(lambda e: e.has_unfinished_requests()).result():
        assert time.monotonic() < deadline, "requests still running after their clients left"
        time.sleep(0.05)


def test_client_disconnect_aborts(tiny_llama):
    """Long requests (32 samples of 500 tokens) stopped by their clients leave the engine idle early."""
    from loraplex.server import create_app

    engine = make_engine(tiny_llama, enable_lora=False, max_model_len=512)
    with ServerThread(create_app(engine, api_key="", served_model_name="tiny")) as srv:
        aengine = srv.app.state.server.aengine
        tokens = lambda: aengine.submit(lambda e: e.stats["num_generation_tokens"]).result()  # noqa: E731
        body = {**OK, "max_tokens": 500, "ignore_eos": True, "prompt": ["Hi"] * 8, "n": 4}
        full = 32 * 500
        with httpx.Client(base_url=srv.url) as client:
            before = tokens()
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                next(line for line in r.iter_lines() if line.startswith("data: {"))
            wait_idle(aengine)
            assert tokens() - before < full / 2
            before = tokens()
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=0.3)
            wait_idle(aengine)
            assert tokens() - before < full / 2
            assert client.post("/v1/completions", json=OK).status_code == 200


def test_engine_failure_is_500_and_server_recovers(tiny_llama):
    """A fault injected into one step fails the requests in flight, not the server."""
    from loraplex.server import create_app

    engine = make_engine(tiny_llama, enable_lora=False)
    launch = engine.runner.launch
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fell off the bus")
        return launch(*args, **kwargs)

    engine.runner.launch = failing_once
    with ServerThread(create_app(engine, api_key="", served_model_name="tiny")) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={**OK, "max_tokens": 8, "ignore_eos": True})
        err = error_of(r, 500)
        assert err["type"] == "InternalServerError"
        # The exception's type, never its text: that may come from another request's parameters.
        assert err["message"] == "The engine step that ran this request failed (RuntimeError)"
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.post(srv.url + "/v1/completions", json=OK).status_code == 200
