"""Per-token LoRA shrink and expand for decode batches (Punica's BGMV layout): one program per token.

The grouped kernels (lora_shrink.py, lora_expand.py) gather BLOCK_M tokens of one adapter so that tensor cores
multiply them together. A decode batch gives most adapters one or two tokens, so those programs run with 15 of
16 rows masked and each moves only a few KB of weights. Here each program takes one token, reads its slot from
LoRAKernelMeta.token_lora_indices, and does the rank-r dot products on CUDA cores in fp32. Tokens that share
an adapter read its weights again, from L2. Same contracts, buffers and split-K layout as the grouped kernels,
so lora_ops dispatches between them by batch size alone (see _triton_utils.use_decode_kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import _triton_utils as tu
from loraplex.kernels.lora_ops import check_expand_args, check_shrink_args

__all__ = ["lora_shrink_decode", "lora_expand_decode"]


@triton.jit
def _shrink_decode_kernel(
    x_ptr, a_ptr, out_ptr, slots_ptr, ranks_ptr, scale,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_op, stride_os, stride_ot, stride_or,
    NUM_SLICES: tl.constexpr,
    IN_DIM: tl.constexpr,
    K_SPLIT: tl.constexpr,  # in_dim elements per split, a multiple of BLOCK_K
    MAX_RANK: tl.constexpr,
    MAX_LORAS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # MAX_RANK rounded up to a power of two
    BLOCK_K: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slice_id = tl.program_id(1) % NUM_SLICES
    split = tl.program_id(1) // NUM_SLICES
    slot = tl.load(slots_ptr + tok)
    if (slot < 0) | (slot >= MAX_LORAS):
        return  # no adapter: the row is left untouched
    rank = tl.minimum(tl.load(ranks_ptr + slot), MAX_RANK)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (a_ptr + slice_id.to(tl.int64) * stride_as + slot.to(tl.int64) * stride_al
              + offs_r[:, None] * stride_ar)  # [BLOCK_R, 1]
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if rank > 0:
        for k0 in range(0, K_SPLIT, BLOCK_K):
            k = split * K_SPLIT + k0 + offs_k
            k_ok = k < IN_DIM
            x = tl.load(x_ptr + tok * stride_xt + k * stride_xk, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            a = tl.load(a_rows + k[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
            acc += tl.sum(a * x[None, :], axis=1)
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_op + slice_id.to(tl.int64) * stride_os + tok * stride_ot
                + offs_r * stride_or)
    tl.store(out_ptrs, acc * scale, mask=offs_r < MAX_RANK)


@triton.jit
def _expand_decode_kernel(
    buf_ptr, b_ptr, out_ptr, offsets_ptr, slots_ptr, ranks_ptr, total_out,
    stride_up, stride_us, stride_ut, stride_ur,
    stride_bl, stride_bn, stride_br,
    stride_ot, stride_on,
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
    # One B tile serves every slice the block touches: the slices differ only in which low-rank row they take.
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bl + offs_n[:, None].to(tl.int64) * stride_bn
                + offs_r[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
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


def _check_device(name: str, t: torch.Tensor, interpret: bool) -> None:
    if not t.is_cuda and not interpret:
        raise ValueError(f"{name}: needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def lora_shrink_decode(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, meta, scale: float = 1.0) -> None:
    """Per-token shrink; same contract as ``loraplex.kernels.lora_ops.lora_shrink``. Never syncs with the host."""
    check_shrink_args(x, lora_a, out, meta)
    num_tokens, in_dim = x.shape
    num_slices, max_loras, max_rank, _ = lora_a.shape
    if num_tokens == 0 or num_slices == 0 or max_rank == 0:
        return
    interpret = tu.interpreting()
    _check_device("lora_shrink_decode", x, interpret)
    split_out = out if out.dim() == 4 else out.unsqueeze(0)  # [num_splits, num_slices, num_tokens, max_rank]
    num_splits = split_out.shape[0]
    block_r = max(2, triton.next_power_of_2(max_rank))
    per_split = triton.cdiv(in_dim, num_splits)
    block_k = tu.decode_shrink_block_k(per_split, block_r, interpret)
    _shrink_decode_kernel[(num_tokens, num_slices * num_splits)](
        x, lora_a, split_out, meta.token_lora_indices, meta.lora_ranks, float(scale),
        *x.stride(), *lora_a.stride(), *split_out.stride(),
        NUM_SLICES=num_slices, IN_DIM=in_dim, K_SPLIT=triton.cdiv(per_split, block_k) * block_k,
        MAX_RANK=max_rank, MAX_LORAS=max_loras, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=1 if interpret else 4,
    )


def lora_expand_decode(buf: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, meta,
                       slice_offsets: torch.Tensor) -> None:
    """Per-token expand; same contract as ``loraplex.kernels.lora_ops.lora_expand``. Never syncs with the host,
    so slice_offsets values are trusted: they must rise from 0 to total_out."""
    check_expand_args(buf, lora_b, out, meta, slice_offsets)
    split_buf = buf if buf.dim() == 4 else buf.unsqueeze(0)  # [num_splits, num_slices, num_tokens, max_rank]
    num_splits, num_slices, num_tokens, max_rank = split_buf.shape
    max_loras, total_out, _ = lora_b.shape
    if num_tokens == 0 or num_slices == 0 or max_rank == 0 or total_out == 0:
        return
    interpret = tu.interpreting()
    _check_device("lora_expand_decode", buf, interpret)
    block_r = max(2, triton.next_power_of_2(max_rank))
    block_n = tu.decode_expand_block_n(total_out, block_r, interpret)
    _expand_decode_kernel[(num_tokens, triton.cdiv(total_out, block_n))](
        split_buf, lora_b, out, slice_offsets, meta.token_lora_indices, meta.lora_ranks, total_out,
        *split_buf.stride(), *lora_b.stride(), *out.stride(),
        NUM_SLICES=num_slices, NUM_SPLITS=num_splits, MAX_RANK=max_rank, MAX_LORAS=max_loras,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=1 if interpret else 4,
    )
