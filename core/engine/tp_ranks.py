"""The ranks of a tensor-parallel engine that the engine starts itself (no torchrun).

``LLMEngine(tensor_parallel_size=N)`` in a process that is not one of N torchrun ranks becomes rank 0 and starts
ranks 1..N-1 as processes of its own (``torch.multiprocessing``, spawn). Each rank builds the same engine over its
shard of the model (loraplex.distributed). Rank 0 is the one its caller (the offline LLM) talks to; every call that
changes the engine's state (add_request, abort_request, stop_sample, the adapter calls, step) is recorded there
once it has succeeded and sent to the other ranks before the next step, which replay it in order on their own
engines. The ranks therefore hold the same requests and adapters and schedule the same batches; only rank 0's
outputs are returned. Commands (a few per step) are what cross the processes, not the step's tensors.

A rank that exits is seen before the next step: rank 0 raises EngineDeadError naming it, and every later step
does the same, instead of waiting in a collective for a peer that is gone.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing
import socket

import torch

from loraplex.errors import EngineDeadError

logger = logging.getLogger("loraplex.engine")

# How long a collective waits for a peer before it fails, rather than hanging for torch's default 30 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankProcesses:
    """Rank 0's handle on the ranks it started. :param world_size: ranks in all, this process included."""

    def __init__(self, args, world_size: int):
        self.world_size = world_size
        self.port = _free_port()
        self.group = None  # the gloo group of the control messages (None: the default group, gloo on the CPU)
        self.is_ready = False  # every rank built its engine: they wait for commands
        self._commands: list[tuple] = []
        self.dead: str | None = None
        ctx = multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_rank_main, args=(rank, world_size, self.port, args), daemon=True,
                                  name=f"loraplex-rank-{rank}") for rank in range(1, world_size)]
        for p in self.procs:
            p.start()

    @property
    def init_method(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def record(self, name: str, *args, **kwargs) -> None:
        """A call that changed rank 0's engine, for the other ranks to replay before the next step."""
        self._commands.append((name, args, kwargs))

    def send_step(self) -> None:
        """The recorded calls and one step, to every other rank (they run it beside this one)."""
        self.check_alive()
        commands, self._commands = self._commands + [("step", (), {})], []
        _broadcast(commands, self.group)

    def check_alive(self) -> None:
        if self.dead is None:
            gone = [p for p in self.procs if not p.is_alive()]
            if gone:
                self.dead = f"rank {self.procs.index(gone[0]) + 1} exited (exit code {gone[0].exitcode})"
                logger.error("tensor-parallel engine: %s", self.dead)
        if self.dead is not None:
            raise EngineDeadError(f"the tensor-parallel engine is down: {self.dead}")

    def shutdown(self) -> None:
        # Ranks that never got ready (this engine failed to build, and so do they) are not waiting for a message.
        if self.is_ready and self.dead is None and all(p.is_alive() for p in self.procs):
            try:
                _broadcast([("exit", (), {})], self.group)
            except Exception:  # the group is already broken: the ranks are stopped below either way
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a later engine in this process starts a group of its own


def _broadcast(commands: list | None, group) -> list:
    box = [commands]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _rank_main(rank: int, world_size: int, port: int, args) -> None:
    """A rank other than 0: build the same engine, then replay rank 0's calls until it says exit."""
    from loraplex.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(args, _rank=(rank, world_size, f"tcp://127.0.0.1:{port}"))
    except BaseException as e:  # rank 0 builds the same engine and reports why; one message is enough
        logger.debug("rank %d could not build its engine", rank, exc_info=e)
        return
    group = engine.tp_control_group
    while True:
        for name, call_args, kwargs in _broadcast(None, group):
            if name == "exit":
                return
            # Rank 0 ran the same call and it succeeded there; an error here would mean the ranks diverged.
            getattr(engine, name)(*call_args, **kwargs)
