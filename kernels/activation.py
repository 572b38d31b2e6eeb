"""silu(gate) * up over a packed [num_tokens, 2 * intermediate] tensor in one kernel."""
from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    from loraplex.kernels._triton_utils import cdiv, next_power_of_2

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, x_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        # Rounded like torch: silu in the model dtype, then the product.
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        tl.store(out_ptr + row * out_stride + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype),
                 mask=mask)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] -> [num_tokens, d]"""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: expected [num_tokens, 2 * d], got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    d = x.shape[-1] // 2
    out = torch.empty(x.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(1024, next_power_of_2(d))
    _silu_and_mul_kernel[(x.shape[0], cdiv(d, block))](x, out, d, x.stride(0), out.stride(0), BLOCK=block)
    return out


def silu_and_mul(x: torch.Tensor, use_triton: bool = False) -> torch.Tensor:
    if use_triton and x.is_cuda and HAS_TRITON:
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
