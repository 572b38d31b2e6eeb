"""Issue #22 finding 3: a stalled stream must not grow the server's memory with n x T^2.

Each step's output used to carry full copies of the token ids, logprobs and text so far, queued unread behind a
client that stopped reading (one request, n=4, 6,000 tokens, logprobs=20: +1.19 GB). Now streams get DELTA
outputs (O(new) per step) and a stream whose client stops reading is aborted once its queue holds more than
``MAX_UNDELIVERED_TOKENS`` tokens (docs/server.md), while other clients, and slow clients that read, go on.
"""
from __future__ import annotations

import json
import pickle
import socket
import threading
import time

import httpx
import pytest
from server_helpers import ServerThread, make_engine

from loraplex import SamplingParams
from loraplex.sampling_params import RequestOutputKind

MAX_MODEL_LEN = 4096
N, LOGPROBS = 4, 20


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    from helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def engine(long_model):
    return make_engine(long_model, max_model_len=MAX_MODEL_LEN, enable_lora=False)


def _run(engine, rid: str, params: SamplingParams, prompt: str = "Hello, my name is") -> list:
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def _size(out) -> int:
    return len(pickle.dumps(out))


def _reassemble(outs: list) -> dict:
    """DELTA outputs joined per sample: what a streaming consumer ends with."""
    got: dict[int, dict] = {}
    for out in outs:
        for o in out.outputs:
            g = got.setdefault(o.index, {"text": "", "token_ids": [], "logprobs": [], "finish_reason": None})
            assert g["finish_reason"] is None, "a finished sample reappeared"
            g["text"] += o.text
            g["token_ids"] += o.token_ids
            g["logprobs"] += o.logprobs
            g["finish_reason"], g["stop_reason"], g["cumulative_logprob"] = (o.finish_reason, o.stop_reason,
                                                                              o.cumulative_logprob)
    return got


def test_delta_outputs_are_o_new_and_add_up_to_the_cumulative_ones(engine):
    n = 2
    base = dict(n=n, temperature=1.0, seed=7, max_tokens=100, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    probe = _run(engine, "probe", SamplingParams(**base))
    # A stop string from sample 0's text (3 characters: text is held back while it may be starting one); the
    # seeded samples repeat, so sample 0 stops there and the other runs to max_tokens.
    stop = probe[-1].outputs[0].text[40:43]
    assert len(stop) == 3
    for include in (False, True):
        kw = {**base, "stop": [stop], "include_stop_str_in_output": include}
        cumulative = _run(engine, f"c{include}", SamplingParams(**kw))
        delta = _run(engine, f"d{include}", SamplingParams(**kw, output_kind=RequestOutputKind.DELTA))
        want = cumulative[-1]
        assert want.finished and want.outputs[0].finish_reason == "stop" and want.outputs[0].stop_reason == stop
        assert (stop in want.outputs[0].text) == include and want.outputs[1].finish_reason == "length"

        # DELTA: joined, exactly the cumulative answer; prompt logprobs once; a finished sample once.
        got = _reassemble(delta)
        assert sorted(got) == list(range(n))
        for o in want.outputs:
            g = got[o.index]
            assert (g["text"], g["token_ids"], g["logprobs"]) == (o.text, o.token_ids, o.logprobs)
            assert (g["finish_reason"], g["stop_reason"]) == (o.finish_reason, o.stop_reason)
            assert g["cumulative_logprob"] == pytest.approx(o.cumulative_logprob)
        assert [d.prompt_logprobs for d in delta if d.prompt_logprobs is not None] == [want.prompt_logprobs]
        assert delta[-1].finished and not any(d.finished for d in delta[:-1])

        # Per step: at most one new token (and its logprobs) per sample, and a size that does not grow with T,
        # while a cumulative output's does.
        assert all(len(o.token_ids) <= 1 and len(o.logprobs) == len(o.token_ids) for d in delta for o in d.outputs)
        running = [o for d in delta[:-1] for o in d.outputs if o.index == 1 and o.token_ids]
        early, late = _size(running[5]), _size(running[-1])
        assert late < 1.5 * early, (early, late)
        assert _size(probe[-2]) > 20 * _size(delta[-2])

        if not include:
            # FINAL_ONLY: empty placeholders, then the cumulative output, built once.
            final_only = _run(engine, "f", SamplingParams(**kw, output_kind=RequestOutputKind.FINAL_ONLY))
            assert all(not o.outputs and not o.finished for o in final_only[:-1])
            assert final_only[-1].outputs == want.outputs and final_only[-1].prompt_logprobs == want.prompt_logprobs


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _open_stream(url: str, body: dict) -> socket.socket:
    """A streaming request on a raw socket that reads nothing (a tiny receive buffer, so little fits)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    data = json.dumps({**body, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def _read_to_done(s: socket.socket, timeout: float, pause: float = 0.0) -> bytes:
    s.settimeout(timeout)
    buf = bytearray()
    while b"data: [DONE]" not in buf[-64:]:
        chunk = s.recv(16384)
        if not chunk:
            break
        buf += chunk
        if pause:
            time.sleep(pause)
    return bytes(buf)


@pytest.fixture(scope="module")
def server(engine):
    from loraplex.server import create_app

    app = create_app(engine, served_model_name="tiny", api_key="", admin_api_key="")
    with ServerThread(app) as srv:
        yield srv


BOUND = 1024  # MAX_UNDELIVERED_TOKENS for these tests: 256 steps of n=4, so a stalled stream is cut early
# The socket buffers take ~1,000 steps of this before the stream blocks (tcp_wmem's 4 MB): max_tokens leaves
# room for the bound to cut it well before its end.
STALLED = {"model": "tiny", "prompt": "hello", "max_tokens": 4000, "n": N, "logprobs": LOGPROBS,
           "ignore_eos": True, "temperature": 1.0}


@pytest.fixture
def bound(monkeypatch):
    from loraplex.server import request_group

    monkeypatch.setattr(request_group, "MAX_UNDELIVERED_TOKENS", BOUND)


def test_stalled_stream_is_aborted_and_memory_stays_bounded(server, engine, bound):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.post("/v1/completions", json={**STALLED, "max_tokens": 200})  # warm up allocator and caches
        time.sleep(0.2)
        base_rss, base_tokens = _rss_mb(), engine.stats["num_generation_tokens"]
        stalled = _open_stream(server.url, STALLED)
        deadline = time.monotonic() + 20
        while not engine.has_unfinished_requests():  # the stalled request is in the engine
            assert time.monotonic() < deadline
            time.sleep(0.01)
        peak, other_tokens, latencies = base_rss, 0, []
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss_mb())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # Another client's requests, whole and streamed, meanwhile: answered in full, fast.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                t = time.monotonic()
                r = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 16,
                                                         "ignore_eos": True, "logprobs": 2})
                latencies.append(time.monotonic() - t)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["choices"][0]["finish_reason"] == "length"
                assert body["usage"]["completion_tokens"] == 16
                other_tokens += 16
                t = time.monotonic()
                with client.stream("POST", "/v1/completions", json={
                        "model": "tiny", "prompt": "abc", "max_tokens": 8, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}) as resp:
                    lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
                latencies.append(time.monotonic() - t)
                assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 8
                other_tokens += 8
                if not engine.has_unfinished_requests():
                    break  # the stalled stream's request is gone: aborted (or, before the fix, done)
            assert not engine.has_unfinished_requests(), "the stalled stream kept running"
        finally:
            stop.set()
            sampler.join()
        stalled_tokens = engine.stats["num_generation_tokens"] - base_tokens - other_tokens
        growth = peak - base_rss
        print(f"stalled stream: {stalled_tokens} tokens generated of {N * STALLED['max_tokens']}, "
              f"RSS +{growth:.1f} MB, other requests max {max(latencies):.2f} s")
        assert stalled_tokens < N * STALLED["max_tokens"], "not aborted: it ran to max_tokens"
        assert growth < 40, f"RSS grew {growth:.0f} MB behind a stalled stream"
        assert max(latencies) < 5.0

        # Should the client read again, it gets what the socket held, then the error, then [DONE].
        data = _read_to_done(stalled, timeout=10)
        stalled.close()
        assert data.startswith(b"HTTP/1.1 200")
        assert b"The client stopped reading the stream" in data and b'"code": 408' in data
        assert b"data: [DONE]" in data[-64:]


def test_slow_reader_is_not_aborted(server, engine, bound):
    """A client that reads, in small pieces with pauses, gets its whole answer, far more than the bound."""
    body = {**STALLED, "max_tokens": 500}
    s = _open_stream(server.url, body)
    data = _read_to_done(s, timeout=60, pause=0.002)
    s.close()
    assert b"stopped reading" not in data and b'"error"' not in data
    events = [json.loads(line[6:]) for line in data.decode().split("\n")
              if line.startswith("data: {") and line.endswith("}")]
    tokens = {i: 0 for i in range(N)}
    finish = {}
    for e in events:
        for c in e["choices"]:
            tokens[c["index"]] += len(c["logprobs"]["tokens"])
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    assert finish == {i: "length" for i in range(N)}
    assert tokens == {i: 500 for i in range(N)} and N * 500 > BOUND
