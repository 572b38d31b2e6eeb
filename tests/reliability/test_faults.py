"""A fault fails only the requests it touched; the engine (and the server) go on serving the others."""
from __future__ import annotations

import threading

import httpx
import pytest
from server_helpers import ServerThread, make_engine

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.errors import EngineStepError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def run(engine) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return outs


@pytest.fixture(scope="module")
def solo(tiny_llama):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=128))
    result = {}
    for prompt in ("alpha", "beta", "gamma"):
        engine.add_request(prompt, prompt, GREEDY)
        result[prompt] = run(engine)[prompt].outputs[0].token_ids
    return result


def test_failed_launch_fails_only_its_batch(tiny_llama, solo):
    """max_num_seqs=1: one request per step. The launch of the first fails; the two waiting ones are untouched."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=128, max_num_seqs=1))
    launch, calls = engine.runner.launch, []

    def failing_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected: secret text of request alpha")
        return launch(*args, **kwargs)

    engine.runner.launch = failing_first
    for prompt in ("alpha", "beta", "gamma"):
        engine.add_request(prompt, prompt, GREEDY)
    outs = run(engine)
    err = outs["alpha"].error
    assert isinstance(err, EngineStepError) and "secret" not in str(err) and "RuntimeError" in str(err)
    assert isinstance(err.__cause__, RuntimeError)  # kept for the log and the offline caller
    assert outs["alpha"].outputs[0].finish_reason == "abort"
    for prompt in ("beta", "gamma"):
        assert outs[prompt].error is None and outs[prompt].outputs[0].token_ids == solo[prompt]
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks  # nothing leaked


def test_failed_postprocess_fails_only_its_request(tiny_llama, solo):
    """A detokenizer that raises for one request, in a batch of three, ends that request alone."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=128))
    append, seen = engine.outputs.append_token, []

    def failing_for_beta(seq, *args, **kwargs):
        if seq.request_id == "beta" and len(seq.output_token_ids) == 2:
            seen.append(seq.request_id)
            raise UnicodeError("injected")
        return append(seq, *args, **kwargs)

    engine.outputs.append_token = failing_for_beta
    for prompt in ("alpha", "beta", "gamma"):
        engine.add_request(prompt, prompt, GREEDY)
    outs = run(engine)
    assert seen == ["beta"] and isinstance(outs["beta"].error, EngineStepError)
    for prompt in ("alpha", "gamma"):
        assert outs[prompt].error is None and outs[prompt].outputs[0].token_ids == solo[prompt]


def test_llm_generate_raises_the_step_error(tiny_llama):
    from loraplex import LLM

    llm = LLM(model=str(tiny_llama), max_model_len=128)
    launch = llm.llm_engine.runner.launch
    state = {"fail": True}

    def failing_once(*args, **kwargs):
        if state.pop("fail", False):
            raise RuntimeError("injected")
        return launch(*args, **kwargs)

    llm.llm_engine.runner.launch = failing_once
    with pytest.raises(EngineStepError) as info:
        llm.generate(["a", "b"], GREEDY)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [len(o.outputs[0].token_ids) for o in llm.generate(["a", "b"], GREEDY)] == [6, 6]


class _LoopBug(BaseException):
    """Not an Exception: what a bug in the loop itself (not in a step) looks like."""


def test_dead_engine_loop_answers_503_and_nothing_hangs(tiny_llama):
    from loraplex.server import create_app

    engine = make_engine(tiny_llama, enable_lora=False)
    step, started = engine.step, threading.Event()

    def dying_step():
        if started.is_set():
            raise _LoopBug("the loop dies")
        return step()

    engine.step = dying_step
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    with ServerThread(create_app(engine, api_key="", served_model_name="tiny")) as srv:
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "engine": "running", "num_running": 0, "num_waiting": 0,
                                 "num_loras": 0}
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            started.set()
            rest = [line for line in lines if line.startswith("data: ")]
        # The stream in flight ends with an error event, then [DONE]; it does not hang.
        assert '"code": 503' in rest[-2] and "The engine loop died (_LoopBug)" in rest[-2]
        assert rest[-1] == "data: [DONE]"
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "The engine loop is not running"
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
