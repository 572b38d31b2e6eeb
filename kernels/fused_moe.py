"""Fused MoE in Triton: the routed experts of a sparse layer as two grouped GEMMs, with no host sync.

Each (token, slot) pair that chose expert e is one row of expert e's problem. ``moe_align`` sorts the pairs by
expert and pads each expert's run to whole BLOCK_M blocks, on the device and into buffers of a size fixed by the
shapes alone (num_pairs + num_experts * (BLOCK_M - 1)): so the launch is CUDA-graph safe, and a captured decode
step runs only the experts its tokens chose, where the torch loop would have to run every expert masked.

``fused_moe_gemm`` multiplies one block of an expert's rows by one BLOCK_N-wide block of that expert's weight:
out[pair] = x[pair // x_rows_per_pair ...] @ w[e].T, times the pair's routing weight when asked. The layer is

    h = silu_and_mul(gemm(x, w13))         # [num_pairs, inter], x read once per pair (top_k rows per token)
    y = gemm(h, w2, routing weights)       # [num_pairs, hidden]
    out = y.view(num_tokens, top_k, hidden).sum(1)

``fused_moe_ref`` is the same computation in torch (HF's loop over experts), with the same signature.
"""
from __future__ import annotations

import torch

from loraplex.kernels.activation import silu_and_mul

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch reference still runs
    HAS_TRITON = False

__all__ = ["fused_moe", "fused_moe_ref", "moe_align"]


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Pairs sorted by expert, each expert's run padded to whole blocks; device ops of static shapes only.

    :param topk_ids: [num_tokens, top_k] the experts each token chose.
    :returns: (sorted_pairs [max_padded] int32: pair index, num_pairs where padding; block_experts
        [max_padded / block_m] int32: each block's expert, -1 past the last used block).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)  # [num_pairs]
    num_pairs = flat.numel()
    max_padded = num_pairs + num_experts * (block_m - 1)
    max_padded = -(-max_padded // block_m) * block_m
    # Not bincount: its output size depends on the largest id, which it reads back (a sync, illegal in a graph).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # [experts]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # [experts] first padded row of each expert
    order = torch.argsort(flat, stable=True)  # pairs by expert
    first_of = torch.cumsum(counts, 0) - counts  # [experts] first sorted position of each expert
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - first_of[sorted_experts]  # position within its expert
    sorted_pairs = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[starts[sorted_experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, max_padded, block_m, device=flat.device)
    ends = starts + padded
    block_experts = torch.searchsorted(ends, block_start, right=True).to(torch.int32)  # [num_blocks]
    block_experts = torch.where(block_start < ends[-1], block_experts, -1)
    return sorted_pairs, block_experts.to(torch.int32)


if HAS_TRITON:
    # The token count changes every step: no variant per value class, which would compile mid-serving.
    @triton.jit(do_not_specialize=["num_pairs"])
    def _fused_moe_gemm_kernel(
        x_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr, weights_ptr,
        num_pairs,
        stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_ot, stride_on,
        N: tl.constexpr,
        K: tl.constexpr,  # a constexpr loop bound (the interpreter takes no runtime scalar in range())
        X_ROWS_PER_PAIR: tl.constexpr,  # top_k for the first GEMM (pairs share their token's x), 1 for the second
        MUL_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NUM_N_BLOCKS: tl.constexpr,
        UPCAST: tl.constexpr,  # fp32 math (the interpreter's bf16 arithmetic is wrong)
        PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (a fp32 model must not get TF32 products), else None
    ):
        pid = tl.program_id(0)
        pid_m = pid // NUM_N_BLOCKS
        pid_n = pid % NUM_N_BLOCKS
        expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_pairs_ptr + offs_m).to(tl.int64)  # [BLOCK_M]
        row_mask = pairs < num_pairs
        x_rows = pairs // X_ROWS_PER_PAIR
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(x_ptr + x_rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
            if UPCAST:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(a, b, input_precision=PRECISION)
        if MUL_WEIGHTS:
            w = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc * w[:, None]
        tl.store(out_ptr + pairs[:, None] * stride_ot + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _config(num_pairs: int, n: int, k: int) -> dict:
    import os

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block_m = 16 if num_pairs <= 64 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=min(64 if interpret else 128, max(16, triton.next_power_of_2(n))),
                BLOCK_K=min(64, max(16, triton.next_power_of_2(k))), UPCAST=interpret)


def fused_moe_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor,
                   block_experts: torch.Tensor, x_rows_per_pair: int, weights: torch.Tensor | None,
                   block_m: int) -> None:
    """out[pair] = x[pair // x_rows_per_pair] @ w[expert(pair)].T (* weights[pair]). x: [rows, K], w: [E, N, K],
    out: [num_pairs, N], weights: [num_pairs] or None."""
    num_pairs, n = out.shape
    k = x.shape[1]
    cfg = _config(num_pairs, n, k)
    cfg["BLOCK_M"] = block_m
    num_n = -(-n // cfg["BLOCK_N"])
    grid = (block_experts.numel() * num_n,)
    _fused_moe_gemm_kernel[grid](
        x, w, out, sorted_pairs, block_experts, weights if weights is not None else out, num_pairs,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        N=n, K=k, X_ROWS_PER_PAIR=x_rows_per_pair, MUL_WEIGHTS=weights is not None, NUM_N_BLOCKS=num_n,
        PRECISION="ieee" if x.dtype == torch.float32 else None, **cfg)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The routed experts' output. x: [num_tokens, hidden]; w13: [E, 2 * inter, hidden] (gate rows, then up);
    w2: [E, hidden, inter]; topk_weights / topk_ids: [num_tokens, top_k]. Returns [num_tokens, hidden] in x's
    dtype; the routing weights multiply in fp32 (Mixtral keeps them fp32, Qwen rounds them first: as given)."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    block_m = _config(num_pairs, w13.shape[1], x.shape[1])["BLOCK_M"]
    sorted_pairs, block_experts = moe_align(topk_ids, w13.shape[0], block_m)
    h13 = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)  # [num_pairs, 2 * inter]
    fused_moe_gemm(x, w13, h13, sorted_pairs, block_experts, top_k, None, block_m)
    h = silu_and_mul(h13, use_triton=True)  # [num_pairs, inter]
    y = torch.empty(num_pairs, w2.shape[1], dtype=torch.float32, device=x.device)  # [num_pairs, hidden]
    fused_moe_gemm(h, w2, y, sorted_pairs, block_experts, 1, topk_weights.reshape(-1).float(), block_m)
    return y.view(num_tokens, top_k, -1).sum(1).to(x.dtype)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """fused_moe in torch: a loop over the experts the tokens chose (HF's computation)."""
    out = torch.zeros_like(x)
    for e in topk_ids.unique().tolist():
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = silu_and_mul(torch.nn.functional.linear(x[token], w13[e]))  # [n, inter]
        y = torch.nn.functional.linear(h, w2[e]) * topk_weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out
