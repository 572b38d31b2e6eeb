"""LoRA shrink in Triton: out[s, t, j] = scale * x[t] . lora_a[s, page(slot(t), j)], all slices in one launch.

Tokens come grouped by adapter slot (LoRAKernelMeta.sorted_token_ids), so one program multiplies BLOCK_M rows
that share one adapter by one BLOCK_N-wide block of that adapter's rank rows, each rank row gathered from its
page of the pool (LoRAKernelMeta.page_table) and contiguous along in_dim. The grid is
(m-programs * n-blocks, slices) from tensor shapes only, with enough m-programs for any spread of tokens over
slots; each maps its id onto a (slot, m-block) pair from the per-slot counts on device, and the spare ones exit
at once. No host sync, so the launch is CUDA-graph safe. Rank rows past the slot's rank are neither loaded nor
multiplied, and are stored as zeros.

Split-K: ``out`` may carry a leading split dimension [num_splits, ...]. Split p then reduces only its share of
in_dim and stores a partial sum in out[p]; the expand kernel adds the partials as it loads them. Decode batches
give each (slot, slice) one long reduction over in_dim, too little parallel work for the chip: splits turn a few
dozen latency-bound programs into hundreds of short ones, without atomics or a zeroing pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import _triton_utils as tu
from loraplex.kernels._triton_utils import slot_block
from loraplex.kernels.lora_ops import check_shrink_args

__all__ = ["lora_shrink_triton"]


# num_tokens (and the output's strides over it) change every step: no variant per value class (== 1, % 16),
# which would compile in the middle of serving.
@triton.jit(do_not_specialize=["num_tokens", "stride_op", "stride_os"])
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, sorted_ids_ptr, counts_ptr, starts_ptr, ranks_ptr, pages_ptr,
    num_tokens, scale,
    stride_xt, stride_xk,
    stride_as, stride_ap, stride_ak,
    stride_op, stride_os, stride_ot, stride_or,
    stride_pl,
    num_slices,
    # Loop bounds are constexpr: few distinct values per model, and the interpreter (numpy >= 2.4) cannot take
    # a runtime scalar in range().
    IN_DIM: tl.constexpr,
    K_SPLIT: tl.constexpr,  # in_dim elements per split, a multiple of BLOCK_K
    EVEN_K: tl.constexpr,  # the splits tile in_dim exactly: no k masks (a split past in_dim stores zeros)
    MAX_RANK: tl.constexpr,
    MAX_LORAS: tl.constexpr,
    MAX_LORAS_P: tl.constexpr,  # MAX_LORAS rounded up to a power of two
    NUM_N_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    # fp32 math: fp32 x or A, x and A of different dtypes (EngineArgs.lora_dtype; tl.dot takes one input dtype),
    # or the interpreter, whose bf16 arithmetic is wrong
    UPCAST: tl.constexpr,
):
    pid_mn = tl.program_id(0)
    slice_id = tl.program_id(1) % num_slices
    split = tl.program_id(1) // num_slices
    pid_n = pid_mn % NUM_N_BLOCKS
    slot, pid_m, count = slot_block(pid_mn // NUM_N_BLOCKS, counts_ptr, MAX_LORAS, MAX_LORAS_P, BLOCK_M)
    if slot >= MAX_LORAS:
        return
    start = tl.load(starts_ptr + slot)
    rank = tl.minimum(tl.load(ranks_ptr + slot), MAX_RANK)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=m_ok, other=0)
    m_ok = m_ok & (tok < num_tokens)  # meta prepared for more tokens than x has: ignore the extra rows
    tok = tok.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rank rows of the adapter
    n_ok = offs_n < rank
    offs_k = tl.arange(0, BLOCK_K)
    # int64: the pool spans more than 2**31 elements on a large GPU.
    pages = tl.load(pages_ptr + slot.to(tl.int64) * stride_pl + offs_n, mask=n_ok, other=0).to(tl.int64)

    x_rows = x_ptr + tok[:, None] * stride_xt  # [BLOCK_M, 1]
    a_rows = a_ptr + slice_id.to(tl.int64) * stride_as + pages[None, :] * stride_ap  # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # An n-block wholly past the rank only stores zeros: small ranks skip the whole reduction.
    if pid_n * BLOCK_N < rank:
        for k0 in range(0, K_SPLIT, BLOCK_K):
            k = split * K_SPLIT + k0 + offs_k
            if EVEN_K:
                xt = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
                at = tl.load(a_rows + k[:, None] * stride_ak, mask=n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            else:
                k_ok = k < IN_DIM
                xt = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_rows + k[:, None] * stride_ak, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            # "ieee" keeps fp32 inputs off TF32; for fp16/bf16 inputs it is ignored.
            acc += tl.dot(xt, at, input_precision="ieee")

    out_ptrs = (out_ptr + split.to(tl.int64) * stride_op + slice_id.to(tl.int64) * stride_os + tok[:, None] * stride_ot
                + offs_n[None, :] * stride_or)
    tl.store(out_ptrs, acc * scale, mask=m_ok[:, None] & (offs_n < MAX_RANK)[None, :])


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, meta, scale: float = 1.0) -> None:
    """Triton shrink; same contract as ``loraplex.kernels.lora_ops.lora_shrink``. Never syncs with the host."""
    check_shrink_args(x, lora_a, out, meta)
    num_tokens, in_dim = x.shape
    num_slices = lora_a.shape[0]
    max_loras, max_rank = meta.page_table.shape
    if num_tokens == 0 or num_slices == 0 or max_rank == 0:
        return
    interpret = tu.interpreting()
    if not x.is_cuda and not interpret:
        raise ValueError(f"lora_shrink_triton: needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    split_out = out if out.dim() == 4 else out.unsqueeze(0)  # [num_splits, num_slices, num_tokens, max_rank]
    num_splits = split_out.shape[0]
    # Mixed dtypes (x in the model's, lora_a in lora_dtype) are both upcast and multiplied in fp32, as fp32 inputs.
    upcast = interpret or x.dtype == torch.float32 or lora_a.dtype != x.dtype
    cfg = tu.shrink_config(num_tokens, in_dim, max_rank, interpret, max(x.element_size(), lora_a.element_size()))
    per_split = tu.cdiv(in_dim, num_splits)
    block_k = min(cfg.BLOCK_K, max(16, tu.next_power_of_2(per_split)))  # a short split takes one K step
    k_split = tu.cdiv(per_split, block_k) * block_k
    num_n_blocks = tu.cdiv(max_rank, cfg.BLOCK_N)
    grid = (tu.num_m_programs(num_tokens, max_loras, cfg.BLOCK_M) * num_n_blocks, num_slices * num_splits)
    _lora_shrink_kernel[grid](
        x, lora_a, split_out, meta.sorted_token_ids, meta.num_tokens_per_lora, meta.lora_token_start,
        meta.lora_ranks, meta.page_table, num_tokens, float(scale),
        *x.stride(), *lora_a.stride(), *split_out.stride(), meta.page_table.stride(0), num_slices,
        IN_DIM=in_dim, K_SPLIT=k_split, EVEN_K=k_split * num_splits == in_dim, MAX_RANK=max_rank,
        MAX_LORAS=max_loras, MAX_LORAS_P=max(2, tu.next_power_of_2(max_loras)), NUM_N_BLOCKS=num_n_blocks,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_k, UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
