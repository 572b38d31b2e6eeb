"""Issue #22 findings 1, 2, 6 and 7: what one API-key holder could do to everyone else, now refused or bounded.

Each test runs against a real uvicorn server on 127.0.0.1 (the CLI as a process where timing matters, so
the attacker's client threads do not share the server's interpreter). Each asserts the refusal and, where
the finding was about other tenants, that another client's request is unaffected meanwhile.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal

import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_helpers import CLIServer, ServerThread, make_engine

LOOPS = ("{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
         "{{ messages[0]['content'] }}")
HUGE = "{{ 'x' * 10**9 }}"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
SHORT = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


@pytest.fixture(scope="module")
def server(tiny_llama):
    from loraplex.server import create_app

    with ServerThread(create_app(make_engine(tiny_llama, enable_lora=False), api_key="")) as srv:
        yield srv


@pytest.fixture(scope="module")
def trusting(tiny_llama):
    from loraplex.server import create_app
    from loraplex.server.limits import RequestLimits

    limits = RequestLimits(trust_request_chat_template=True, chat_template_timeout_s=1.5)
    with ServerThread(create_app(make_engine(tiny_llama, enable_lora=False), api_key="", limits=limits)) as srv:
        yield srv


# ------------------------------------------------------------------ 1. request-supplied chat templates
@pytest.mark.parametrize("where", ["chat_template_kwargs", "chat_template"])
def test_request_templates_refused_by_default(server, where):
    body = {**CHAT, **({"chat_template_kwargs": {"chat_template": LOOPS}} if where == "chat_template_kwargs"
                       else {"chat_template": LOOPS})}
    start = time.monotonic()
    err = error_of(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30), 400)
    assert time.monotonic() - start < 2 and err["param"] == where
    assert "--trust-request-chat-template" in err["message"]


def test_trusted_request_templates_are_bounded(trusting, tiny_llama):
    """With the operator's consent a request template renders, but in a worker process with a time and memory
    bound: the runaway loop and the 1 GB string both end in a 400 while another tenant is served."""
    from loraplex import LLM, SamplingParams

    url = trusting.url + "/v1/chat/completions"
    mine = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    r = httpx.post(url, json={**CHAT, "chat_template": mine}, timeout=120)  # also starts the worker
    assert r.status_code == 200, r.text
    llm = LLM(model=str(tiny_llama), max_model_len=128)
    want = llm.chat(CHAT["messages"], SamplingParams(temperature=0, max_tokens=4), chat_template=mine)
    assert r.json()["choices"][0]["message"]["content"] == want[0].outputs[0].text
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(httpx.post, url, json={**CHAT, "chat_template": LOOPS}, timeout=60)
        time.sleep(0.3)
        start = time.monotonic()
        other = httpx.post(trusting.url + "/v1/completions", json=SHORT, timeout=30)
        assert other.status_code == 200 and time.monotonic() - start < 1.0
        err = error_of(slow.result(), 400)
    assert "did not render within 1.5 s" in err["message"]
    err = error_of(httpx.post(url, json={**CHAT, "chat_template": HUGE}, timeout=60), 400)
    assert "memory" in err["message"] or "MemoryError" in err["message"]
    assert httpx.post(url, json={**CHAT, "chat_template": mine}, timeout=120).status_code == 200  # worker restarted


# ------------------------------------------------------------------ 2. parameters that overflowed in the step
@pytest.mark.parametrize("field, value", [("seed", 18446744073709551616), ("seed", -2**63 - 1), ("top_k", 2**63),
                                          ("temperature", "Infinity")])
def test_overflowing_parameters_are_400_and_harm_nobody(server, field, value):
    if value == "Infinity":
        content = '{"prompt": "a", "max_tokens": 2, "temperature": Infinity}'
        r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, field: value})
    assert error_of(r, 400)["param"] == field


def test_bad_seeds_in_a_loop_fail_no_one_else(server):
    stop = threading.Event()

    def attacker():
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "seed": 2**64, "top_k": 2**63})

    t = threading.Thread(target=attacker)
    t.start()
    try:
        for _ in range(10):
            r = httpx.post(server.url + "/v1/completions", json=SHORT, timeout=30)
            assert r.status_code == 200, r.text
            assert httpx.get(server.url + "/health").status_code == 200
    finally:
        stop.set()
        t.join()


# ------------------------------------------------------------------ 6. unbounded work
def test_a_9mb_prompt_is_refused_from_its_content_length(server):
    """The body cap defaults to what the prompt cap needs (here 1 MiB): the body is never read or parsed."""
    start = time.monotonic()
    err = error_of(httpx.post(server.url + "/v1/completions", json={"prompt": "x" * (9 * 2**20)}, timeout=60), 413)
    assert "exceeds the limit of 1048576 bytes" in err["message"] and time.monotonic() - start < 3


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x" * 70000}, "prompt"),
    ({"prompt": ["a", "x" * 70000]}, "prompt"),
    ({"prompt": "hi", "n": 2000}, "n"),
    ({"prompt": ["hi"] * 1000}, "prompt"),
    ({"prompt": "hi", "stop": [f"s{i}" for i in range(10000)]}, "stop"),
    ({"prompt": "hi", "stop": ["y" * 5000]}, "stop"),
    ({"prompt": "hi", "n": 64, "max_tokens": 120}, "max_tokens"),
])
def test_unbounded_work_is_refused_before_tokenizing(server, body, param):
    start = time.monotonic()
    err = error_of(httpx.post(server.url + "/v1/completions", json=body, timeout=60), 400)
    assert err["param"] == param and time.monotonic() - start < 3


def test_messages_over_the_character_cap(server):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 40000}, {"role": "user", "content": "y" * 40000}]}
    assert error_of(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 400)["param"] == "messages"


def test_prompts_are_tokenized_off_the_engine_thread(server):
    from loraplex.server.frontend import Frontend

    seen = []
    original = Frontend.run

    async def spy(self, fn, *args):
        seen.append(threading.current_thread().name)
        return await original(self, lambda tok, *a: (seen.append(threading.current_thread().name), fn(tok, *a))[1],
                              *args)

    Frontend.run = spy
    try:
        assert httpx.post(server.url + "/v1/completions", json=SHORT, timeout=30).status_code == 200
    finally:
        Frontend.run = original
    assert seen and seen[-1].startswith("loraplex-frontend")


# ------------------------------------------------------------------ 7. smaller ones
def test_deep_json_and_lone_surrogates_are_400(server):
    deep = '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}"
    r = httpx.post(server.url + "/v1/completions", content=deep, headers={"content-type": "application/json"})
    assert error_of(r, 400)["message"] == "Invalid JSON body: nested too deeply"
    for route, body in (("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
                        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
                        ("/v1/completions", '{"prompt": "a", "stop": ["\\ud800"]}')):
        r = httpx.post(server.url + route, content=body, headers={"content-type": "application/json"})
        assert "lone surrogate" in error_of(r, 400)["message"]


def test_half_sent_headers_are_timed_out():
    """uvicorn alone never times out a request whose headers do not complete; the server's protocol does."""
    from starlette.applications import Starlette
    import uvicorn

    from loraplex.server.http_protocol import protocol_class

    config = uvicorn.Config(Starlette(), host="127.0.0.1", port=0, log_level="warning", http=protocol_class(0.5))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            start = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            assert sock.recv(1) == b""  # closed by the server
            assert 0.4 < time.monotonic() - start < 3
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # a whole request is answered
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(12).startswith(b"HTTP/1.1 404")
    finally:
        server.should_exit = True
        thread.join(10)


# ------------------------------------------------------------------ under attack: latency within 2x
ABUSE = [
    ("/v1/chat/completions", {**CHAT, "chat_template": LOOPS}),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2, "seed": 2**64}),
    ("/v1/completions", {"prompt": "x" * (9 * 2**20)}),
    ("/v1/completions", {"prompt": "hi", "n": 2000, "max_tokens": 100}),
    ("/v1/completions", {"prompt": "hi", "n": 8, "stop": [f"s{i}" for i in range(10000)]}),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**63}),
]


_ATTACKER = """
import json, signal, sys, httpx
bodies = [(route, json.dumps(body).encode()) for route, body in json.load(open(sys.argv[2]))]
seen, count, stop = set(), 0, []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
with httpx.Client(base_url=sys.argv[1], timeout=60, headers={"content-type": "application/json"}) as http:
    while not stop:
        route, body = bodies[count % len(bodies)]
        seen.add(http.post(route, content=body).status_code)
        count += 1
print(count, *sorted(seen))
"""


def _latencies(url: str, num: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(num):
            start = time.monotonic()
            r = http.post("/v1/completions", json=SHORT)
            assert r.status_code == 200, r.text
            out.append(time.monotonic() - start)
    return out


@pytest.mark.slow
def test_latency_under_attack_stays_bounded(tiny_llama, tmp_path):
    with CLIServer(str(tiny_llama), "--max-model-len", "128", "--disable-log-stats", "--uvicorn-log-level",
                   "warning", log=tmp_path / "server.log") as srv:
        _attack(srv.url, tmp_path)


def _attack(url: str, tmp_path) -> None:
    _latencies(url, 5)  # warm-up
    # The attacker is a process of its own, at the lowest CPU priority: a remote attacker spends its own CPU,
    # not the server's, and on this machine its thread would take the GIL from the client being timed. It
    # still sends as fast as it can; its bodies are encoded once, up front. The unloaded and attacked figures
    # are taken in alternating rounds (the attacker stopped and continued), so that a drift in this shared
    # machine's speed lands on both.
    abuse_file = tmp_path / "abuse.json"
    abuse_file.write_text(json.dumps(ABUSE))
    attacker = subprocess.Popen([sys.executable, "-c", _ATTACKER, url, str(abuse_file)], stdout=subprocess.PIPE,
                                text=True, preexec_fn=lambda: os.nice(19))
    time.sleep(1.0)
    alone_samples, attacked_samples = [], []
    try:
        for _ in range(5):
            attacker.send_signal(signal.SIGSTOP)
            time.sleep(0.2)  # its request in flight, if any, ends
            alone_samples += _latencies(url, 8)
            attacker.send_signal(signal.SIGCONT)
            time.sleep(0.3)
            attacked_samples += _latencies(url, 8)
    finally:
        attacker.send_signal(signal.SIGCONT)
        attacker.terminate()
        report = attacker.communicate(timeout=30)[0].split()
    alone, attacked = statistics.median(alone_samples), statistics.median(attacked_samples)
    statuses = {int(code) for code in report[1:]}
    print(f"attacker: {report[0]} requests")
    assert int(report[0]) > 100 and statuses <= {400, 413}, report  # 413: the 9 MB body, from Content-Length
    print(f"median latency alone {alone * 1000:.1f} ms, under attack {attacked * 1000:.1f} ms")
    # Issue #22's bound. With the engine in a thread of the API server's process this measured 1.6-2.2x on the
    # 2-core CI machine (the event loop and the engine shared one GIL); with the engine-core process that
    # `loraplex serve` starts, 1.0-1.2x.
    assert attacked < 2 * alone, (alone, attacked)


