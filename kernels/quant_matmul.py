"""A quantized weight's product for small batches in Triton: the weight is decoded tile by tile in registers and
never written out in the model's dtype.

bitsandbytes multiplies more than one row by a 4-bit weight by first writing the whole weight out in bf16 (read
0.5 bytes, write 2, read 2 again per weight), and FP8 with dynamic per-token activations launches half a dozen
small kernels per Linear to quantize its input; a decode step reads each weight once, so both lose to the bf16
base they should beat. Here one kernel reads the codes once:

    fp8:   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]                      # w: [N, K] float8_e4m3fn
    4-bit: y[m, n] = sum_k x[m, k] * (table[code(n, k)] * absmax[(n * K + k) // blocksize])

The 4-bit codes are bitsandbytes' layout: the row-major [N, K] weight flattened, two codes a byte, the first in
the high nibble; ``table`` is its 16-value code book (NF4 or FP4). FP8 weights are exact in bf16, and their scale
multiplies the fp32 sum; a 4-bit weight is rounded to the model's dtype before the product, as bitsandbytes
dequantizes it. Activations stay in the model's dtype (weight-only arithmetic, so an FP8 checkpoint with dynamic
activation scales gets the more exact product at small batches and FP8 tensor cores at large ones).

``dequant_matmul_ref`` is the same computation in torch, with the same signature.

Not wired into the quantized Linears yet: on the H200 (benchmarks/probe_quant_matmul.py,
benchmarks/results/h200-20261202-quant-matmul-probe.log) this FP8 version is about 2x faster than per-token
quantization + torch._scaled_mm at up to 64 rows but still slower than bf16 cuBLAS, and this 4-bit version, which
gathers a byte, a code and an absmax per weight, is 7-20x slower than bitsandbytes. Next: coalesced byte tiles with
even / odd activation columns instead of per-weight gathers, and split-K chosen by the program count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex import envs

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch reference still runs
    HAS_TRITON = False

__all__ = ["dequant_matmul", "dequant_matmul_ref"]

FP8, NIBBLE = 0, 1


@dataclass(frozen=True)
class QuantMatmulConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3


if HAS_TRITON:
    # The row count changes every step: no variant per value class, which would compile mid-serving.
    @triton.jit(do_not_specialize=["M"])
    def _dequant_matmul_kernel(
        x_ptr, w_ptr, scale_ptr, table_ptr, out_ptr,
        M, stride_xm, stride_om, stride_os,
        N: tl.constexpr,
        K: tl.constexpr,
        FORMAT: tl.constexpr,  # FP8 or NIBBLE
        BLOCKSIZE: tl.constexpr,  # weights per absmax (4-bit)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
        UPCAST: tl.constexpr,  # fp32 math (the interpreter's bf16 arithmetic is wrong)
        PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (a fp32 model must not get TF32 products), else None
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = pid_k * K_PER_SPLIT + i + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(dtype)  # [BLOCK_M, BLOCK_K]
            idx = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N] flat weight index
            w_mask = n_mask[None, :] & k_mask[:, None]
            if FORMAT == 0:
                b = tl.load(w_ptr + idx, mask=w_mask, other=0.0).to(dtype)
            else:
                byte = tl.load(w_ptr + idx // 2, mask=w_mask, other=0).to(tl.int32)
                code = (byte >> ((1 - idx % 2) * 4).to(tl.int32)) & 0xF
                value = tl.load(table_ptr + code) * tl.load(scale_ptr + idx // BLOCKSIZE, mask=w_mask, other=0.0)
                b = value.to(x_ptr.dtype.element_ty).to(dtype)
            acc += tl.dot(a, b, input_precision=PRECISION)
        if FORMAT == 0:
            acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def config(m: int, n: int, k: int, interpret: bool) -> QuantMatmulConfig:
    """Launch shape from host ints only (no device read, so CUDA graphs capture it)."""
    block_m = min(_p2(m), 64)
    if interpret:
        return QuantMatmulConfig(block_m, min(64, _p2(n)), min(64, _p2(k)), 1, 1, 1)
    return QuantMatmulConfig(block_m, 64, 128, 1, 4, 3)


def dequant_matmul(x: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor, n: int,
                   table: torch.Tensor | None = None, blocksize: int = 64,
                   cfg: QuantMatmulConfig | None = None) -> torch.Tensor:
    """x @ W.T for a quantized W of ``n`` rows, in x's dtype.

    :param x: [num_tokens, K] activations (bf16, fp16 or fp32).
    :param fmt: "fp8" (weight [N, K] float8_e4m3fn, scale [N] fp32) or "nibble" (weight [N * K / 2] uint8
        bitsandbytes codes, scale [N * K / blocksize] fp32 absmax, table [16] fp32 code book).
    :param cfg: a launch shape to force (benchmarks and tests); else ``config``.
    """
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = cfg or config(m, n, k, envs.triton_interpret())
    k_per_split = -(-k // (cfg.SPLIT_K * cfg.BLOCK_K)) * cfg.BLOCK_K
    split = -(-k // k_per_split)
    out = torch.empty(split, m, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    if m == 0:
        return out.sum(0).to(x.dtype) if split > 1 else out[0]
    is_fp8 = fmt == "fp8"
    grid = (-(-n // cfg.BLOCK_N), -(-m // cfg.BLOCK_M), split)
    _dequant_matmul_kernel[grid](
        x, weight, scale, scale if table is None else table, out, m, x.stride(0), out.stride(1), out.stride(0),
        N=n, K=k, FORMAT=FP8 if is_fp8 else NIBBLE, BLOCKSIZE=blocksize, BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, K_PER_SPLIT=k_per_split, UPCAST=envs.triton_interpret(),
        PRECISION="ieee" if x.dtype == torch.float32 else None, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)


def dequant_matmul_ref(x: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor, n: int,
                       table: torch.Tensor | None = None, blocksize: int = 64,
                       cfg: QuantMatmulConfig | None = None) -> torch.Tensor:
    """dequant_matmul in torch: the weight decoded whole, then one product."""
    k = x.shape[1]
    if fmt == "fp8":
        return (x.float() @ weight.float().t() * scale[None, :]).to(x.dtype)
    codes = torch.stack([weight >> 4, weight & 0xF], dim=1).reshape(-1).long()  # [N * K], high nibble first
    w = (table[codes].view(-1, blocksize) * scale[:, None]).view(n, k).to(x.dtype)
    return (x.float() @ w.float().t()).to(x.dtype)
