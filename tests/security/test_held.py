"""What held before issue #22, kept so: pickled weights are never unpickled, the template sandbox holds, message
text is data. (Auth variants, body caps by Content-Length and chunked, and malformed safetensors are covered in
tests/server/test_errors.py and tests/lora/test_adapter_errors.py; traversal and symlink names in
tests/plugins/test_filesystem_resolver.py; running counts after disconnects in tests/server/test_health_metrics.py.)
"""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from server_helpers import ServerThread, make_engine

MARKER = "/tmp/loraplex-pickle-ran"


class _Payload:
    def __reduce__(self):
        return (open, (MARKER, "w"))


@pytest.fixture(scope="module")
def server(tiny_llama):
    from loraplex.server import create_app
    from loraplex.server.limits import RequestLimits

    app = create_app(make_engine(tiny_llama, max_loras=2, max_lora_rank=8), api_key="",
                     allow_runtime_lora_updating=True, limits=RequestLimits(trust_request_chat_template=True))
    with ServerThread(app) as srv:
        yield srv


def test_pickled_weights_are_not_unpickled(server, sec_adapters, tmp_path):
    import os

    if os.path.exists(MARKER):
        os.remove(MARKER)
    evil = tmp_path / "pickled"
    shutil.copytree(sec_adapters["good"], evil)
    (evil / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Payload()},
               evil / "adapter_model.bin")
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "pickled", "lora_path": str(evil)},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert not os.path.exists(MARKER)


def test_the_template_sandbox_holds(server):
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": escape})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "SecurityError" in message and "unsafe" in message, message


def test_message_text_is_not_template_code(server, tiny_llama):
    from loraplex import LLM, SamplingParams

    messages = [{"role": "user", "content": "{{ 7 * 7 }} {% for i in range(3) %}x{% endfor %}"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 3,
                                                              "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    llm = LLM(model=str(tiny_llama), max_model_len=128)
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    prompt = llm.get_tokenizer().decode(want.prompt_token_ids)
    assert "{{ 7 * 7 }}" in prompt and "49" not in prompt  # rendered as text, not evaluated
    assert r.json()["choices"][0]["message"]["content"] == want.outputs[0].text
    assert json.loads(r.text)["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
