"""vLLM's documented curl flows, over httpx: listing, adapter completions, load, unload, in-place reload."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time

import httpx
import pytest
from server_helpers import ServerThread, drain, greedy

PROMPT = "Hello, my name is"


def complete(client, model, prompt=PROMPT, max_tokens=8):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0})


@pytest.fixture
def server(engine, adapters):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name="tiny", allow_runtime_lora_updating=True, api_key="",
                     admin_api_key="", lora_modules=[f"sql-lora={adapters['a1']}"])
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_adapters_change_outputs(reference, adapters):
    base = greedy(reference, PROMPT).token_ids
    assert all(greedy(reference, PROMPT, (n, adapters[n])).token_ids != base for n in ("a1", "a2", "a3", "a4"))


def test_models_listing(client, server, tiny_llama, adapters):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    base, lora = data["data"]
    assert base == {**base, "id": "tiny", "object": "model", "owned_by": "vllm", "root": str(tiny_llama),
                    "parent": None, "max_model_len": 128}
    assert isinstance(base["created"], int)
    assert lora == {**lora, "id": "sql-lora", "object": "model", "owned_by": "vllm", "root": str(adapters["a1"]),
                    "parent": "tiny", "max_model_len": None}


def test_completion_with_adapter(client, reference, adapters):
    r = complete(client, "sql-lora")
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(reference, PROMPT, ("a1", adapters["a1"])).text
    assert r.json()["model"] == "sql-lora"


def test_load_unload_and_inplace_reload(client, server, reference, adapters, engine):
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "new_adapter", "lora_path": str(adapters["a2"])})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'new_adapter' added successfully.")
    assert "new_adapter" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert complete(client, "new_adapter").json()["choices"][0]["text"] == greedy(
        reference, PROMPT, ("a2", adapters["a2"])).text

    again = client.post("/v1/load_lora_adapter", json={"lora_name": "new_adapter", "lora_path": str(adapters["a3"])})
    assert again.status_code == 400
    assert again.json()["error"] == {
        "message": "The lora adapter 'new_adapter' has already been loaded. If you want to load the adapter in "
                   "place, set 'load_inplace' to True.", "type": "InvalidUserInput", "param": None, "code": 400}

    r = client.post("/v1/load_lora_adapter", json={"lora_name": "new_adapter", "lora_path": str(adapters["a3"]),
                                                   "load_inplace": True})
    assert r.status_code == 200
    assert complete(client, "new_adapter").json()["choices"][0]["text"] == greedy(
        reference, PROMPT, ("a3", adapters["a3"])).text
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["new_adapter"]["root"] == str(adapters["a3"])

    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "new_adapter"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'new_adapter' removed successfully.")
    assert "new_adapter" not in server.app.state.server.aengine.adapters
    gone = complete(client, "new_adapter")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"
    assert gone.json()["error"]["message"].startswith("The model `new_adapter` does not exist.")
    # Preloaded adapters unload too.
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "sql-lora"}).status_code == 200
    never = client.post("/v1/unload_lora_adapter", json={"lora_name": "never"})
    assert never.status_code == 404
    assert never.json()["error"]["message"] == "The lora adapter 'never' cannot be found."


@pytest.mark.in_process_engine
def test_inplace_reload_keeps_running_requests_on_old_weights(client, server, reference, adapters):
    """A stream running during the reload finishes with the old weights; the next request gets the new."""
    client.post("/v1/load_lora_adapter", json={"lora_name": "live", "lora_path": str(adapters["a2"])})
    old = greedy(reference, PROMPT, ("a2", adapters["a2"]), max_tokens=100, ignore_eos=True).text
    aengine = server.app.state.server.aengine
    gate = threading.Event()
    paused = concurrent.futures.Future()

    def hold(engine):
        # Re-queued before every step until the stream has its first token, then holds the engine between two
        # steps, so the reload is sure to land mid-generation however slowly the client reads.
        if not any(seq.output_token_ids for seq in engine.scheduler.running):
            aengine.submit(hold, want_result=False)
            return
        gate.wait(30)
        paused.set_result(engine.get_num_unfinished_requests())

    aengine.submit(hold, want_result=False)
    with client.stream("POST", "/v1/completions", json={"model": "live", "prompt": PROMPT, "max_tokens": 100,
                                                        "temperature": 0, "ignore_eos": True, "stream": True}) as s:
        lines = s.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reload = pool.submit(httpx.post, server.url + "/v1/load_lora_adapter", timeout=60, json={
                "lora_name": "live", "lora_path": str(adapters["a4"]), "load_inplace": True})
            time.sleep(0.5)
            gate.set()
            assert paused.result() == 1  # the stream was still generating when the reload was queued
            assert reload.result().status_code == 200
        rest = [line for line in lines if line.startswith("data: {")]
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first] + rest)
    assert text == old
    assert complete(client, "live").json()["choices"][0]["text"] == greedy(reference, PROMPT,
                                                                           ("a4", adapters["a4"])).text


def test_load_errors(client, adapters, big_rank_adapter, tmp_path):
    ghost = tmp_path / "ghost"
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": str(ghost)})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": f"Loading lora ghost failed: No adapter found for {ghost}",
                                 "type": "NotFoundError", "param": None, "code": 404}
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(big_rank_adapter)})
    assert r.status_code == 400
    assert "rank 32" in r.json()["error"]["message"] and "max_lora_rank 16" in r.json()["error"]["message"]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": ""})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": str(adapters["a2"])})
    assert r.status_code == 400 and "conflicts with a served base model" in r.json()["error"]["message"]
    r = client.post("/v1/unload_lora_adapter", json={})
    assert r.status_code == 400
    assert complete(client, "tiny").status_code == 200  # and the server still answers


def test_routes_absent_without_runtime_updating(engine, monkeypatch):
    from loraplex.server import create_app

    monkeypatch.delenv("LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "false")
    with ServerThread(create_app(engine, api_key="")) as srv:
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
        assert r.status_code == 404
        assert complete(httpx.Client(base_url=srv.url), "unknown").status_code == 404


class SlowResolver:
    """A vLLM-style resolver that takes its time; counts its calls."""

    def __init__(self, adapters, delay):
        from loraplex.lora.resolver import LoRAResolver

        class _Resolver(LoRAResolver):
            async def resolve_lora(inner, base_model_name, lora_name):
                from loraplex.lora.request import LoRARequest

                if lora_name not in adapters:
                    return None
                with self.lock:
                    self.calls += 1
                await asyncio.sleep(delay)
                return LoRARequest(lora_name, 100 + self.calls, str(adapters[lora_name]))

        self.resolver = _Resolver()
        self.calls = 0
        self.lock = threading.Lock()


def test_slow_resolution_is_single_flight_and_does_not_block(server, reference, adapters):
    from loraplex.lora.resolver import LoRAResolverRegistry

    slow = SlowResolver({"a5": adapters["a5"]}, delay=2.5)
    LoRAResolverRegistry.register_resolver("test_slow", slow.resolver)
    try:
        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                async def timed(model):
                    start = time.monotonic()
                    r = await c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8,
                                                              "temperature": 0})
                    return model, r, time.monotonic() - start

                return await asyncio.gather(*[timed("a5") for _ in range(6)], *[timed("tiny") for _ in range(3)],
                                            timed("not-anywhere"))

        results = asyncio.run(run())
    finally:
        LoRAResolverRegistry.unregister_resolver("test_slow")
    want = greedy(reference, PROMPT, ("a5", adapters["a5"])).text
    for model, r, _ in results:
        if model == "a5":
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        else:
            assert r.status_code == (200 if model == "tiny" else 404)
    # The base requests were answered while the resolution was still sleeping.
    slowest_base = max(t for m, _, t in results if m == "tiny")
    assert slowest_base < min(t for m, _, t in results if m == "a5") - 0.5
    assert slow.calls == 1
