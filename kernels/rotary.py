"""Rotary embedding (HF's rotate-half layout) applied to q and k in one kernel."""
from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, num_q_heads, num_k_heads,
                       q_stride, k_stride, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        d = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + pos * HALF + d)[None, :]  # [1, HALF] fp32
        sin = tl.load(sin_ptr + pos * HALF + d)[None, :]
        h = tl.arange(0, BLOCK_H)[:, None]
        for which in tl.static_range(2):
            if which == 0:
                src, dst, n, stride = q_ptr, q_out_ptr, num_q_heads, q_stride
            else:
                src, dst, n, stride = k_ptr, k_out_ptr, num_k_heads, k_stride
            mask = (h < n) & (d[None, :] < HALF)
            base = tok * stride + h * (2 * HALF) + d[None, :]
            x1 = tl.load(src + base, mask=mask, other=0.0)
            x2 = tl.load(src + base + HALF, mask=mask, other=0.0)
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            tl.store(dst + base, (a * cos - b * sin).to(x1.dtype), mask=mask)
            tl.store(dst + base + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]; cos/sin: [max_pos, head_dim/2]."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)

    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def rotary_triton(positions, q, k, cos, sin):
    head_dim = q.shape[-1]
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1) or k.shape[-1] != head_dim:
        raise ValueError(f"rotary: head_dim must be even with a power-of-two half, got {head_dim}")
    if q.stride(-1) != 1 or q.stride(-2) != head_dim or k.stride(-1) != 1 or k.stride(-2) != head_dim:
        raise ValueError("rotary: q and k need contiguous heads")
    if not q.is_cuda:
        # The interpreter copies each argument into a buffer of its own size, so strided views read out of bounds.
        q, k = q.contiguous(), k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_h = triton.next_power_of_2(max(q.shape[1], k.shape[1]))
    _rotary_kernel[(q.shape[0],)](q, k, positions, cos, sin, q_out, k_out, q.shape[1], k.shape[1], q.stride(0),
                                  k.stride(0), HALF=half, BLOCK_H=block_h)
    return q_out, k_out


def rotary(positions, q, k, cos, sin, use_triton: bool = False):
    half = q.shape[-1] // 2
    if use_triton and q.is_cuda and HAS_TRITON and q.shape[-1] % 2 == 0 and half & (half - 1) == 0:
        return rotary_triton(positions, q, k, cos, sin)
    return rotary_ref(positions, q, k, cos, sin)
