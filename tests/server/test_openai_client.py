"""The official openai client against a real server: answers equal the offline engine's greedy outputs."""
from __future__ import annotations

import pytest
from server_helpers import ServerThread, greedy, greedy_chat

openai = pytest.importorskip("openai")

PROMPTS = ["Hello, my name is", "The capital of France is", "abc"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server(engine, adapters):
    from loraplex.server import create_app

    app = create_app(engine, served_model_name="tiny", api_key="sk-test", allow_runtime_lora_updating=False,
                     lora_modules=[f"a1={adapters['a1']}", {"name": "a2", "path": str(adapters["a2"])}])
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)


@pytest.mark.parametrize("model", [None, "tiny", "a1", "a2"])
def test_completions_match_offline(client, reference, adapters, model, tiny_llama):
    adapter = (model, adapters[model]) if model in adapters else None
    kwargs = {"model": model} if model else {"model": "tiny"}
    got = client.completions.create(prompt=PROMPTS, max_tokens=8, temperature=0, **kwargs)
    assert [c.index for c in got.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, got.choices):
        want = greedy(reference, prompt, adapter)
        assert choice.text == want.text
        assert choice.finish_reason == want.finish_reason
    want_tokens = sum(len(greedy(reference, p, adapter).token_ids) for p in PROMPTS)
    assert got.usage.completion_tokens == want_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + want_tokens


def test_model_path_and_token_ids(client, reference, tiny_llama, engine):
    ids = engine.tokenizer.encode("Hello there")
    got = client.completions.create(model=str(tiny_llama), prompt=ids, max_tokens=6, temperature=0)
    assert got.choices[0].text == greedy(reference, {"prompt_token_ids": ids}, max_tokens=6).text


@pytest.mark.parametrize("model", ["tiny", "a1"])
def test_chat_matches_offline(client, reference, adapters, model):
    adapter = (model, adapters[model]) if model in adapters else None
    got = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    want = greedy_chat(reference, MESSAGES, adapter)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)


@pytest.mark.parametrize("model", ["tiny", "a2"])
def test_streaming_completion(client, reference, adapters, model):
    adapter = (model, adapters[model]) if model in adapters else None
    stream = client.completions.create(model=model, prompt=PROMPTS[:2], max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    wants = [greedy(reference, p, adapter, max_tokens=10) for p in PROMPTS[:2]]
    assert [texts[0], texts[1]] == [w.text for w in wants]
    assert [finish[0], finish[1]] == [w.finish_reason for w in wants]
    assert usage.completion_tokens == sum(len(w.token_ids) for w in wants)


def test_streaming_chat(client, reference, adapters):
    stream = client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_chat(reference, MESSAGES, ("a1", adapters["a1"]), max_tokens=10).text
    assert chunks[-1].choices[0].finish_reason is not None


def test_sampling_options(client, reference):
    kw = dict(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, stop=["zz"])
    got = client.completions.create(model="tiny", prompt="abc", n=2, **kw,
                                    extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1})
    from loraplex import SamplingParams

    want = reference.generate(["abc"], SamplingParams(n=2, top_k=20, min_p=0.01, repetition_penalty=1.1, **kw))[0]
    assert [c.text for c in got.choices] == [o.text for o in want.outputs]
    ignore = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert ignore.usage.completion_tokens == 12


def test_logprobs(client, reference):
    got = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    want = greedy(reference, "abc", max_tokens=4, logprobs=2)
    assert len(lp.tokens) == len(want.token_ids) == len(lp.token_logprobs)
    for got_lp, tid, entry in zip(lp.token_logprobs, want.token_ids, want.logprobs):
        assert got_lp == pytest.approx(entry[tid].logprob, abs=1e-4)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_streaming_n_samples(client, reference):
    from collections import Counter, defaultdict

    from loraplex import SamplingParams

    kw = dict(n=2, max_tokens=6, temperature=0.9, seed=3)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[:2], stream=True, **kw)
    texts, finishes = defaultdict(str), Counter()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] += c.finish_reason is not None
    want = reference.generate(PROMPTS[:2], SamplingParams(**kw))
    assert dict(texts) == {p * 2 + o.index: o.text for p, out in enumerate(want) for o in out.outputs}
    assert dict(finishes) == {0: 1, 1: 1, 2: 1, 3: 1}
