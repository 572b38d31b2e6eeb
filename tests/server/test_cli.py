"""The ``loraplex`` console script as a subprocess, with the filesystem resolver flow from vLLM's docs."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_helpers import greedy, greedy_chat

openai = pytest.importorskip("openai")

PROMPT = "Hello, my name is"


def cli() -> list[str]:
    exe = shutil.which("loraplex", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "loraplex.server.cli"]


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cli() + list(args), capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    from loraplex import __version__

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"loraplex {__version__}"
    helptext = run_cli("serve", "--help").stdout
    for flag in ("--lora-modules", "--max-loras", "--max-lora-rank", "--max-cpu-loras", "--api-key",
                 "--admin-api-key", "--allowed-lora-paths", "--served-model-name", "--enable-lora"):
        assert flag in helptext


def test_bad_model_is_a_clear_error(tmp_path):
    out = run_cli("serve", str(tmp_path / "missing"), "--port", "0")
    assert out.returncode == 1
    assert "loraplex: cannot load model" in out.stderr and "Traceback" not in out.stderr


def test_refused_vllm_flags_name_themselves(tiny_llama, capsys):
    from loraplex.server.cli import main

    out = run_cli("serve", str(tiny_llama), "--port", "0", "--fully-sharded-loras")  # the real process, once
    assert out.returncode != 0 and "EngineArgs.fully_sharded_loras" in out.stderr and "Traceback" not in out.stderr
    # The others take the same path before any weight is read: in this process (each subprocess costs seconds).
    for flags, name in ((["--lora-dtype", "int4"], "lora_dtype"),
                        (["--enable-lora", "--default-mm-loras", '{"audio": "/lora"}'], "default_mm_loras"),
                        (["--limit-mm-per-prompt", '{"image": 2}'], "limit_mm_per_prompt")):
        assert main(["serve", str(tiny_llama), "--port", "0", *flags]) == 1
        err = capsys.readouterr().err
        assert f"EngineArgs.{name}" in err and "Traceback" not in err, err


class Served:
    def __init__(self, args, env):
        self.proc = subprocess.Popen(cli() + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 180
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("the server did not get ready:\n" + "".join(self.log)) from None
            match = re.match(r"loraplex: serving (.+) on (http://\S+)", line or "")
            if match:
                self.model, self.url = match.groups()
                return
            if line is None:
                raise RuntimeError("the server exited:\n" + "".join(self.log))

    def _pump(self):
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_serve_with_filesystem_resolver(tiny_llama, adapters, big_rank_adapter, tmp_path, reference):
    pytest.importorskip("loraplex.resolvers.filesystem")
    cache = tmp_path / "loras"
    shutil.copytree(adapters["a3"], cache / "fs-lora")
    shutil.copytree(big_rank_adapter, cache / "too-big")
    shutil.copytree(adapters["a2"], cache / "other-base")
    config = json.loads((cache / "other-base" / "adapter_config.json").read_text())
    (cache / "other-base" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "someone/else"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "VLLM_"))}
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", LORAPLEX_PLUGINS="lora_filesystem_resolver",
               VLLM_LORA_RESOLVER_CACHE_DIR=str(cache), LORAPLEX_API_KEY="cli-key")
    module = json.dumps({"name": "sql-lora", "path": str(adapters["a1"]), "base_model_name": str(tiny_llama)})
    served = Served(["serve", str(tiny_llama), "--host", "127.0.0.1", "--port", "0", "--enable-lora",
                     "--max-model-len", "128", "--max-num-seqs", "32", "--max-loras", "2", "--max-lora-rank", "16",
                     "--max-cpu-loras", "4", "--seed", "0", "--lora-modules", module,
                     "--uvicorn-log-level", "warning"], env)
    try:
        assert served.model == str(tiny_llama)
        assert any("curl" in line and "/v1/completions" in line for line in served.log[-4:] + list(
            served.lines.queue))
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="cli-key", max_retries=0, timeout=60)
        got = client.completions.create(model="sql-lora", prompt=PROMPT, max_tokens=8, temperature=0)
        assert got.choices[0].text == greedy(reference, PROMPT, ("a1", adapters["a1"])).text
        chat = client.chat.completions.create(model=str(tiny_llama), messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == greedy_chat(reference, [{"role": "user", "content": "hi"}],
                                                              max_tokens=6).text

        http = httpx.Client(base_url=served.url, headers={"Authorization": "Bearer cli-key"}, timeout=60)
        r = http.post("/v1/completions", json={"model": "fs-lora", "prompt": PROMPT, "max_tokens": 8,
                                               "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy(reference, PROMPT, ("a3", adapters["a3"])).text
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed["fs-lora"]["root"] == str(cache / "fs-lora")
        assert listed["sql-lora"]["parent"] == str(tiny_llama)
        for name, status in (("missing", 404), ("other-base", 404), ("too-big", 400)):
            r = http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == status, (name, r.text)
        assert r.json()["error"]["message"] == "LoRA adapter 'too-big' was found but could not be loaded."
        assert http.get("/health").status_code == 200
        assert "loraplex_requests_total" in http.get("/metrics").text
    finally:
        served.stop()
    assert served.proc.returncode == 0, "".join(served.log)


def test_serve_help_describes_every_flag_once():
    """Every flag has a description, and a default shows once (none for flags whose help says it)."""
    helptext = run_cli("serve", "--help").stdout
    assert "(default: None)" not in helptext and helptext.count("(default: MODEL)") == 1
    import re

    from loraplex.server.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert [a.option_strings for a in serve._actions if a.option_strings and not a.help] == []
    for line_block in re.split(r"\n  (?=-)", helptext):
        assert line_block.count("(default:") <= 1, line_block


def test_banner_names_where_the_key_lives():
    from loraplex.server.cli import _banner

    assert "Bearer $LORAPLEX_API_KEY" in _banner("http://h", "m", [], api_key=True, key_from_env=True)
    from_flag = _banner("http://h", "m", [], api_key=True, key_from_env=False)
    assert "Bearer <--api-key>" in from_flag and "$LORAPLEX_API_KEY" not in from_flag
    assert "Authorization" not in _banner("http://h", "m", [], api_key=False)
