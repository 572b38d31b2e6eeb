"""Tensor parallelism: an engine's ranks and the one collective the model needs.

Each rank holds 1 / world of every attention head group and MLP column block (ModelConfig.shard): q/k/v and
gate/up are split by output (column-parallel), o_proj and down_proj by input (row-parallel), whose partial outputs
are summed over the ranks (``all_reduce``); embeddings, norms and the LM head are replicated, so every rank ends
a step with the same logits and samples the same tokens.

The ranks are started torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and run the same
engine on the same requests, as vLLM's external_launcher: every rank schedules the same batches, so their
collectives line up. gloo on the CPU, NCCL on CUDA.
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


def init_tensor_parallel(world_size: int, device_type: str) -> tuple[TensorParallel, int]:
    """Join the process group of ``world_size`` ranks (once per process); returns (group, local rank)."""
    if world_size == 1:
        return TensorParallel(), 0
    found = envs.torch_distributed_env()
    if found is None or found[1] != world_size:
        raise ConfigError(f"EngineArgs.tensor_parallel_size {world_size} needs its ranks started torchrun-style "
                          f"(torchrun --nproc-per-node {world_size} ..., or RANK / WORLD_SIZE / MASTER_ADDR / "
                          "MASTER_PORT set per process): the engine does not start its own rank processes yet"
                          + ("" if found is None else f"; WORLD_SIZE is {found[1]}"), "tensor_parallel_size")
    rank, _, local_rank = found
    if not torch.distributed.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank,
                                             world_size=world_size)
    return TensorParallel(rank, world_size), local_rank
