"""Fused residual add + RMSNorm: one kernel instead of the ~8 elementwise launches eager torch needs.

Rounding follows HF exactly: the residual sum is rounded to the model dtype, normalised in fp32, rounded to the
model dtype, then multiplied by the weight (rounded again), so bf16 outputs match transformers' RMSNorm.
"""
from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    from loraplex.kernels._triton_utils import next_power_of_2

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride, res_stride, out_stride,
                         eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row * out_stride + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + row * out_stride + cols, y, mask=mask)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x, residual: [num_rows, hidden]. Returns (normed, new residual) — new residual is x + residual."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} != weight size {weight.shape[0]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else x2
    res_out = torch.empty_like(out) if residual is not None else out
    block = next_power_of_2(shape[-1])
    _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, res_out, shape[-1], x2.stride(0), res2.stride(0),
                                     out.stride(0), eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                     num_warps=min(16, max(1, block // 256)))
    return out.view(shape), (res_out.view(shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             use_triton: bool = False):
    if use_triton and x.is_cuda and HAS_TRITON:
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
