"""The engine-core process (issue #21): its death under load and a clean stop, against `loraplex serve`.

When the engine process dies, every open stream ends with an error event within seconds, /health answers 503,
new requests get 503 with vLLM's error body, and the API server stays up to say so. SIGTERM stops both
processes within a bounded time, ending the requests in flight.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest
from server_helpers import CLIServer

LONG = {"prompt": "Hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}


def _stream(url: str, started: concurrent.futures.Future | None = None) -> tuple[list[dict], float]:
    """Read one stream to its end: (its data events, seconds from the first event to the end)."""
    events, first = [], None
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.monotonic()
                    if started is not None and not started.done():
                        started.set_result(True)
                if line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
    return events, time.monotonic() - (first or time.monotonic())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_engine_process_killed_under_load(tiny_llama, tmp_path):
    with CLIServer(str(tiny_llama), "--max-model-len", "512", "--disable-log-stats", log=tmp_path / "log") as srv:
        pid = srv.engine_pid()
        assert pid is not None and pid != srv.proc.pid and _alive(pid), srv.output()
        num_streams = 16
        started = [concurrent.futures.Future() for _ in range(num_streams)]
        with concurrent.futures.ThreadPoolExecutor(num_streams) as pool:
            streams = [pool.submit(_stream, srv.url, s) for s in started]
            concurrent.futures.wait(started, timeout=60)
            assert all(s.done() for s in started), "the streams did not start"
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            results = [s.result(timeout=30) for s in streams]
        ended = time.monotonic() - killed
        assert ended < 10, f"streams took {ended:.1f} s to end after the engine died"
        for events, _ in results:
            last = events[-1]
            # Cut short (400 tokens take far longer than the kill came), with vLLM's error body for a 503.
            assert "error" in last, last
            assert last["error"]["code"] == 503 and "engine process died" in last["error"]["message"]
        health = httpx.get(srv.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["error"]["code"] == 503
        r = httpx.post(srv.url + "/v1/completions", json={**LONG, "stream": False, "max_tokens": 4}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        assert srv.proc.poll() is None, "the API server must stay up to answer 503"


@pytest.mark.slow
def test_sigterm_stops_both_processes_in_bounded_time(tiny_llama, tmp_path):
    with CLIServer(str(tiny_llama), "--max-model-len", "512", "--disable-log-stats", log=tmp_path / "log") as srv:
        pid = srv.engine_pid()
        started = [concurrent.futures.Future() for _ in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(_stream, srv.url, s) for s in started]
            concurrent.futures.wait(started, timeout=60)
            srv.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            for s in streams:
                s.result(timeout=40)  # every stream ends (drained within uvicorn's grace period, or cut)
            srv.proc.wait(40)
        stopped = time.monotonic() - signalled
        assert stopped < 30, f"the server took {stopped:.1f} s to stop"
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the engine process outlived the server"


@pytest.mark.slow
def test_api_server_count_two(tiny_llama, adapters, tmp_path):
    """Two API server processes on one port over one engine: answers equal the offline engine's, adapters loaded
    through one are served by both, /metrics adds up both processes' counters, and the engine's death is a 503
    from both."""
    with CLIServer(str(tiny_llama), "--max-model-len", "128", "--disable-log-stats", "--api-server-count", "2",
                   "--enable-lora", "--max-lora-rank", "16", log=tmp_path / "log",
                   env={"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as srv:
        deadline = time.monotonic() + 20
        while "2 API server processes" not in srv.output():
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.1)
        body = {"prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(adapters["a1"])})
            assert r.status_code == 200, r.text
            # Fresh connections: the kernel spreads them over both processes; both serve the adapter at once.
            texts = set()
            for _ in range(12):
                for model in ("a1", None):
                    r = httpx.post(srv.url + "/v1/completions", json={**body, "model": model}, timeout=30)
                    assert r.status_code == 200, r.text
                    texts.add((model, r.json()["choices"][0]["text"]))
            assert len(texts) == 2
            metrics = http.get("/metrics").text
            total = sum(float(x.split()[-1]) for x in metrics.splitlines()
                        if x.startswith("loraplex_requests_total{") and 'status="200"' in x)
            assert total == 24.0, metrics
        pid = srv.engine_pid()
        os.kill(pid, signal.SIGKILL)
        time.sleep(2)
        codes = {httpx.get(srv.url + "/health", timeout=5).status_code for _ in range(8)}
        assert codes == {503}, codes
