"""Per-token LoRA expand for decode batches (Punica's BGMV layout): one program per (token, column block).

The grouped expand (lora_expand.py) gathers BLOCK_M tokens of one adapter so that tensor cores multiply them
together. A decode batch gives most adapters one or two tokens, so its programs run with 15 of 16 rows masked
and each moves only a few KB of B. Here each program takes one token, reads its slot from
LoRAKernelMeta.token_lora_indices, and does the rank-r dot products on CUDA cores in fp32 over a wide column
block. Tokens that share an adapter read its B again, from L2. Same contract and split-K buffer as the grouped
expand, so lora_ops dispatches between them by batch size alone (see _triton_utils.use_decode_expand).

A per-token shrink was measured too (benchmarks/results/h200-20261129-lora-decode-sweep.log) and lost to the
grouped shrink at every batch: the shrink reduces over in_dim, where tensor-core tiles and split-K already keep
enough bytes in flight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import _triton_utils as tu

__all__ = ["lora_expand_decode"]


# The buffer's strides over tokens change with the batch: no variant per value class (see lora_expand).
@triton.jit(do_not_specialize=["stride_up", "stride_us"])
def _expand_decode_kernel(
    buf_ptr, b_ptr, out_ptr, offsets_ptr, slots_ptr, ranks_ptr, pages_ptr, total_out,
    stride_up, stride_us, stride_ut, stride_ur,
    stride_bp, stride_bn,
    stride_ot, stride_on,
    stride_pl,
    NUM_SLICES: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MAX_RANK: tl.constexpr,
    MAX_LORAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Token-major program ids: the tokens of one column block run side by side and share its weights in L2.
    tok = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(slots_ptr + tok)
    if (slot < 0) | (slot >= MAX_LORAS):
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), MAX_RANK)
    if rank == 0:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < total_out
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    pages = tl.load(pages_ptr + slot.to(tl.int64) * stride_pl + offs_r, mask=r_ok, other=0).to(tl.int64)
    # One B tile serves every slice the block touches: the slices differ only in which low-rank row they take.
    b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + pages[None, :] * stride_bp,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(NUM_SLICES):
        lo = tl.load(offsets_ptr + s)
        hi = tl.load(offsets_ptr + s + 1)
        if (n0 < hi) & (n0 + BLOCK_N > lo):
            u_ptrs = buf_ptr + s * stride_us + tok * stride_ut + offs_r * stride_ur
            u = tl.load(u_ptrs, mask=r_ok, other=0.0)  # [BLOCK_R] fp32
            for p in tl.static_range(1, NUM_SPLITS):
                u += tl.load(u_ptrs + p * stride_up, mask=r_ok, other=0.0)
            acc += tl.where((offs_n >= lo) & (offs_n < hi), tl.sum(b * u[None, :], axis=1), 0.0)
    out_ptrs = out_ptr + tok * stride_ot + offs_n * stride_on
    cur = tl.load(out_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=n_ok)


def lora_expand_decode(buf: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta,
                       slice_offsets: torch.Tensor) -> None:
    """Per-token expand; same contract as ``loraplex.kernels.lora_ops.lora_expand``. Never syncs with the host,
    so slice_offsets values are trusted: they must rise from 0 to total_out."""
    split_buf = tu.expand_operands("lora_expand_decode", buf, lora_b, out, meta, slice_offsets)
    if split_buf is None:
        return
    num_splits, num_slices, num_tokens, max_rank = split_buf.shape
    max_loras, total_out = meta.page_table.shape[0], lora_b.shape[1]
    interpret = tu.interpreting()
    block_r = max(2, tu.next_power_of_2(max_rank))
    block_n = tu.decode_expand_block_n(num_tokens, total_out, block_r, interpret)
    _expand_decode_kernel[(num_tokens, tu.cdiv(total_out, block_n))](
        split_buf, lora_b, out, slice_offsets, meta.token_lora_indices, meta.lora_ranks, meta.page_table, total_out,
        *split_buf.stride(), *lora_b.stride(), *out.stride(), meta.page_table.stride(0),
        NUM_SLICES=num_slices, NUM_SPLITS=num_splits, MAX_RANK=max_rank, MAX_LORAS=max_loras,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=1 if interpret else 4,
    )
