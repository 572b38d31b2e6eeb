"""What loraplex does not implement is refused by name, offline (typed errors) and on the server (400)."""
from __future__ import annotations

import httpx
import pytest
from server_helpers import ServerThread, make_engine

from loraplex import LLM, EngineArgs, SamplingParams
from loraplex.errors import (ConfigError, InvalidRequestError, UnknownArgumentError,
                             UnsupportedArgumentError)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), max_model_len=128)


@pytest.mark.parametrize("kwargs, name", [
    (dict(fully_sharded_loras=True), "fully_sharded_loras"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),  # 2 without torchrun: tests/distributed
    (dict(lora_dtype="int8"), "lora_dtype"),
    (dict(enforce_eager="yes"), "enforce_eager"),
    (dict(max_loras=0), "max_loras"),
    (dict(default_mm_loras={"smell": "/x"}, enable_lora=True), "default_mm_loras"),
    (dict(default_mm_loras={"audio": ""}, enable_lora=True), "default_mm_loras"),
    (dict(default_mm_loras={"audio": "/x"}), "default_mm_loras"),  # without enable_lora
    (dict(limit_mm_per_prompt={"image": -1}), "limit_mm_per_prompt"),
])
def test_engine_args_refused_by_name(kwargs, name):
    with pytest.raises(ConfigError) as info:
        EngineArgs(model="m", **kwargs)
    assert info.value.name == name and f"EngineArgs.{name}" in str(info.value)
    assert isinstance(info.value, ValueError)  # what vLLM code catches


def test_multi_modal_arguments_need_a_multi_modal_model(tiny_llama):
    """vLLM's default_mm_loras / limit_mm_per_prompt are arguments now (no TypeError), refused for a text-only
    model by name at start."""
    for kwargs in (dict(default_mm_loras={"audio": "/some/lora"}, enable_lora=True),
                   dict(limit_mm_per_prompt={"image": 2})):
        with pytest.raises(ConfigError, match="needs a multi-modal model; LlamaForCausalLM is text-only"):
            LLM(model=str(tiny_llama), max_model_len=128, **kwargs)
    LLM(model=str(tiny_llama), max_model_len=128, limit_mm_per_prompt={"image": 0})  # zero asks for nothing


def test_unknown_engine_argument(tiny_llama):
    with pytest.raises(UnknownArgumentError, match="max_seq_len_to_capture"):
        LLM(model=str(tiny_llama), max_seq_len_to_capture=8192)  # removed from vLLM too
    with pytest.raises(TypeError):
        LLM(model=str(tiny_llama), enable_prefix_cachin=True)


@pytest.mark.parametrize("kwargs, name", [
    (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(top_k=2**63), "top_k"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
])
def test_sampling_params_bounds(kwargs, name):
    with pytest.raises(InvalidRequestError, match=f"SamplingParams.{name}"):
        SamplingParams(**kwargs)


def test_extreme_seeds_still_generate(llm):
    for seed in (2**63 - 1, -2**63):
        out = llm.generate("Hi", SamplingParams(seed=seed, max_tokens=3, n=2, ignore_eos=True))[0]
        assert [len(o.token_ids) for o in out.outputs] == [3, 3]


@pytest.mark.parametrize("key", ["multi_modal_data", "mm_processor_kwargs", "promt"])
def test_prompt_keys_refused(llm, key):
    with pytest.raises(UnsupportedArgumentError) as info:
        llm.generate({"prompt": "Hi", key: {"image": None}}, SamplingParams(max_tokens=2))
    assert info.value.name == key and repr(key) in str(info.value)
    assert llm.llm_engine.get_num_unfinished_requests() == 0


@pytest.fixture(scope="module")
def server(tiny_llama):
    from loraplex.server import create_app

    with ServerThread(create_app(make_engine(tiny_llama), api_key="", served_model_name="tiny")) as srv:
        yield srv


COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {**COMPLETION, "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {**COMPLETION, "guided_regex": "a+"}, "guided_regex"),
    ("/v1/chat/completions", {**CHAT, "guided_choice": ["a", "b"]}, "guided_choice"),
    ("/v1/chat/completions", {**CHAT, "structured_outputs": {"json": {}}}, "structured_outputs"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "suffix": "x"}, "suffix"),
    ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of"),
    ("/v1/completions", {**COMPLETION, "tempreature": 0}, "tempreature"),
    ("/v1/completions", {**COMPLETION, "seed": 18446744073709551616}, "seed"),
    ("/v1/completions", {**COMPLETION, "top_k": 2**63}, "top_k"),
])
def test_server_refuses_by_name(server, route, body, param):
    r = httpx.post(server.url + route, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["param"] == param and param in err["message"]


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
])
def test_server_refuses_media_for_a_text_only_model(server, part):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1]" and f"'{part['type']}' part" in err["message"]
    assert "text-only" in err["message"]


def test_server_refuses_non_finite_numbers(server):
    r = httpx.post(server.url + "/v1/completions", content='{"model": "tiny", "prompt": "a", "temperature": Infinity}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_server_accepts_what_it_serves(server):
    ok = {**CHAT, "user": "someone", "tool_choice": "none", "response_format": {"type": "text"}, "tools": []}
    assert httpx.post(server.url + "/v1/chat/completions", json=ok, timeout=30).status_code == 200


def test_chat_takes_vllms_arguments(llm):
    messages = [{"role": "user", "content": "hi"}]
    greedy = SamplingParams(temperature=0, max_tokens=3)
    base = llm.chat(messages, greedy)[0].outputs[0].token_ids
    assert llm.chat(messages, greedy, chat_template_kwargs={"unused": 1}, tools=None)[0].outputs[0].token_ids == base
    with pytest.raises(UnsupportedArgumentError, match="mm_processor_kwargs"):
        llm.chat(messages, greedy, mm_processor_kwargs={"size": 3})
    with pytest.raises(UnsupportedArgumentError, match="chat_template_content_format"):
        llm.chat(messages, greedy, chat_template_content_format="openai")
    with pytest.raises(TypeError):
        llm.chat(messages, greedy, add_generation_promt=False)  # a typo is not a template variable


def test_stop_strings_need_detokenize():
    with pytest.raises(InvalidRequestError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
