"""logprobs, prompt_logprobs and echo on the OpenAI routes, in vLLM's shapes, against the offline engine."""
from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import ServerThread, drain, lora

from loraplex import SamplingParams

PROMPT = "Hello, my name is"
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(engine, adapters):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name="tiny", api_key="", allow_runtime_lora_updating=False,
                     lora_modules=[f"a1={adapters['a1']}"])
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def offline(reference, prompt, adapter=None, **kw):
    params = SamplingParams(**{"temperature": 0, "max_tokens": 6, **kw})
    return reference.generate([prompt], params, lora_request=lora(*adapter) if adapter else None)[0]


def stream(client, path: str, body: dict) -> list[dict]:
    chunks = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def check_top(lp: dict, want_entries: list, want_ids: list[int], k: int, tokenizer, offsets: bool = True) -> None:
    """Completion logprobs against the offline entries: the token's logprob, and its top_logprobs (vLLM: the
    token first, then the top k by rank; k + 1 at most). Streamed, a chunk's text_offset starts at the text sent
    so far (as vLLM's), which lags the tokens while a character's bytes are incomplete: offsets=False."""
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(want_ids)
    offset = lp["text_offset"][0]
    for i, (tid, entry) in enumerate(zip(want_ids, want_entries)):
        assert lp["tokens"][i] == tokenizer.decode([tid])
        assert lp["text_offset"][i] == offset or not offsets
        offset += len(lp["tokens"][i])
        if entry is None:
            assert lp["token_logprobs"][i] is None and lp["top_logprobs"][i] is None
            continue
        assert lp["token_logprobs"][i] == pytest.approx(entry[tid].logprob, abs=ATOL)
        top = lp["top_logprobs"][i]
        ranked = sorted((t for t in entry if t != tid), key=lambda t: entry[t].rank)[:k]
        want = {tokenizer.decode([t]): entry[t].logprob for t in [tid, *ranked]}
        assert list(top) == list(want)
        assert list(top.values()) == pytest.approx(list(want.values()), abs=ATOL)


def distinct_top_texts(entries: list, k: int, tokenizer) -> list[int]:
    """Per token, how many top_logprobs keys k top tokens make (byte tokens can decode to the same text)."""
    return [len({tokenizer.decode([t]) for t in sorted(e, key=lambda t: e[t].rank)[:k]}) for e in entries]


@pytest.mark.parametrize("model", ["tiny", "a1"])
def test_completion_logprobs_n(client, reference, adapters, engine, model):
    adapter = (model, adapters[model]) if model in adapters else None
    got = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                               "logprobs": 2})
    assert got.status_code == 200, got.text
    choice = got.json()["choices"][0]
    want = offline(reference, PROMPT, adapter, logprobs=2).outputs[0]
    assert choice["text"] == want.text and choice["prompt_logprobs"] is None
    lp = choice["logprobs"]
    assert lp["text_offset"][0] == 0
    check_top(lp, want.logprobs, want.token_ids, 2, engine.tokenizer)
    # Greedy: the sampled token is the top one, so 2 entries per token (fewer only where two decode alike).
    assert [len(top) for top in lp["top_logprobs"]] == distinct_top_texts(want.logprobs, 2, engine.tokenizer)
    assert 2 in [len(top) for top in lp["top_logprobs"]]


def test_completion_logprobs_stream(client, reference, engine):
    chunks = stream(client, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 6,
                                                 "temperature": 0, "logprobs": 2})
    want = offline(reference, PROMPT, logprobs=2).outputs[0]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        if lp is not None:
            for key in merged:
                merged[key] += lp[key]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    check_top(merged, want.logprobs, want.token_ids, 2, engine.tokenizer, offsets=False)
    assert [len(top) for top in merged["top_logprobs"]] == distinct_top_texts(want.logprobs, 2, engine.tokenizer)


def test_chat_logprobs(client, engine):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) >= 1 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"]) for c in content)  # greedy
    chunks = stream(client, "/v1/chat/completions", body)
    streamed = [c for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                for c in ch["choices"][0]["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]


@pytest.mark.parametrize("path,body,message,param", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21},
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)",
     "logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21},
     "Requested prompt logprobs of 21, which is greater than max allowed: 20 (parameter=prompt_logprobs, value=21)",
     "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21},
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)",
     "logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True},
     "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)", "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -2},
     "`logprobs` must be a positive value or -1. (parameter=logprobs, value=-2)", "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)",
     "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)", "top_logprobs"),
])
def test_bounds_are_vllm_400s(client, path, body, message, param):
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


def test_at_the_limit(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 1, "logprobs": 20,
                                             "prompt_logprobs": 20})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert 1 <= len(choice["logprobs"]["top_logprobs"][0]) <= 21  # keyed by text: byte tokens can collide
    assert choice["prompt_logprobs"][0] is None
    assert all(len(e) in (20, 21) for e in choice["prompt_logprobs"][1:])


@pytest.mark.parametrize("model", ["tiny", "a1"])
def test_prompt_logprobs_field(client, reference, adapters, model):
    adapter = (model, adapters[model]) if model in adapters else None
    r = client.post("/v1/completions", json={"model": model, "prompt": [PROMPT, "abc"], "max_tokens": 3, "n": 2,
                                             "temperature": 0, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4
    for choice in choices:
        want = offline(reference, [PROMPT, "abc"][choice["index"] // 2], adapter, max_tokens=3, prompt_logprobs=2)
        got = choice["prompt_logprobs"]
        assert choice["logprobs"] is None and len(got) == len(want.prompt_token_ids) and got[0] is None
        for g, w in zip(got[1:], want.prompt_logprobs[1:]):
            assert list(g) == [str(t) for t in w]  # JSON object keys: the token ids, the prompt token first
            for t, lp in w.items():
                assert g[str(t)]["logprob"] == pytest.approx(lp.logprob, abs=ATOL)
                assert g[str(t)]["rank"] == lp.rank and g[str(t)]["decoded_token"] == lp.decoded_token


def test_chat_prompt_logprobs(client, reference, engine):
    messages = [{"role": "user", "content": "hi there"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 1}
    got = client.post("/v1/chat/completions", json=body).json()
    want = reference.chat(messages, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1))[0]
    plp = got["prompt_logprobs"]  # vLLM: on the response, not in a choice
    assert "prompt_logprobs" not in got["choices"][0]
    assert len(plp) == len(want.prompt_token_ids) == got["usage"]["prompt_tokens"] and plp[0] is None
    for g, w in zip(plp[1:], want.prompt_logprobs[1:]):
        assert {int(t): v["logprob"] for t, v in g.items()} == pytest.approx({t: lp.logprob for t, lp in w.items()},
                                                                            abs=ATOL)
    plain = client.post("/v1/chat/completions", json={**body, "prompt_logprobs": None}).json()
    assert plain["prompt_logprobs"] is None


def test_echo_with_logprobs(client, reference, engine):
    tok = engine.tokenizer
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                             "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    want = offline(reference, PROMPT, max_tokens=4, logprobs=1, prompt_logprobs=1)
    out = want.outputs[0]
    assert choice["text"] == PROMPT + out.text
    lp = choice["logprobs"]
    ids = want.prompt_token_ids + out.token_ids
    assert lp["text_offset"][0] == 0
    check_top(lp, want.prompt_logprobs + out.logprobs, ids, 1, tok)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first prompt token
    assert "".join(lp["tokens"][:len(want.prompt_token_ids)]) == PROMPT
    # echo with logprobs asks for the prompt's logprobs too, and vLLM returns them in the choice.
    assert len(choice["prompt_logprobs"]) == len(want.prompt_token_ids)
    # Without logprobs: only the text.
    plain = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                                 "temperature": 0, "echo": True}).json()["choices"][0]
    assert plain["text"] == PROMPT + out.text and plain["logprobs"] is None and plain["prompt_logprobs"] is None


def test_echo_scoring_and_token_prompts(client, reference, engine):
    """max_tokens 0 with echo scores the prompt (vLLM): the answer is the prompt and its logprobs alone."""
    tok = engine.tokenizer
    ids = tok.encode("abc def")
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": [ids, "xyz"], "max_tokens": 0,
                                             "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == ["abc def", "xyz"]
    for choice, prompt in zip(choices, [{"prompt_token_ids": ids}, "xyz"]):
        want = offline(reference, prompt, max_tokens=1, prompt_logprobs=0)
        check_top(choice["logprobs"], want.prompt_logprobs, want.prompt_token_ids, 0, tok)
        assert choice["finish_reason"] == "length"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_echo_stream(client, reference, engine):
    want = offline(reference, PROMPT, max_tokens=5, logprobs=2, prompt_logprobs=2)
    chunks = stream(client, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 5,
                                                 "temperature": 0, "echo": True, "logprobs": 2})
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts[0].startswith(PROMPT) and "".join(texts) == PROMPT + want.outputs[0].text
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        if lp is not None:
            for key in merged:
                merged[key] += lp[key]
    check_top(merged, want.prompt_logprobs + want.outputs[0].logprobs,
              want.prompt_token_ids + want.outputs[0].token_ids, 2, engine.tokenizer, offsets=False)
    assert merged["text_offset"][:len(want.prompt_token_ids)] == list(range(len(want.prompt_token_ids)))
    # Scoring only, streamed: one chunk with the prompt.
    chunks = stream(client, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 0, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
