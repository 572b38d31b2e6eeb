"""The server over a tensor-parallel engine (issue #20), CPU gloo, as a real process: ``serve -tp 2`` (the engine
process starts its second rank), completions of the base model, a --lora-modules adapter and one loaded at run
time equal the offline TP=1 engine's; when the second rank dies, requests and /health answer 503 at once."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import CLIServer

from loraplex import LLM, SamplingParams
from loraplex.lora.request import LoRARequest

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import make_peft_adapter  # noqa: E402

PROMPT = "Hello, my name is"


def _children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc, Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                out.append(int(entry))
    return out


def _complete(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 10,
                                                     "temperature": 0}, timeout=60)


@pytest.mark.slow
def test_serve_tp2(tiny_llama, tmp_path):
    a = make_peft_adapter(tiny_llama, tmp_path / "a", rank=8, seed=8, scale=0.2, targets="all-linear")
    b = make_peft_adapter(tiny_llama, tmp_path / "b", rank=4, seed=4, scale=0.2)
    llm = LLM(str(tiny_llama), max_model_len=128, enable_lora=True, max_lora_rank=8, max_loras=2)
    params = SamplingParams(temperature=0, max_tokens=10)
    expected = {name: llm.generate([PROMPT], params, lora_request=lora)[0].outputs[0].text for name, lora in
                ((str(tiny_llama), None), ("a", LoRARequest("a", 1, str(a))), ("b", LoRARequest("b", 2, str(b))))}
    with CLIServer(str(tiny_llama), "-tp", "2", "--max-model-len", "128", "--enable-lora", "--max-lora-rank", "8",
                   "--max-loras", "2", "--lora-modules", f"a={a}", "--disable-log-stats", log=tmp_path / "log",
                   env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as srv:
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(b)}, timeout=60)
        assert r.status_code == 200, r.text
        for model in expected:
            r = _complete(srv.url, model)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected[model], model
        ranks = _children(srv.engine_pid())
        assert len(ranks) == 1, srv.output()
        os.kill(ranks[0], signal.SIGKILL)
        start = time.monotonic()
        r = _complete(srv.url, "a")
        assert r.status_code == 503 and r.json()["error"]["code"] == 503, r.text
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 503
        assert time.monotonic() - start < 30
        assert "rank 1 exited" in srv.output()


def test_serve_tp_that_does_not_split(tiny_llama):
    """4 ranks for 2 KV heads: the server exits 1 naming why, and no rank is left behind."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "VLLM_"))}
    out = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "serve", str(tiny_llama), "-tp", "4",
                          "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "do not split into 4 equal shares" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
