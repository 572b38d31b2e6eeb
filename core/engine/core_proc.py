"""The engine-core process: one LLMEngine in a busy loop of its own (commands, step, outputs), for the server.

Started by ``loraplex.server.engine_proc.ProcEngineClient.spawn`` with the spawn method. It builds the engine,
preloads --lora-modules, then answers on ZMQ: every API server (front end) PUSHes commands into the core's PULL
socket, and the core PUSHes each front end's step records, state and replies to the PULL socket that front end
bound (its address comes in its ``hello``). Messages are msgpack (``loraplex.engine.wire``).

The loop: take every waiting command, run one step when there is work, send its records to their front ends,
then answer the adapter loads that finished, after the state that shows them. With nothing to do it waits on
the command socket (100 ms at most, so it sends a heartbeat state every ``STATE_INTERVAL_S``: a front end that
hears nothing for ``max_step_seconds`` calls the engine stuck). A pipe from the process that started it is the
lifeline: when that process dies the pipe closes and the core aborts everything and exits.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

from loraplex.engine.wire import error_to_wire, lora_from_wire, mm_from_wire, pack, params_from_wire, unpack

logger = logging.getLogger("loraplex.engine")

STATE_INTERVAL_S = 0.25  # at most this long between two state messages (queue gauges, heartbeat)
IDLE_POLL_MS = 100
IDLE_STEP_WAIT_S = 0.005


def main(args, lora_modules: list, address: str, conn, progress: bool, log_level: int = logging.INFO,
         client_lifelines: list = ()) -> None:
    """Process entry point: build, preload, say ready (or why not) on ``conn``, serve until told or orphaned.
    ``client_lifelines``: pipe ends held open for the API servers of --api-server-count, which read EOF on theirs
    when this process dies."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Ctrl-C reaches the whole process group: the API server stops this process in order (shutdown, lifeline).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.serving_core import ServingCore

    stage = "model"
    try:
        core = ServingCore(LLMEngine.from_engine_args(args, progress=progress))
        stage = "lora_modules"
        for name, path, base in lora_modules:
            core.preload(name, path, base)
    except BaseException as e:
        # The starting process prints the one-line reason; the traceback is for --uvicorn-log-level debug.
        logger.debug("the engine process could not start (%s)", stage, exc_info=e)
        conn.send(("error", stage, [type(e).__name__, str(e), {}] if stage == "model" else error_to_wire(e)))
        return
    import zmq

    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.setsockopt(zmq.RCVHWM, 0)
    commands.bind(address)
    conn.send(("ok", core.info(), core.state(force_adapters=True)))
    try:
        CoreLoop(core, ctx, commands, conn).run()
    finally:
        ctx.destroy(linger=1000)
        for end in client_lifelines:
            end.close()


# The commands a front end may send (ServingCore methods), each with how its msgpack arguments are decoded.
_DECODE = {
    "add": lambda requests: ([(rid, ids, params_from_wire(p), lora, mm_from_wire(mm), salt)
                              for rid, ids, p, lora, mm, salt in requests],),
    "abort": lambda ids: (ids,),
    "stop_samples": lambda samples: (samples,),
    "load_adapter": lambda *args: args,
    "add_resolved": lambda req: (lora_from_wire(req),),
    "unload_adapter": lambda name: (name,),
}


class CoreLoop:
    def __init__(self, core, ctx, commands, lifeline):
        self.core = core
        self.ctx = ctx
        self.commands = commands
        self.lifeline = lifeline
        self.clients: dict[str, object] = {}  # front end address -> PUSH socket to it
        self.owner: dict[str, str] = {}  # request id -> its front end
        self.done: list = []  # (client, call id, future) of adapter loads that completed
        self.is_stopping = False
        self._state_due = 0.0
        self._is_adapters_dirty = False
        core.on_registry_change = self._registry_changed
        # A command that arrives while the engine waits for adapter loads is read within 5 ms, not 50.
        core.engine.max_idle_wait_s = IDLE_STEP_WAIT_S

    def _registry_changed(self) -> None:
        self._is_adapters_dirty = True

    def run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.commands, zmq.POLLIN)
        poller.register(self.lifeline.fileno(), zmq.POLLIN)
        while not self.is_stopping:
            busy = self.core.has_work()
            events = dict(poller.poll(0 if busy else IDLE_POLL_MS))
            if self.lifeline.fileno() in events and self._lifeline_closed():
                logger.warning("the process that started the engine is gone: stopping")
                break
            self._take_commands()
            if self.core.has_work() and not self.is_stopping:
                self._route(self.core.step())
            self._answer_loads()
            if time.monotonic() >= self._state_due or self._is_adapters_dirty:
                self._broadcast_state()
        self._shutdown()

    def _lifeline_closed(self) -> bool:
        try:
            self.lifeline.recv()  # nothing is ever sent on it: readable means closed
        except (EOFError, OSError):
            return True
        return False

    # ------------------------------------------------------------------ commands
    def _take_commands(self) -> None:
        import zmq

        while True:
            try:
                data = self.commands.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = unpack(data)
            try:
                self._handle(message)
            except Exception:  # a malformed message must not take the engine down
                logger.exception("engine command %r failed", message[:1])

    def _handle(self, message: list) -> None:
        kind, client, call_id, *args = message
        core = self.core
        if kind == "hello":
            self._connect(client)
            self._send(client, ["state", core.state(force_adapters=True)])
            return
        if kind == "shutdown":
            self.is_stopping = True
            return
        try:
            if kind not in _DECODE:
                raise ValueError(f"unknown engine command {kind!r}")
            args = _DECODE[kind](*args)
            if kind == "add":
                for rid, *_ in args[0]:
                    self.owner[rid] = client
            try:
                result = getattr(core, kind)(*args)
            except BaseException:
                if kind == "add":
                    for rid, *_ in args[0]:
                        self.owner.pop(rid, None)
                raise
        except Exception as e:
            if call_id is not None:
                self._send(client, ["reply", call_id, False, error_to_wire(e)])
            else:
                logger.warning("engine command %s failed: %s: %s", kind, type(e).__name__, e)
            return
        if hasattr(result, "add_done_callback"):  # an adapter load: answered when it completes
            result.add_done_callback(lambda f, c=client, i=call_id: self.done.append((c, i, f)))
        elif call_id is not None:
            # Commands that change adapters show the change in the state sent before the answer.
            if kind == "unload_adapter":
                self._broadcast_state()
            self._send(client, ["reply", call_id, True, None])

    def _answer_loads(self) -> None:
        if not self.done:
            return
        done, self.done = self.done, []
        self._broadcast_state()  # first: whoever awaited a load sees the name registered
        for client, call_id, future in done:
            error = future.exception()
            self._send(client, ["reply", call_id, error is None, error_to_wire(error) if error else None])

    # ------------------------------------------------------------------ outputs
    def _connect(self, client: str) -> None:
        import zmq

        if client not in self.clients:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(client)
            self.clients[client] = sock

    def _send(self, client: str, message) -> None:
        sock = self.clients.get(client)
        if sock is not None:
            sock.send(pack(message), copy=False)

    def _route(self, records: list) -> None:
        if not records:
            return
        per_client: dict[str, list] = {}
        if any(record[1] for record in records):
            # Before the outputs: a client that sees its request end then reads gauges that include its end.
            self._broadcast_state()
        for record in records:
            client = self.owner.get(record[0])
            if client is None:
                continue
            if record[1]:  # finished
                del self.owner[record[0]]
            per_client.setdefault(client, []).append(record)
        for client, batch in per_client.items():
            self._send(client, ["out", batch])

    def _broadcast_state(self) -> None:
        self._is_adapters_dirty = False
        self._state_due = time.monotonic() + STATE_INTERVAL_S
        state = pack(["state", self.core.state()])
        for sock in self.clients.values():
            sock.send(state, copy=False)

    def _shutdown(self) -> None:
        engine = self.core.engine
        try:
            engine.abort_request(list(engine.requests))
            deadline = time.monotonic() + 10
            while engine.has_unfinished_requests() and time.monotonic() < deadline:
                self._route(self.core.step())
        except Exception:
            logger.exception("draining the engine at shutdown failed")
        if engine.lora_manager is not None:
            try:
                engine.lora_manager.close()  # loader processes and threads
            except Exception:
                logger.exception("closing the adapter loaders failed")
        logger.info("engine process %d stopped", os.getpid())
