"""Launch configurations shared by the LoRA shrink/expand Triton kernels.

Configs come only from host ints (tensor shapes), never from device values, so a launch never syncs and a CUDA
graph captured for one batch size replays with any adapter mix. Tests monkeypatch these functions to force
several m/n/k blocks on tiny shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

from loraplex import envs


@dataclass(frozen=True)
class LoRAConfig:
    BLOCK_M: int  # tokens of one slot per program
    BLOCK_N: int  # output columns per program (rank columns for shrink)
    BLOCK_K: int  # reduction step (in_dim for shrink, rank for expand)
    num_warps: int = 4
    num_stages: int = 2


def interpreting() -> bool:
    return envs.triton_interpret()


def _p2(n: int, lo: int = 16, hi: int | None = None) -> int:
    # tl.dot needs every block dim >= 16
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, hi)


def _block_m(num_tokens: int, interpret: bool) -> int:
    if interpret:
        # The interpreter pays per program and per op, not per element: few, large blocks.
        return _p2(num_tokens, hi=64)
    # Decode batches spread few tokens over each slot; prefill puts long runs of one adapter together.
    return 16 if num_tokens <= 256 else 64


def shrink_config(num_tokens: int, in_dim: int, max_rank: int, interpret: bool) -> LoRAConfig:
    block_m = _block_m(num_tokens, interpret)
    if interpret:
        return LoRAConfig(block_m, _p2(max_rank, hi=64), _p2(in_dim, hi=128), 1, 1)
    block_n = _p2(max_rank, hi=128)
    # Shrink is bandwidth bound on lora_a: long K steps keep enough bytes in flight per program.
    block_k = 256 if block_m == 16 and block_n <= 32 else (128 if block_n <= 64 else 64)
    return LoRAConfig(block_m, block_n, min(block_k, _p2(in_dim)), 4, 3)


def expand_config(num_tokens: int, total_out: int, max_rank: int, interpret: bool) -> LoRAConfig:
    block_m = _block_m(num_tokens, interpret)
    block_k = _p2(max_rank, hi=64)
    if interpret:
        return LoRAConfig(block_m, _p2(total_out, hi=128), block_k, 1, 1)
    block_n = 64 if block_m == 16 else 128
    return LoRAConfig(block_m, min(block_n, _p2(total_out)), block_k, 4, 2)
