"""Launch configurations shared by the LoRA shrink/expand Triton kernels.

Configs come only from host ints (tensor shapes), never from device values, so a launch never syncs and a CUDA
graph captured for one batch size replays with any adapter mix. Tests monkeypatch these functions to force
several m/n/k blocks on tiny shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from loraplex import envs


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division. triton.cdiv and triton.next_power_of_2 are constexpr_functions that cost about ten
    Python calls each, and an eager prefill step makes a few thousand of these calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side, same values as triton.next_power_of_2 (0 for 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class LoRAConfig:
    BLOCK_M: int  # tokens of one slot per program
    BLOCK_N: int  # output columns per program (rank columns for shrink)
    BLOCK_K: int  # reduction step (in_dim for shrink, rank for expand)
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def slot_block(pid_m, counts_ptr, MAX_LORAS: tl.constexpr, MAX_LORAS_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """(slot, m-block within the slot, slot's token count) of flat m-block ``pid_m``.

    The m-blocks of all slots are laid end to end, slot after slot, so the grid needs only
    cdiv(num_tokens, BLOCK_M) + max_loras m-programs (see num_m_programs) however the tokens are spread, instead
    of cdiv(num_tokens, BLOCK_M) per slot. slot >= MAX_LORAS means pid_m lies past the last block: no work.
    """
    lanes = tl.arange(0, MAX_LORAS_P)
    counts = tl.load(counts_ptr + lanes, mask=lanes < MAX_LORAS, other=0)  # [MAX_LORAS_P]
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, axis=0)  # inclusive: m-blocks up to and including each slot
    slot = tl.sum((ends <= pid_m).to(tl.int32))
    first = tl.sum(tl.where(lanes < slot, blocks, 0))
    count = tl.sum(tl.where(lanes == slot, counts, 0))
    return slot, pid_m - first, count


def num_m_programs(num_tokens: int, max_loras: int, block_m: int) -> int:
    # Each slot with tokens wastes at most one partial block, and at most min(max_loras, num_tokens) slots
    # have tokens: an upper bound on sum(cdiv(count, block_m)) known without reading the counts.
    return cdiv(num_tokens, block_m) + min(max_loras, num_tokens)


def expand_operands(op: str, buf, lora_b, out, meta, slice_offsets):
    """Checks shared by both expand launchers; buf as [num_splits, num_slices, num_tokens, max_rank], or None
    when there is nothing to add."""
    from loraplex.kernels.lora_ops import check_expand_args

    check_expand_args(buf, lora_b, out, meta, slice_offsets)
    split_buf = buf if buf.dim() == 4 else buf.unsqueeze(0)
    if 0 in split_buf.shape[1:] or lora_b.shape[1] == 0:
        return None
    if not buf.is_cuda and not interpreting():
        raise ValueError(f"{op}: needs CUDA tensors (or TRITON_INTERPRET=1), got {buf.device}")
    return split_buf


def interpreting() -> bool:
    return envs.triton_interpret()


def _p2(n: int, lo: int = 16, hi: int | None = None) -> int:
    # tl.dot needs every block dim >= 16
    p = max(lo, next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, hi)


def _block_m(num_tokens: int, interpret: bool) -> int:
    if interpret:
        # The interpreter pays per program and per op, not per element: few, large blocks.
        return _p2(num_tokens, hi=64)
    # Decode batches spread few tokens over each slot; prefill puts long runs of one adapter together.
    return 16 if num_tokens <= 256 else 64


def shrink_config(num_tokens: int, in_dim: int, max_rank: int, interpret: bool, elem_size: int = 2) -> LoRAConfig:
    block_m = _block_m(num_tokens, interpret)
    if interpret:
        return LoRAConfig(block_m, _p2(max_rank, hi=64), _p2(in_dim, hi=128), 1, 1)
    block_n = _p2(max_rank, hi=128)
    # Decode shrink has one program per (slot, slice) walking all of in_dim: long, deeply pipelined K steps keep
    # enough bytes in flight (H200, 32 adapters of rank 16, 256 tokens: 8.6 -> 7.3 us). 16-bit inputs only, or
    # the stages overflow shared memory.
    if block_m == 16 and block_n <= 32 and elem_size <= 2:
        return LoRAConfig(block_m, block_n, min(512, _p2(in_dim)), 4, 4)
    block_k = 256 if block_m == 16 and block_n <= 32 else (128 if block_n <= 64 else 64)
    return LoRAConfig(block_m, block_n, min(block_k, _p2(in_dim)), 4, 3)


def shrink_splits(num_tokens: int, in_dim: int) -> int:
    """Split-K factor of the shrink: decode batches split in_dim into ~K_PER_SPLIT chunks; prefill has enough
    m-blocks already."""
    if num_tokens > 256:
        return 1
    return max(1, in_dim // envs.lora_shrink_k_per_split())


def expand_config(num_tokens: int, total_out: int, max_rank: int, interpret: bool) -> LoRAConfig:
    block_m = _block_m(num_tokens, interpret)
    block_k = _p2(max_rank, hi=64)
    if interpret:
        return LoRAConfig(block_m, _p2(total_out, hi=128), block_k, 1, 1)
    # Measured on H200 (bf16, rank 16): 128 columns beat 64 for decode, 256 only for very wide outputs.
    block_n = 128
    return LoRAConfig(block_m, min(block_n, _p2(total_out)), block_k, 4, 2)


def use_decode_expand(num_tokens: int, interpret: bool) -> bool:
    """The per-token expand (lora_expand_decode.py) for small batches; the grouped expand's tensor-core tiles pay
    off once several tokens share each adapter (H200: 64 tokens on one adapter, 39 vs 53 us per layer). The
    interpreter runs the grouped one; tests patch this to force either."""
    return not interpret and num_tokens <= envs.lora_decode_max_tokens()


def decode_expand_block_n(num_tokens: int, total_out: int, block_r: int, interpret: bool) -> int:
    # H200, rank 16 (benchmarks/results/*-lora-decode-sweep.log): up to 8 tokens, 128 columns per program keep
    # enough programs in flight (1 token: 23.8 vs 26.4 us per layer for 512); from 32 tokens 512 columns win
    # (32 tokens on 32 adapters: 50.6 vs 54.4). The [BLOCK_N, BLOCK_R] fp32 tile stays 2K or 8K elements.
    if interpret:
        hi = 128
    else:
        hi = max(16, (2048 if num_tokens <= 8 else 8192) // block_r)
    return min(hi, max(16, next_power_of_2(total_out)))
