"""Server test helpers: a uvicorn server in a thread, and the offline engine's reference answers."""
from __future__ import annotations

import threading
import time

from loraplex import SamplingParams
from loraplex.lora.request import LoRARequest

MAX_MODEL_LEN = 128
# Engine settings shared by the server and the offline reference, so greedy outputs must agree.
ENGINE_KWARGS = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=32, seed=0, enable_lora=True, max_loras=2,
                     max_lora_rank=16, max_cpu_loras=4)


class ServerThread:
    """A real uvicorn server for an ASGI app, on 127.0.0.1 and a port the OS picks."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def engine_idle(aengine, timeout: float = 5.0) -> bool:
    """True once the engine reports no request running or waiting, in the state either transport publishes (an
    engine process sends it at least every few hundred milliseconds)."""
    deadline = time.monotonic() + timeout
    while aengine.state.get("num_running") or aengine.state.get("num_waiting"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def make_engine(model_dir, **overrides):
    from loraplex import EngineArgs, LLMEngine

    return LLMEngine.from_engine_args(EngineArgs(model=str(model_dir), **{**ENGINE_KWARGS, **overrides}))


def drain(engine) -> None:
    """Forget adapters a previous app loaded into a shared engine."""
    if engine.lora_manager is not None:
        for name in list(engine.lora_manager.adapters):
            engine.remove_lora(name)


_IDS: dict[str, int] = {}


def lora(name: str | None, path) -> LoRARequest | None:
    if name is None:
        return None
    lora_id = _IDS.setdefault(name, len(_IDS) + 1)
    return LoRARequest(name, lora_id, str(path))


def greedy(reference, prompt, adapter: tuple[str, object] | None = None, max_tokens: int = 8, **kw):
    """The offline engine's output for one prompt (str or token ids), alone in its batch."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    req = lora(*adapter) if adapter else None
    return reference.generate([prompt], params, lora_request=req)[0].outputs[0]


def greedy_chat(reference, messages, adapter=None, max_tokens: int = 8, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    req = lora(*adapter) if adapter else None
    return reference.chat(messages, params, lora_request=req)[0].outputs[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CLIServer:
    """``loraplex serve`` as a real process on 127.0.0.1, healthy on enter, stopped (SIGTERM, then kill) on exit.
    Its output goes to ``log`` (a path), read back by ``output()``; ``LORAPLEX_*`` / ``VLLM_*`` are not inherited."""

    def __init__(self, *args: str, log, env: dict | None = None, start_timeout: float = 120.0):
        import os
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "VLLM_"))}
        self.argv = [sys.executable, "-m", "loraplex.server.cli", "serve", *args, "--host", "127.0.0.1",
                     "--port", str(self.port)]
        self.env = {**clean, **(env or {})}
        self.start_timeout = start_timeout
        self.proc = None

    def __enter__(self) -> "CLIServer":
        import subprocess

        import httpx

        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server did not start:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def engine_pid(self) -> int | None:
        """The engine-core process's pid, from the start message."""
        import re

        m = re.search(r"engine in process (\d+)", self.output())
        return int(m.group(1)) if m else None

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
