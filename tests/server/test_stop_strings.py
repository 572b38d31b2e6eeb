"""Stop strings through the server: the API server detokenizes and applies them (the engine runs with none), stops
the sample in the engine, and the answer equals the offline engine's (text, token ids, finish and stop reasons),
whole and streamed, for n > 1 where one sample stops and the other runs on."""
from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import ServerThread, engine_idle

from loraplex import SamplingParams

PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def server(engine):
    from loraplex.server import create_app

    with ServerThread(create_app(engine, served_model_name="tiny", api_key="")) as srv:
        yield srv


def _stop_from(reference) -> str:
    """A stop string taken from the middle of sample 0's text (seeded), so it is sure to hit there."""
    out = reference.generate([PROMPT], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=40,
                                                      ignore_eos=True))[0]
    text = out.outputs[0].text
    assert len(text) > 12
    return text[8:11]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_equals_offline(server, reference, include):
    stop = _stop_from(reference)
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    want = reference.generate([PROMPT], params)[0].outputs
    body = {"model": "tiny", "prompt": PROMPT, "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 40,
            "ignore_eos": True, "stop": [stop], "include_stop_str_in_output": include, "logprobs": 1}
    got = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert want[0].finish_reason == "stop" and want[0].stop_reason == stop
    assert want[1].finish_reason == "length"  # the other sample runs on past the stop of the first
    for w, g in zip(want, got):
        assert (g["text"], g["finish_reason"], g["stop_reason"]) == (w.text, w.finish_reason, w.stop_reason)
        assert len(g["logprobs"]["tokens"]) == len(w.token_ids)  # tokens past the stop are dropped
    streamed = {0: "", 1: ""}
    finish = {}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True, "logprobs": None},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    streamed[c["index"]] += c["text"]
                    if c["finish_reason"]:
                        finish[c["index"]] = (c["finish_reason"], c["stop_reason"])
    assert streamed == {0: want[0].text, 1: want[1].text}
    assert finish == {i: (w.finish_reason, w.stop_reason) for i, w in enumerate(want)}
    assert engine_idle(server.app.state.server.aengine)  # the stopped sample ended in the engine too
