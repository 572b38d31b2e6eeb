"""The server's engine clients: ``EngineClient`` (what the server asks of an engine, and the front end's half of
output processing) over two transports: ``AsyncEngine`` runs the engine in a thread of this process, and
``loraplex.server.engine_proc.ProcEngineClient`` in an engine-core process of its own (``loraplex serve``).

Either way the engine side is a ``ServingCore`` (``loraplex.engine.serving_core``): named commands that run
between two steps, so a command never races a step, and step records of new token ids. Here, in the event loop,
``OutputAssembler`` turns them into RequestOutputs (text, stop strings, logprob objects) for the
``RequestGroup`` of each HTTP request. Streams ask DELTA outputs (O(new tokens) per step) and a stream whose
client stops reading is aborted past a bound (``loraplex.server.request_group``).

The engine side also publishes ``state`` (queue lengths, adapter cache counters, the loaded adapters), a
snapshot replaced as a whole, so metrics and /v1/models read it without asking the engine.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from typing import Callable

from loraplex.engine.serving_core import MAX_STEP_FAILURES, ServingCore
from loraplex.lora.request import LoRARequest
from loraplex.server.errors import EngineUnavailableError
from loraplex.server.output_assembler import OutputAssembler
from loraplex.server.request_group import RequestGroup

logger = logging.getLogger("loraplex.server")

class EngineClient:
    """What the server asks of an engine; the transport (a thread, a process) is the subclass's.

    Event loop side: ``generate``, ``abort``, the adapter commands, ``state`` / ``adapters`` / ``info`` snapshots,
    health. Subclasses implement ``_call`` (a command and its result), ``_send`` (a command, no answer), ``start``,
    ``stop``, ``is_running`` and ``stuck_for``, and hand step records to ``_on_records`` in the event loop.
    """

    def __init__(self, info: dict, tokenizer):
        self.info = info
        self.tokenizer = tokenizer
        self.processor = None  # a multi-modal model's HF processor (set by the transport)
        self.max_model_len: int = info["max_model_len"]
        self.is_lora_enabled: bool = info["is_lora_enabled"]
        self.max_step_seconds = 60.0
        self.state: dict = {}
        self.adapters: dict[str, LoRARequest] = {}  # name -> LoRARequest of the current version
        self._assembler = OutputAssembler(tokenizer)
        self._routes: dict[str, RequestGroup] = {}  # event loop only
        self._prefix = uuid.uuid4().hex[:8]
        self._counter = itertools.count()

    # ------------------------------------------------------------------ transport (subclasses)
    async def _call(self, kind: str, *args):
        raise NotImplementedError

    def _send(self, kind: str, *args) -> None:
        raise NotImplementedError

    async def astart(self) -> None:
        """Start serving, from the server's event loop (its lifespan)."""
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    def stuck_for(self) -> float | None:
        raise NotImplementedError

    @property
    def is_healthy(self) -> bool:
        return self.is_running and self.state.get("num_step_failures", 0) < MAX_STEP_FAILURES \
            and self.stuck_for() is None

    def _set_state(self, state: dict) -> None:
        """A snapshot from the engine side; replaces the old one whole (read from any thread)."""
        adapters = state.pop("adapters", None)
        if adapters is not None:
            self.adapters = {name: LoRARequest(name, lora_id, path, base_model_name=base)
                             for name, lora_id, path, base in adapters}
        self.state = state

    # ------------------------------------------------------------------ requests
    async def generate(self, prompts: list[dict], params, lora_name: str | None) -> RequestGroup:
        """Add one engine request per prompt (``{"prompt_token_ids": [...], "prompt": text or absent}``), all or
        nothing: if one is refused (an adapter unloaded meanwhile...), none runs and the error is raised here."""
        group = RequestGroup(self, asyncio.get_running_loop())
        base = f"{self._prefix}-{next(self._counter)}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        lora = self.adapters.get(lora_name) if lora_name is not None else None
        for rid, p in zip(ids, prompts):
            # Before the core hears of it: its first outputs may come right behind the answer.
            self._assembler.add(rid, p.get("prompt"), p["prompt_token_ids"], params, lora)
            self._routes[rid] = group
        group.ids = ids
        try:
            await self._call("add", [(rid, p["prompt_token_ids"], params, lora_name, p.get("mm"),
                                      p.get("cache_salt"))
                                     for rid, p in zip(ids, prompts)])
        except BaseException as e:
            for rid in ids:
                self._routes.pop(rid, None)
                self._assembler.forget(rid)
            if isinstance(e, asyncio.CancelledError):
                self._send("abort", ids)  # the core may have added them after all
            raise
        if group._closed:  # the caller left while the command waited its turn
            self.abort(ids)
        return group

    def abort(self, request_ids: list[str]) -> None:
        self._send("abort", list(request_ids))

    def _on_records(self, records: list) -> None:
        """Event loop: one step's records to the groups of their requests."""
        stops, aborts = [], []
        for record in records:
            rid = record[0]
            group = self._routes.get(rid)
            if group is None:
                continue  # aborted by a client that left, or refused while being added
            item, stop, still_running = self._assembler.apply(record)
            if item is None:
                continue
            stops += stop
            if still_running:
                aborts.append(rid)  # every sample hit a stop string here: the core need not go on
            if isinstance(item, BaseException) or item.finished:
                del self._routes[rid]
            group._feed(item)
        if stops:
            self._send("stop_samples", stops)
        if aborts:
            self._send("abort", aborts)

    def _fail_all(self, error: BaseException) -> None:
        """Event loop: every request in flight ends with ``error``."""
        routes, self._routes = self._routes, {}
        for rid, group in routes.items():
            self._assembler.forget(rid)
        for group in set(routes.values()):
            group._feed(error)

    # ------------------------------------------------------------------ adapters
    async def load_adapter(self, name: str, path: str, load_inplace: bool, allowed_paths) -> None:
        """Load (or reload in place) an adapter; returns once it serves. Typed errors (LoRAError...)."""
        await self._call("load_adapter", name, path, load_inplace, list(allowed_paths) if allowed_paths else None)

    async def add_resolved(self, req: LoRARequest) -> None:
        await self._call("add_resolved", req)

    async def unload_adapter(self, name: str) -> None:
        await self._call("unload_adapter", name)


class AsyncEngine(EngineClient):
    """An in-process LLMEngine driven by one background thread (``create_app(engine)``, tests, notebooks).

    Every engine call runs in that thread: commands run between two steps. Its records reach the event loop with
    one ``call_soon_threadsafe`` per step. ``submit`` runs any ``fn(engine)`` there (tests use it to look inside).
    """

    def __init__(self, engine):
        self.engine = engine
        self.core = ServingCore(engine)
        super().__init__(self.core.info(), engine.tokenizer)
        self.processor = engine.processor
        self._cv = threading.Condition()
        self._commands: list[tuple[Callable, concurrent.futures.Future | None]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._is_dead = False
        self._step_started: float | None = None  # monotonic start of the step in progress (watchdog)
        self.publish(adapters=True)
        self.core.on_registry_change = lambda: self.publish(adapters=True)  # before the load's caller wakes
        mgr = engine.lora_manager
        if mgr is not None:
            mgr.loader.add_listener(self._notify)  # a finished load wakes an idle loop to register it

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.is_running:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # set by the first generate()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    async def astart(self) -> None:
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and not self._is_dead

    def stuck_for(self) -> float | None:
        """Seconds the step in progress has run, once past ``max_step_seconds`` (else None); any thread."""
        started = self._step_started
        if started is None:
            return None
        elapsed = time.monotonic() - started
        return elapsed if elapsed > self.max_step_seconds else None

    def _notify(self) -> None:
        with self._cv:
            self._cv.notify()

    # ------------------------------------------------------------------ commands
    def submit(self, fn: Callable, want_result: bool = True) -> concurrent.futures.Future | None:
        """Run ``fn(engine)`` in the engine thread; thread-safe. Returns a future of its result."""
        fut = concurrent.futures.Future() if want_result else None
        with self._cv:
            if not self.is_running:
                if fut is not None:
                    fut.set_exception(EngineUnavailableError("The engine is not running"))
                return fut
            self._commands.append((fn, fut))
            self._cv.notify()
        self.engine.wake()  # an idle step waiting for adapter loads returns to run this
        return fut

    async def _call(self, kind: str, *args):
        self._loop = asyncio.get_running_loop()
        result = await asyncio.wrap_future(self.submit(lambda engine: getattr(self.core, kind)(*args)))
        if isinstance(result, concurrent.futures.Future):  # an adapter load: done in a later step
            await asyncio.wrap_future(result)
            return None
        return result

    def _send(self, kind: str, *args) -> None:
        self.submit(lambda engine: getattr(self.core, kind)(*args), want_result=False)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug in the loop itself: nothing may wait on a dead thread
            logger.critical("the engine loop died; every request now gets 503", exc_info=e)
            with self._cv:  # under the lock: a submit() racing this sees it and fails at once
                self._is_dead = True
            self._fail_everything(EngineUnavailableError(f"The engine loop died ({type(e).__name__})"))
            return
        self._shutdown()

    def _serve(self) -> None:
        core = self.core
        while True:
            with self._cv:
                while not self._commands and not self._stopping and not core.has_work():
                    self._cv.wait(timeout=1.0)
                commands, self._commands = self._commands, []
                stopping = self._stopping
            if commands:
                self._run_commands(commands)
            if stopping:
                break
            if core.has_work():
                self._step()

    def _run_commands(self, commands) -> None:
        for fn, fut in commands:
            if fut is not None and not fut.set_running_or_notify_cancel():
                continue
            try:
                result, error = fn(self.engine), None
            except BaseException as e:  # the caller's error, not the loop's
                result, error = None, e
            # Before the caller wakes: its next request must see the adapters this command changed.
            self.publish(adapters=True)
            if fut is None:
                if error is not None:
                    logger.warning("engine command failed: %s: %s", type(error).__name__, error)
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def _step(self) -> None:
        self._step_started = time.monotonic()
        try:
            records = self.core.step()
        finally:
            self._step_started = None
        if records:
            self._post(self._on_records, records)
        self.publish(adapters=self.core.adapters_changed())

    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is None:
            return  # no request was ever made: nobody waits for anything
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass

    def _fail_everything(self, error: BaseException) -> None:
        """Every request in flight and every queued command ends with ``error``."""
        self._post(self._fail_all, error)
        with self._cv:
            commands, self._commands = self._commands, []
        for _, fut in commands:
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(error)

    def _shutdown(self) -> None:
        try:
            self.engine.abort_request(list(self.engine.requests))
            while self.engine.has_unfinished_requests():
                self.engine.step()
        except Exception:
            logger.exception("draining the engine at shutdown failed")
        self._fail_everything(EngineUnavailableError("The server is shutting down"))

    def publish(self, adapters: bool = False) -> None:
        """Refresh the snapshots; only from the engine thread, or before it starts."""
        self._set_state(self.core.state(force_adapters=adapters))
