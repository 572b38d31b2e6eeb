"""Tensor parallelism: an engine's ranks and the one collective the model needs.

Each rank holds 1 / world of every attention head group and MLP column block (ModelConfig.shard): q/k/v and
gate/up are split by output (column-parallel), o_proj and down_proj by input (row-parallel), whose partial outputs
are summed over the ranks (``all_reduce``). The embedding and the LM head are split by vocabulary row (padded to a
multiple of the ranks): a token's embedding comes from the rank that holds its row (``all_reduce`` of the masked
lookups), the logits are the ranks' blocks side by side (``all_gather``), so every rank ends a step with the same
logits and samples the same tokens. Norms are replicated.

Every rank runs the same engine on the same requests, so every rank schedules the same batches and their
collectives line up. The ranks are either started by the engine (loraplex.engine.tp_ranks: rank 0 is the caller's
engine and sends its calls to the others) or torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), each running the caller's script, as vLLM's external_launcher. gloo on the CPU, NCCL on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex import envs
from loraplex.errors import ConfigError


@dataclass(frozen=True)
class TensorParallel:
    """:param rank: this process's rank. :param world_size: ranks in the group (1: no tensor parallelism)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x side by side along the last dim (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def vocab_shard(self, vocab_size: int) -> tuple[int, int]:
        """(first row, rows) of this rank's share of a vocabulary padded to a multiple of the ranks."""
        rows = -(-vocab_size // self.world_size)
        return self.rank * rows, rows

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (sizes all ranks must agree on, such as the KV cache's blocks)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def init_tensor_parallel(world_size: int, device_type: str, spawned: tuple[int, int, str] | None = None):
    """Join the process group of ``world_size`` ranks (once per process). ``spawned``: (rank, world size, init
    method) of ranks the engine started itself (loraplex.engine.tp_ranks); otherwise torchrun's variables say.
    Returns (TensorParallel, local rank, the gloo group for control messages)."""
    if world_size == 1:
        return TensorParallel(), 0, None
    if spawned is not None:
        rank, world, init_method = spawned
        local_rank = rank  # one host
    else:
        found = envs.torch_distributed_env()
        if found is None or found[1] != world_size:
            raise ConfigError(f"EngineArgs.tensor_parallel_size {world_size}: WORLD_SIZE is {found[1]}, a "
                              "torchrun-style launch of another size", "tensor_parallel_size")
        rank, world, local_rank = found
        init_method = "env://"
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != world_size:
            raise ConfigError(f"EngineArgs.tensor_parallel_size {world_size}: this process already belongs to a "
                              f"group of {torch.distributed.get_world_size()} ranks", "tensor_parallel_size")
    else:
        from loraplex.engine.tp_ranks import COLLECTIVE_TIMEOUT

        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init_method,
                                             rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    # Control messages (pickled calls) go over gloo even when the model's collectives use NCCL.
    control = torch.distributed.new_group(backend="gloo") if device_type == "cuda" else None
    return TensorParallel(rank, world_size), local_rank, control
