"""ProcEngineClient: the server's engine in an engine-core process of its own (``loraplex.engine.core_proc``).

The API server (HTTP, tokenizing, templates, detokenizing, SSE) and the engine then share no GIL: the engine
steps at its offline pace however busy the front end is, and a crash of either side is seen by the other. The
front end PUSHes commands to the core's socket and reads its own PULL socket in an asyncio task; the core
process is watched through a lifeline pipe, so when it dies every open request ends with a 503 at once and
/health says so.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import zmq

from loraplex.engine.wire import error_from_wire, lora_to_wire, mm_to_wire, pack, params_to_wire, unpack
from loraplex.server.async_engine import EngineClient
from loraplex.server.errors import EngineUnavailableError

logger = logging.getLogger("loraplex.server")

SHUTDOWN_TIMEOUT_S = 15.0


class EngineStartError(RuntimeError):
    """The engine process could not start: ``stage`` is "model" or "lora_modules"; the message says why."""

    def __init__(self, stage: str, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.stage = stage
        self.type_name = type_name


def _address(tag: str) -> str:
    return f"ipc://{tempfile.gettempdir()}/loraplex-{os.getpid()}-{tag}-{uuid.uuid4().hex[:8]}.sock"


class EngineCoreProcess:
    """The engine-core process, and what its clients need to reach it.

    ``lifeline``: this process's end of the pipe the core watches (closing it, or dying, stops the core).
    ``client_lifelines``: with ``num_clients``, one pipe end per API server process to come, whose other end the
    core holds: it reads EOF when the core dies. ``handle(i)``: what API server ``i`` attaches with."""

    def __init__(self, proc, address: str, lifeline, info: dict, state: dict, client_lifelines: list):
        self.proc = proc
        self.address = address
        self.lifeline = lifeline
        self.info = info
        self.state = state
        self.client_lifelines = client_lifelines

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, args, lora_modules=(), progress: bool = False, num_clients: int = 0) -> "EngineCoreProcess":
        """Start it and wait until it has built the engine and preloaded ``lora_modules``
        (``[(name, path, base_model_name)]``); EngineStartError says why it could not."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        address = _address("in")
        parent, child = ctx.Pipe()
        pipes = [ctx.Pipe() for _ in range(num_clients)]
        proc = ctx.Process(target=_core_main, name="loraplex-engine-core",
                           args=(args, list(lora_modules), address, child, progress, logging.getLogger().level,
                                 [core_end for _, core_end in pipes]))
        proc.start()
        child.close()
        for _, core_end in pipes:
            core_end.close()  # only the core holds it now: its death is the clients' EOF
        died = EngineStartError("model", "EngineProcessDied", "the engine process exited before it was ready")
        while not parent.poll(0.5):
            if not proc.is_alive():
                raise died
        try:
            reply = parent.recv()
        except EOFError:
            proc.join(10)
            raise died from None
        if reply[0] == "error":
            proc.join(30)
            _, stage, (type_name, message, _attrs) = reply
            raise EngineStartError(stage, type_name, message)
        _, info, state = reply
        return cls(proc, address, parent, info, state, [client_end for client_end, _ in pipes])

    def handle(self, i: int) -> dict:
        return {"info": self.info, "state": self.state, "address": self.address, "lifeline": self.client_lifelines[i]}

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Close the lifeline (the core aborts what runs and exits); kill it past ``timeout``."""
        try:
            self.lifeline.close()
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            logger.warning("the engine process did not stop within %.0f s: killing it", timeout)
            self.proc.kill()
            self.proc.join(5)
        _unlink(self.address)


def _unlink(address: str) -> None:
    try:
        os.unlink(address[len("ipc://"):])
    except OSError:
        pass


def _tokenizer(args, info: dict):
    """The front end's own copy, loaded as the engine loads its own: prompts tokenize as LLM.generate's do."""
    from loraplex.engine.engine_core import load_tokenizer

    return None if info["skip_tokenizer_init"] else load_tokenizer(args, Path(info["model_path"]))


def _processor(info: dict):
    """A multi-modal model's HF processor, for the front end (it expands placeholders and makes pixel values)."""
    if not info.get("modalities") or info["skip_tokenizer_init"]:
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(info["model_path"])


class ProcEngineClient(EngineClient):
    """One API server's client of the engine-core process. ``core``: the process, when this client started it
    (``spawn``; it then stops it too); None when attached to one an outer process started (--api-server-count)."""

    def __init__(self, info: dict, tokenizer, address: str, lifeline, state: dict,
                 core: EngineCoreProcess | None = None):
        super().__init__(info, tokenizer)
        self.core = core
        self._lifeline = lifeline
        self._address = address
        self._out_address = _address("out")
        self._set_state(state)
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._ctx = self._push_ctx = self._push = self._pull = None
        self._reader: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_heard = time.monotonic()
        self._is_dead = False
        self._is_stopping = False

    @property
    def proc(self):
        return self.core.proc if self.core is not None else None

    @classmethod
    def spawn(cls, args, lora_modules=(), progress: bool = False) -> "ProcEngineClient":
        """Start an engine process for this client alone; returns the client (not yet started: ``astart``)."""
        core = EngineCoreProcess.start(args, lora_modules, progress)
        client = cls(core.info, _tokenizer(args, core.info), core.address, core.lifeline, core.state, core=core)
        client.processor = _processor(core.info)
        return client

    @classmethod
    def attach(cls, args, handle: dict) -> "ProcEngineClient":
        """In an API server process: the client of a core that another process started (``handle(i)``)."""
        client = cls(handle["info"], _tokenizer(args, handle["info"]), handle["address"], handle["lifeline"],
                     handle["state"])
        client.processor = _processor(handle["info"])
        return client

    # ------------------------------------------------------------------ lifecycle
    async def astart(self) -> None:
        import zmq.asyncio

        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.bind(self._out_address)
        # A plain socket for sending: sends (never blocking: no high-water mark) run in this thread only, also
        # from synchronous callbacks (a stream's on_close).
        self._push_ctx = zmq.Context()
        self._push = self._push_ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self._address)
        self._reader = asyncio.create_task(self._read())
        threading.Thread(target=self._watch, name="loraplex-engine-watch", daemon=True).start()
        self._send("hello")

    def start(self) -> None:
        raise RuntimeError("ProcEngineClient starts in the server's event loop: await astart()")

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop talking to the engine; stop the engine process too when this client started it."""
        self._is_stopping = True
        if self.core is not None:
            if not self._is_dead and self._push is not None:
                try:
                    self._send("shutdown")  # at once; the lifeline's close is the fallback
                except Exception:
                    pass
            self.core.stop(timeout)
        if self._reader is not None:
            self._reader.cancel()
        for ctx in (self._ctx, self._push_ctx):
            if ctx is not None:
                ctx.destroy(linger=0)
        _unlink(self._out_address)

    @property
    def is_running(self) -> bool:
        return not self._is_dead and not self._is_stopping and (self.proc is None or self.proc.is_alive())

    def stuck_for(self) -> float | None:
        """Seconds since the engine process last said anything, once past ``max_step_seconds`` (it sends its
        state at least every few hundred milliseconds, between two steps)."""
        silent = time.monotonic() - self._last_heard
        return silent if silent > self.max_step_seconds else None

    def _watch(self) -> None:
        """Thread: wait for the lifeline to close (the engine process died), then fail everything."""
        waits = [self._lifeline] + ([self.proc.sentinel] if self.proc is not None else [])
        try:
            multiprocessing.connection.wait(waits)
        except OSError:
            pass
        if self._is_stopping:
            return
        code = None
        if self.proc is not None:
            self.proc.join(1)
            code = self.proc.exitcode
        logger.critical("the engine process died (exit code %s): every request now gets 503", code)
        self._is_dead = True
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._died, code)
            except RuntimeError:
                pass

    def _died(self, code) -> None:
        error = EngineUnavailableError("The engine process died" + (f" (exit code {code})" if code is not None else ""))
        calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(error)
        self._fail_all(error)

    # ------------------------------------------------------------------ channel
    def _send(self, kind: str, *args, call_id: int | None = None) -> None:
        if self._push is None:
            raise EngineUnavailableError("The engine client is not started")
        if kind == "add":
            args = ([[rid, ids, params_to_wire(p), lora, mm_to_wire(mm), salt]
                     for rid, ids, p, lora, mm, salt in args[0]],)
        elif kind == "add_resolved":
            args = (lora_to_wire(args[0]),)
        self._push.send(pack([kind, self._out_address, call_id, *args]), flags=zmq.NOBLOCK, copy=False)

    async def _call(self, kind: str, *args):
        if not self.is_running:
            raise EngineUnavailableError("The engine is not running")
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            self._send(kind, *args, call_id=call_id)
            return await fut
        finally:
            self._calls.pop(call_id, None)

    async def _read(self) -> None:
        while True:
            try:
                data = await self._pull.recv(copy=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._is_stopping or self._is_dead:
                    return
                logger.exception("reading from the engine process failed")
                continue
            self._last_heard = time.monotonic()
            try:
                self._handle(unpack(data.buffer))
            except Exception:
                logger.exception("handling a message of the engine process failed")

    def _handle(self, message: list) -> None:
        kind = message[0]
        if kind == "out":
            self._on_records(message[1])
        elif kind == "state":
            self._set_state(message[1])
        elif kind == "reply":
            _, call_id, ok, value = message
            fut = self._calls.get(call_id)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(error_from_wire(value))


def _core_main(*args) -> None:
    from loraplex.engine.core_proc import main

    main(*args)

