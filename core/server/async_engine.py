"""AsyncEngine: the (not thread-safe) LLMEngine driven by one background thread, used from asyncio.

Every engine call (add_request, abort, add_lora, remove_lora, step, tokenizer use) runs in that
thread: callers submit commands, which run between two steps. So a command never races a step, and
an HTTP handler never blocks the event loop on the engine. Outputs travel back per step with one
``call_soon_threadsafe`` per event loop, into the asyncio queue of the ``RequestGroup`` that the
request belongs to. Streams ask DELTA outputs (O(new tokens) per step) and a stream whose client stops
reading is aborted once ``MAX_UNDELIVERED_TOKENS`` wait in its queue.

The thread also publishes ``state`` (queue lengths, adapter cache counters, the loaded adapters),
a snapshot replaced as a whole, so metrics and /v1/models read it without touching the engine.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import uuid
from collections import defaultdict
from typing import Callable

from loraplex.errors import EngineStepError
from loraplex.server.errors import APIError, EngineUnavailableError

logger = logging.getLogger("loraplex.server")

# After this many consecutive failed steps the engine is reported unhealthy.
MAX_STEP_FAILURES = 3

# A stream's outputs (DELTA: O(new tokens) each) wait in its group's queue until the response takes them. Past
# this many generated tokens waiting there, in outputs of unfinished requests, the client is taken as not
# reading: the group's requests are aborted (KV blocks and adapter slots freed), what waited is dropped, and the
# stream ends with a 408 error event. The response takes every waiting output each event-loop turn whenever
# the client's socket accepts data, so a client that reads stays far below; with logprobs=20 the bound keeps
# about 40 MB per stream at most (a request of fewer tokens holds at most its own output). A request of many
# sequences (prompts x n) may fall MIN_UNDELIVERED_STEPS steps behind all the same. docs/server.md.
MAX_UNDELIVERED_TOKENS = 8192
MIN_UNDELIVERED_STEPS = 128


class RequestGroup:
    """The engine requests one HTTP request made (one per prompt); iterate it for their outputs."""

    def __init__(self, aengine: "AsyncEngine", loop: asyncio.AbstractEventLoop):
        self._aengine = aengine
        self.loop = loop
        self.ids: list[str] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.final: dict[str, object] = {}
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._closed = False
        self.num_seqs = 1  # sequences of the group (prompts x n), set by the server: they scale the bound
        self._undelivered = 0  # generated tokens waiting in the queue, in unfinished outputs
        self._overflowed = False

    @property
    def max_undelivered(self) -> int:
        return max(MAX_UNDELIVERED_TOKENS, MIN_UNDELIVERED_STEPS * self.num_seqs)

    def _feed(self, item) -> None:
        if self._overflowed:
            return  # aborted for a client that stopped reading: nothing more is kept for it
        if item is not None and not isinstance(item, BaseException):
            if self.first_token_at is None:
                first = (getattr(item, "metrics", None) or {}).get("first_token_time")
                if first is not None:  # the engine's clock: FINAL_ONLY outputs show no tokens before the end
                    self.first_token_at = first
                elif any(o.token_ids for o in item.outputs):
                    self.first_token_at = time.monotonic()
            if not item.finished:
                if not item.outputs:
                    return  # a FINAL_ONLY request's progress: nothing to deliver
                self._undelivered += sum(len(o.token_ids) for o in item.outputs)
                if self._undelivered > self.max_undelivered:
                    self._overflow()
                    return
        self.queue.put_nowait(item)

    def _overflow(self) -> None:
        """The client stopped reading: free what waits for it and what the engine holds for it."""
        self._overflowed = True
        dropped = self.queue.qsize()
        while not self.queue.empty():
            self.queue.get_nowait()
        self._undelivered = 0
        logger.warning("a stream's client stopped reading: %d outputs waited undelivered; request(s) %s aborted",
                       dropped, ", ".join(self.ids))
        self.queue.put_nowait(APIError(
            408, f"The client stopped reading the stream: more than {self.max_undelivered} generated tokens "
                 "waited undelivered, so the request was aborted"))
        self.abort()

    @property
    def done(self) -> bool:
        return len(self.final) == len(self.ids)

    async def __aiter__(self):
        while not self.done:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                # The rest of the group cannot be answered any more: stop it (a no-op after a failed step).
                pending = [rid for rid in self.ids if rid not in self.final]
                if pending and not self._closed:
                    self._aengine.abort(pending)
                self._closed = True
                raise item
            if not item.finished:
                self._undelivered -= sum(len(o.token_ids) for o in item.outputs)
            if item.finished:
                self.final[item.request_id] = item
                if self.done:
                    self.finished_at = time.monotonic()
            yield item

    async def collect(self) -> list:
        """Final outputs, one per prompt, in prompt order (whole ones for FINAL_ONLY or CUMULATIVE requests)."""
        async for _ in self:
            pass
        return [self.final[rid] for rid in self.ids]

    def abort(self) -> None:
        """Abort what is still running (a client went away); idempotent and safe from any state."""
        if self._closed:
            return
        self._closed = True
        pending = [rid for rid in self.ids if rid not in self.final]
        if pending:
            self._aengine.abort(pending)


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._commands: list[tuple[Callable, concurrent.futures.Future | None]] = []
        self._routes: dict[str, RequestGroup] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._step_failures = 0
        self._is_dead = False
        self._step_started: float | None = None  # monotonic start of the step in progress (watchdog)
        self.max_step_seconds = 60.0
        self._prefix = uuid.uuid4().hex[:8]
        self._counter = itertools.count()
        self.state: dict = {}
        self.adapters: dict[str, object] = {}  # name -> LoRARequest of the current version
        self._adapters_epoch = None
        self.publish(adapters=True)
        mgr = getattr(engine, "lora_manager", None)
        if mgr is not None:
            mgr.loader.add_listener(self._notify)  # a finished load wakes an idle loop to register it
            # A load that registers a name publishes it before its caller hears back, so the caller's next
            # request finds it.
            mgr.on_registry_change = lambda: self.publish(adapters=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.is_running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and not self._is_dead

    @property
    def is_healthy(self) -> bool:
        return self.is_running and self._step_failures < MAX_STEP_FAILURES and self.stuck_for() is None

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

    async def call(self, fn: Callable):
        """Await ``fn(engine)`` run in the engine thread."""
        return await asyncio.wrap_future(self.submit(fn))

    def abort(self, request_ids: list[str]) -> None:
        self.submit(lambda engine: engine.abort_request(list(request_ids)), want_result=False)

    async def generate(self, build: Callable) -> RequestGroup:
        """Add requests built in the engine thread by ``build(engine) -> [(prompt, params, lora), ...]``.

        All or nothing: if one request is refused (prompt too long...), those already added are
        aborted and the error is raised here.
        """
        group = RequestGroup(self, asyncio.get_running_loop())
        base = f"{self._prefix}-{next(self._counter)}"

        def add(engine):
            requests = build(engine)
            ids = [f"{base}-{i}" for i in range(len(requests))]
            try:
                for rid, (prompt, params, lora) in zip(ids, requests):
                    engine.add_request(rid, prompt, params, lora_request=lora)
                    self._routes[rid] = group
            except BaseException:
                added = [rid for rid in ids if self._routes.pop(rid, None) is not None]
                engine.abort_request(added)
                raise
            group.ids = ids
            if group._closed:  # the caller left while this command waited its turn
                engine.abort_request(ids)

        try:
            await self.call(add)
        except asyncio.CancelledError:
            group.abort()
            raise
        return group

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug in the loop itself: nothing may wait on a dead thread
            logger.critical("the engine loop died; every request now gets 503", exc_info=e)
            with self._cv:  # under the lock: a submit() racing this sees it and fails at once
                self._is_dead = True
            self._fail_all(EngineUnavailableError(f"The engine loop died ({type(e).__name__})"))
            return
        self._shutdown()

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._commands and not self._stopping and not engine.has_unfinished_requests() \
                        and not engine.has_pending_loras():
                    self._cv.wait(timeout=1.0)
                commands, self._commands = self._commands, []
                stopping = self._stopping
            if commands:
                self._run_commands(commands)
            if stopping:
                break
            if engine.has_unfinished_requests() or engine.has_pending_loras():
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
            outputs = self.engine.step()
        except Exception as e:
            self._step_failed(e)
            return
        finally:
            self._step_started = None
        self._step_failures = 0
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for out in outputs:
            group = self._routes.get(out.request_id)
            if group is None:
                continue  # aborted by a client that left, or refused while being added
            if out.finished:
                del self._routes[out.request_id]
            # A request that could not run (its adapter failed to load) fails alone, with its typed error.
            batches[group.loop].append((group, out.error if out.error is not None else out))
        for loop, items in batches.items():
            _deliver(loop, items)
        mgr = getattr(self.engine, "lora_manager", None)
        self.publish(adapters=mgr is not None and mgr.registry.epoch != self._adapters_epoch)

    def _step_failed(self, error: Exception) -> None:
        """A step failed outside any request's work (a failed batch ends only its own requests inside
        ``engine.step``): retry; only when it keeps failing do the requests in flight end, with a 500."""
        self._step_failures += 1
        logger.error("engine step failed (%d in a row)", self._step_failures, exc_info=error)
        if self._step_failures >= MAX_STEP_FAILURES:
            failure = EngineStepError(f"The engine failed {self._step_failures} steps in a row "
                                      f"({type(error).__name__}); see the server log")
            failure.__cause__ = error
            routes, self._routes = self._routes, {}
            try:
                self.engine.abort_request(list(routes))
            except Exception:
                logger.exception("aborting after a failed step failed too")
            self._fail_groups(set(routes.values()), failure)
        time.sleep(min(0.05 * self._step_failures, 1.0))  # no hot loop if the engine stays broken

    @staticmethod
    def _fail_groups(groups, error: BaseException) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for group in groups:
            batches[group.loop].append((group, error))
        for loop, items in batches.items():
            _deliver(loop, items)

    def _fail_all(self, error: BaseException) -> None:
        """Every request in flight and every queued command ends with ``error``."""
        routes, self._routes = self._routes, {}
        self._fail_groups(set(routes.values()), error)
        with self._cv:
            commands, self._commands = self._commands, []
        for _, fut in commands:
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(error)

    def _shutdown(self) -> None:
        if self._routes:
            try:
                self.engine.abort_request(list(self._routes))
                while self.engine.has_unfinished_requests():
                    self.engine.step()
            except Exception:
                logger.exception("draining the engine at shutdown failed")
        self._fail_all(EngineUnavailableError("The server is shutting down"))

    def publish(self, adapters: bool = False) -> None:
        """Refresh the snapshots; only from the engine thread, or before it starts."""
        engine = self.engine
        mgr = getattr(engine, "lora_manager", None)
        if adapters:
            self.adapters = {} if mgr is None else {name: m.request for name, m in mgr.adapters.items()}
            self._adapters_epoch = None if mgr is None else mgr.registry.epoch
        self.state = {
            "num_running": engine.scheduler.num_running,
            "num_waiting": engine.scheduler.num_waiting,
            "num_gpu_loras": mgr.num_gpu_loras if mgr is not None else 0,
            "num_cpu_loras": mgr.num_cpu_loras if mgr is not None else 0,
            "num_loras": len(self.adapters),
            "lora_stats": dict(mgr.stats) if mgr is not None else {},
            "engine_stats": dict(engine.stats),
        }


def _deliver(loop: asyncio.AbstractEventLoop, items: list) -> None:
    def feed():
        for group, item in items:
            group._feed(item)

    try:
        loop.call_soon_threadsafe(feed)
    except RuntimeError:  # that event loop is closed: nobody is waiting any more
        pass
