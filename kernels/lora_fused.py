"""LoRA shrink and expand in one Triton launch, for decode-sized batches.

out[t, slice s cols] += (scale * x[t] @ lora_a[s, slot(t), :rank].T) @ lora_b[slot(t), slice s cols, :rank].T

A decode step's LoRA is latency bound: two dependent launches per projection, each moving a few hundred KB, cost
more in launch gaps and tails than in bytes. Here one program owns BLOCK_M tokens of one slot (grouped by
LoRAKernelMeta) and a BLOCK_N chunk of the packed output columns: it computes the low-rank activations of the
slices its chunk touches itself, then walks the chunk in SUB_N tiles, adding u @ B into the output. Programs of
one slot re-read the same lora_a rows, from L2 after the first; that costs FLOPs that grow with the tokens per
slot, which is why prefill keeps the two-launch path. Every output element is owned by one program: plain
read-add-write, no atomics, no scratch buffer, no host sync (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import _triton_utils as tu
from loraplex.kernels._triton_utils import slot_block
from loraplex.kernels.lora_ops import check_add_lora_args

__all__ = ["lora_fused_triton"]


@triton.jit
def _lora_fused_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, offsets_ptr, sorted_ids_ptr, counts_ptr, starts_ptr, ranks_ptr,
    num_tokens, scale,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_bl, stride_bn, stride_br,
    stride_ot, stride_on,
    IN_DIM: tl.constexpr,
    MAX_RANK: tl.constexpr,
    RANK_P: tl.constexpr,  # MAX_RANK rounded up to a power of two >= 16 (tl.dot's smallest dim)
    MAX_LORAS: tl.constexpr,
    MAX_LORAS_P: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    NUM_N_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output columns per program
    SUB_N: tl.constexpr,  # output columns per inner tile
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 math (fp32 weights, or the interpreter, whose bf16 arithmetic is wrong)
):
    pid = tl.program_id(0)
    pid_n = pid % NUM_N_BLOCKS
    slot, pid_m, count = slot_block(pid // NUM_N_BLOCKS, counts_ptr, MAX_LORAS, MAX_LORAS_P, BLOCK_M)
    if slot >= MAX_LORAS:
        return
    rank = tl.minimum(tl.load(ranks_ptr + slot), MAX_RANK)
    if rank == 0:
        return
    start = tl.load(starts_ptr + slot)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    tok = tl.load(sorted_ids_ptr + start + offs_m, mask=m_ok, other=0)
    m_ok = m_ok & (tok < num_tokens)
    tok = tok.to(tl.int64)
    offs_r = tl.arange(0, RANK_P)
    r_ok = offs_r < rank  # lora weights past the slot's rank are never read: they may hold anything
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tok[:, None] * stride_xt  # [BLOCK_M, 1]
    b_slot = b_ptr + slot.to(tl.int64) * stride_bl + offs_r[:, None] * stride_br  # [RANK_P, 1]
    n0 = pid_n * BLOCK_N

    for s in tl.static_range(NUM_SLICES):
        lo = tl.load(offsets_ptr + s)
        hi = tl.load(offsets_ptr + s + 1)
        if (n0 < hi) & (n0 + BLOCK_N > lo):
            a_rows = (a_ptr + s * stride_as + slot.to(tl.int64) * stride_al
                      + offs_r[None, :] * stride_ar)  # [1, RANK_P]
            u = tl.zeros([BLOCK_M, RANK_P], dtype=tl.float32)
            for k0 in range(0, IN_DIM, BLOCK_K):
                k = k0 + offs_k
                k_ok = k < IN_DIM
                xt = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_rows + k[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                    at = at.to(tl.float32)
                u += tl.dot(xt, at, input_precision="ieee")  # [BLOCK_M, RANK_P]
            u = u * scale
            if not UPCAST:
                u = u.to(b_ptr.dtype.element_ty)  # tensor cores take one input dtype, as in the expand kernel
            for j in tl.static_range(BLOCK_N // SUB_N):
                offs_n = n0 + j * SUB_N + tl.arange(0, SUB_N)
                col_ok = (offs_n >= lo) & (offs_n < hi)
                b = tl.load(b_slot + offs_n[None, :].to(tl.int64) * stride_bn, mask=r_ok[:, None] & col_ok[None, :],
                            other=0.0)  # [RANK_P, SUB_N]
                if UPCAST:
                    b = b.to(tl.float32)
                acc = tl.dot(u, b, input_precision="ieee")  # [BLOCK_M, SUB_N]
                out_ptrs = out_ptr + tok[:, None] * stride_ot + offs_n[None, :] * stride_on
                o_mask = m_ok[:, None] & col_ok[None, :]
                cur = tl.load(out_ptrs, mask=o_mask, other=0.0).to(tl.float32)
                tl.store(out_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def lora_fused_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, meta,
                      slice_offsets: torch.Tensor, scale: float = 1.0) -> None:
    """y += scale * (x @ A[slot].T) @ B[slot].T per token, all slices, one launch; the contract of
    ``loraplex.kernels.lora_ops.add_lora``. Never syncs: slice_offsets must rise from 0 to y.shape[1]."""
    check_add_lora_args(y, x, lora_a, lora_b, meta, slice_offsets)
    num_tokens, in_dim = x.shape
    num_slices, max_loras, max_rank, _ = lora_a.shape
    total_out = y.shape[1]
    if num_tokens == 0 or num_slices == 0 or max_rank == 0 or total_out == 0:
        return
    interpret = tu.interpreting()
    if not x.is_cuda and not interpret:
        raise ValueError(f"lora_fused_triton: needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    cfg = tu.fused_config(num_tokens, in_dim, total_out, max_rank, interpret)
    block_n = min(cfg.BLOCK_N, tu._p2(total_out))
    sub_n = min(cfg.SUB_N, block_n)
    num_n_blocks = triton.cdiv(total_out, block_n)
    grid = (tu.num_m_programs(num_tokens, max_loras, cfg.BLOCK_M) * num_n_blocks,)
    _lora_fused_kernel[grid](
        x, lora_a, lora_b, y, slice_offsets, meta.sorted_token_ids, meta.num_tokens_per_lora, meta.lora_token_start,
        meta.lora_ranks, num_tokens, float(scale),
        *x.stride(), *lora_a.stride(), *lora_b.stride(), *y.stride(),
        IN_DIM=in_dim, MAX_RANK=max_rank, RANK_P=tu._p2(max_rank), MAX_LORAS=max_loras,
        MAX_LORAS_P=max(2, triton.next_power_of_2(max_loras)), NUM_SLICES=num_slices, NUM_N_BLOCKS=num_n_blocks,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=block_n, SUB_N=sub_n, BLOCK_K=min(cfg.BLOCK_K, tu._p2(in_dim)),
        UPCAST=interpret or lora_b.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
