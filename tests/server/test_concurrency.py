"""64 concurrent streams over 4 adapters and the base while other adapters are loaded and unloaded."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from server_helpers import ServerThread, drain, engine_idle, greedy

openai = pytest.importorskip("openai")

MODELS = ["tiny", "a1", "a2", "a3", "a4"]
PROMPTS = ["Hello, my name is", "The capital of France is", "abc", "Once upon a time", "SELECT * FROM",
           "1, 2, 3,", "def main():", "Dear Sir,"]


@pytest.fixture(scope="module")
def server(engine, adapters):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name="tiny", allow_runtime_lora_updating=True, api_key="",
                     admin_api_key="", lora_modules=[f"{n}={adapters[n]}" for n in ("a1", "a2", "a3", "a4")])
    with ServerThread(app) as srv:
        yield srv


def test_64_streams_with_adapter_churn(server, reference, adapters):
    _streams_with_churn(server, reference, adapters)


@pytest.mark.gpu
def test_64_streams_with_adapter_churn_cuda(tiny_llama, adapters):
    """The same on a CUDA engine (graphs, async scheduling, uploads on the side stream), fp32 so that greedy
    answers cannot depend on the batch."""
    import torch

    from loraplex import LLM
    from loraplex.server import create_app
    from server_helpers import ENGINE_KWARGS, make_engine

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda = dict(device="cuda", dtype="float32")
    engine = make_engine(tiny_llama, **cuda)
    reference = LLM(str(tiny_llama), **{**ENGINE_KWARGS, **cuda})
    app = create_app(engine, served_model_name="tiny", allow_runtime_lora_updating=True, api_key="",
                     admin_api_key="", lora_modules=[f"{n}={adapters[n]}" for n in ("a1", "a2", "a3", "a4")])
    with ServerThread(app) as srv:
        _streams_with_churn(srv, reference, adapters)


def _streams_with_churn(server, reference, adapters):
    jobs = [(MODELS[i % 5], PROMPTS[i % 8], 6 + i % 7) for i in range(64)]
    want = {}
    for model, prompt, max_tokens in set(jobs):
        adapter = (model, adapters[model]) if model != "tiny" else None
        want[(model, prompt, max_tokens)] = greedy(reference, prompt, adapter, max_tokens=max_tokens)

    async def stream(client, model, prompt, max_tokens):
        text, finish = "", None
        resp = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True)
        async for chunk in resp:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def churn(http, stop: asyncio.Event):
        cycles = 0
        while not stop.is_set() or cycles < 3:
            name = f"churn-{cycles % 3}"
            r = await http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters["a5"])})
            assert r.status_code == 200, r.text
            r = await http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            assert r.status_code == 200, r.text
            cycles += 1
        return cycles

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            stop = asyncio.Event()
            churner = asyncio.create_task(churn(http, stop))
            results = await asyncio.gather(*[stream(client, *job) for job in jobs])
            stop.set()
            cycles = await churner
        await client.close()
        return results, cycles

    results, cycles = asyncio.run(main())
    assert cycles >= 3
    for job, (text, finish) in zip(jobs, results):
        assert (text, finish) == (want[job].text, want[job].finish_reason), job
    aengine = server.app.state.server.aengine
    assert engine_idle(aengine)
    assert sorted(aengine.adapters) == ["a1", "a2", "a3", "a4"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'loraplex_requests_total{model="a3",status="200"} 13.0' in metrics
