"""LoRA expand in Triton: out[t, slice s cols] += sum_j buf[s, t, j] * lora_b[page(slot(t), j), slice s cols].

lora_b is the pool's transposed B: one page (row) per rank row, contiguous along the output columns.

One program owns BLOCK_M tokens of one slot (grouped by LoRAKernelMeta) and BLOCK_N columns of the packed output.
The slices' column ranges come from the device tensor slice_offsets, so the n-blocks tile total_out and a block
that straddles a slice boundary takes one partial product per slice it touches, each with its own rows of buf
and its own columns of lora_b. Every output element is owned by exactly one program: a plain read-add-write,
no atomics. The grid comes from tensor shapes only (no host sync, CUDA-graph safe): enough m-programs for any
spread of tokens over slots, each mapped onto a (slot, m-block) pair on device, the spare ones exiting at once.
The rank loop stops at the slot's rank. A 4-D buf [num_splits, ...] holds split-K partial sums of the shrink;
they are added as they are loaded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import _triton_utils as tu
from loraplex.kernels._triton_utils import slot_block

__all__ = ["lora_expand_triton"]


# num_tokens (and the buffer's strides over it) change every step: no variant per value class (== 1, % 16),
# which would compile in the middle of serving.
@triton.jit(do_not_specialize=["num_tokens", "stride_up", "stride_us"])
def _lora_expand_kernel(
    buf_ptr, b_ptr, out_ptr, offsets_ptr, sorted_ids_ptr, counts_ptr, starts_ptr, ranks_ptr, pages_ptr,
    num_tokens, total_out,
    stride_up, stride_us, stride_ut, stride_ur,
    stride_bp, stride_bn,
    stride_ot, stride_on,
    stride_pl,
    MAX_RANK: tl.constexpr,  # constexpr: the interpreter (numpy >= 2.4) cannot take a runtime scalar in range()
    MAX_LORAS: tl.constexpr,
    MAX_LORAS_P: tl.constexpr,  # MAX_LORAS rounded up to a power of two
    NUM_SLICES: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_N_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    # fp32 math: fp32 lora_b, lora_b of another dtype than out (EngineArgs.lora_dtype: the activations keep fp32
    # rather than dropping to lora_b's), or the interpreter, whose bf16 arithmetic is wrong
    UPCAST: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    pid_n = pid_mn % NUM_N_BLOCKS
    slot, pid_m, count = slot_block(pid_mn // NUM_N_BLOCKS, counts_ptr, MAX_LORAS, MAX_LORAS_P, BLOCK_M)
    if slot >= MAX_LORAS:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), MAX_RANK)
    if rank == 0:  # an empty slot adds nothing
        return
    start = tl.load(starts_ptr + slot)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=m_ok, other=0)
    m_ok = m_ok & (tok < num_tokens)  # meta prepared for more tokens than buf has: ignore the extra rows
    tok = tok.to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # packed output columns
    offs_k = tl.arange(0, BLOCK_K)
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn  # [1, BLOCK_N]
    page_row = pages_ptr + slot.to(tl.int64) * stride_pl

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(NUM_SLICES):
        lo = tl.load(offsets_ptr + s)
        hi = tl.load(offsets_ptr + s + 1)
        if (n0 < hi) & (n0 + BLOCK_N > lo):
            col_ok = (offs_n >= lo) & (offs_n < hi)
            u_rows = buf_ptr + s * stride_us + tok[:, None] * stride_ut  # [BLOCK_M, 1]
            # Bounded by MAX_RANK with the rank test inside: the trip count stays static (the interpreter cannot
            # loop to a loaded value) and ranks below MAX_RANK skip the tail iterations.
            for k0 in range(0, MAX_RANK, BLOCK_K):
                if k0 < rank:
                    k = k0 + offs_k
                    k_ok = k < rank
                    u_mask = m_ok[:, None] & k_ok[None, :]
                    u = tl.load(u_rows + k[None, :] * stride_ur, mask=u_mask, other=0.0)  # [BLOCK_M, BLOCK_K] fp32
                    for p in tl.static_range(1, NUM_SPLITS):
                        u += tl.load(u_rows + p * stride_up + k[None, :] * stride_ur, mask=u_mask, other=0.0)
                    page = tl.load(page_row + k, mask=k_ok, other=0).to(tl.int64)  # [BLOCK_K]
                    b = tl.load(b_cols + page[:, None] * stride_bp, mask=k_ok[:, None] & col_ok[None, :],
                                other=0.0)  # [BLOCK_K, BLOCK_N]
                    if UPCAST:
                        b = b.to(tl.float32)
                    else:
                        # Tensor cores take one input dtype: the low-rank activations drop to lora_b's.
                        u = u.to(b.dtype)
                    acc += tl.dot(u, b, input_precision="ieee")

    out_ptrs = out_ptr + tok[:, None] * stride_ot + offs_n[None, :] * stride_on
    o_mask = m_ok[:, None] & (offs_n < total_out)[None, :]
    cur = tl.load(out_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def lora_expand_triton(buf: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta,
                       slice_offsets: torch.Tensor) -> None:
    """Triton expand; same contract as ``loraplex.kernels.lora_ops.lora_expand``. Never syncs with the host,
    so slice_offsets values are trusted: they must rise from 0 to total_out."""
    split_buf = tu.expand_operands("lora_expand_triton", buf, lora_b, out, meta, slice_offsets)
    if split_buf is None:
        return
    num_splits, num_slices, num_tokens, max_rank = split_buf.shape
    max_loras, total_out = meta.page_table.shape[0], lora_b.shape[1]
    interpret = tu.interpreting()
    cfg = tu.expand_config(num_tokens, total_out, max_rank, interpret)
    num_n_blocks = tu.cdiv(total_out, cfg.BLOCK_N)
    grid = (tu.num_m_programs(num_tokens, max_loras, cfg.BLOCK_M) * num_n_blocks,)
    _lora_expand_kernel[grid](
        split_buf, lora_b, out, slice_offsets, meta.sorted_token_ids, meta.num_tokens_per_lora, meta.lora_token_start,
        meta.lora_ranks, meta.page_table,
        num_tokens, total_out,
        *split_buf.stride(), *lora_b.stride(), *out.stride(), meta.page_table.stride(0),
        MAX_RANK=max_rank, MAX_LORAS=max_loras, MAX_LORAS_P=max(2, tu.next_power_of_2(max_loras)),
        NUM_SLICES=num_slices, NUM_SPLITS=num_splits, NUM_N_BLOCKS=num_n_blocks,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        UPCAST=interpret or lora_b.dtype == torch.float32 or lora_b.dtype != out.dtype,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
