"""Rotary embedding (HF's rotate-half layout) on q and k, optionally writing k and v straight into the KV cache.

The fused form replaces ~15 eager launches per layer (cos/sin gathers, upcasts, multiplies, a concat, two cache
scatters) with one: a program per token rotates every q and k head, and stores k (rotated) and v at the token's
KV-cache slot. Math is fp32 with one rounding into the model dtype, as the torch reference does.
"""
from __future__ import annotations

import importlib.util

import torch

from loraplex.kernels.kv_cache import write_kv_cache

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    from loraplex.kernels._triton_utils import next_power_of_2

    @triton.jit
    def _rotate_heads(src, dst, num_heads, cos, sin, h, d, HALF: tl.constexpr):
        # src/dst: pointers to a token's first head; h: [BLOCK_H, 1] head index; d: [1, HALF]
        mask = h < num_heads
        offs = h * (2 * HALF) + d
        x1 = tl.load(src + offs, mask=mask, other=0.0)
        x2 = tl.load(src + offs + HALF, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(dst + offs, (a * cos - b * sin).to(x1.dtype), mask=mask)
        tl.store(dst + offs + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr, slot_ptr,
                       num_q_heads, num_kv_heads, stride_qt, stride_kt, stride_vt, stride_qo, stride_ko, stride_vo,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, TO_CACHE: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        d = tl.arange(0, HALF)[None, :]  # [1, HALF]
        h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
        cos = tl.load(cos_ptr + pos * HALF + d)  # [1, HALF] fp32
        sin = tl.load(sin_ptr + pos * HALF + d)
        # k and v land in row `slot` of the flat cache, or in row `tok` of plain outputs.
        if TO_CACHE:
            row = tl.load(slot_ptr + tok).to(tl.int64)
        else:
            row = tok
        _rotate_heads(q_ptr + tok * stride_qt, q_out_ptr + tok * stride_qo, num_q_heads, cos, sin, h, d, HALF)
        _rotate_heads(k_ptr + tok * stride_kt, k_out_ptr + row * stride_ko, num_kv_heads, cos, sin, h, d, HALF)
        if TO_CACHE:
            mask = h < num_kv_heads
            offs = h * (2 * HALF) + d
            for part in tl.static_range(2):
                val = tl.load(v_ptr + tok * stride_vt + offs + part * HALF, mask=mask, other=0.0)
                tl.store(v_out_ptr + row * stride_vo + offs + part * HALF, val, mask=mask)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]; cos/sin: [max_pos, rot/2]
    with rot <= head_dim: the first rot dims of each head rotate (rotate-half within them), the rest pass (Phi)."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    rot_dim = 2 * cos.shape[-1]

    def rot(x):
        x1, x2 = x[..., :rot_dim].float().chunk(2, dim=-1)
        parts = [x1 * c - x2 * s, x2 * c + x1 * s]
        if rot_dim < x.shape[-1]:
            parts.append(x[..., rot_dim:].float())
        return torch.cat(parts, dim=-1).to(x.dtype)

    return rot(q), rot(k)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> int:
    head_dim = q.shape[-1]
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1) or k.shape[-1] != head_dim or cos.shape[-1] != half:
        raise ValueError(f"rotary: head_dim must be even with a power-of-two half, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, cos {tuple(cos.shape)}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3 or t.stride(-1) != 1 or t.stride(-2) != head_dim:
            raise ValueError(f"rotary: {name} must be [num_tokens, heads, head_dim] with contiguous heads")
    return half


def _interpretable(*ts: torch.Tensor):
    # The interpreter copies each argument into a buffer of its own size, so strided views would read out of
    # bounds there; on CUDA the kernels take the views as they are.
    return tuple(t if t.is_cuda else t.contiguous() for t in ts)


def rotary_triton(positions, q, k, cos, sin):
    """Triton rotary; returns new contiguous (q, k). Same contract as :func:`rotary_ref`."""
    half = _check(q, k, cos)
    q, k = _interpretable(q, k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, num_heads, head_dim]
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_h = next_power_of_2(max(q.shape[1], k.shape[1]))
    _rotary_kernel[(q.shape[0],)](q, k, k, positions, cos, sin, q_out, k_out, k_out, positions,
                                  q.shape[1], k.shape[1], q.stride(0), k.stride(0), k.stride(0),
                                  q_out.stride(0), k_out.stride(0), k_out.stride(0),
                                  HALF=half, BLOCK_H=block_h, TO_CACHE=False, num_warps=4)
    return q_out, k_out


def rotary_and_cache_triton(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Rotate q and k; store rotated k and v at ``slot_mapping`` in the paged cache. Returns the rotated q."""
    half = _check(q, k, cos)
    if v.shape != k.shape or v.stride(-1) != 1 or v.stride(-2) != k.shape[-1]:
        raise ValueError(f"rotary: v must be shaped like k {tuple(k.shape)} with contiguous heads")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache is None or not cache.is_contiguous() or tuple(cache.shape[2:]) != tuple(k.shape[1:]) \
                or cache.dtype != k.dtype:
            raise ValueError(f"rotary: {name} must be a contiguous [num_blocks, block_size, {k.shape[1]}, "
                             f"{k.shape[2]}] {k.dtype} tensor")
    q, k, v = _interpretable(q, k, v)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, num_heads, head_dim]
    row = k.shape[1] * k.shape[2]  # one flat cache slot: num_kv_heads * head_dim elements
    block_h = next_power_of_2(max(q.shape[1], k.shape[1]))
    _rotary_kernel[(q.shape[0],)](q, k, v, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping,
                                  q.shape[1], k.shape[1], q.stride(0), k.stride(0), v.stride(0),
                                  q_out.stride(0), row, row, HALF=half, BLOCK_H=block_h, TO_CACHE=True, num_warps=4)
    return q_out


def rotary(positions, q, k, cos, sin, use_triton: bool = False):
    half = q.shape[-1] // 2
    # The fused kernel rotates whole heads: partial rotation (cos narrower than half a head) takes the reference.
    if use_triton and q.is_cuda and HAS_TRITON and q.shape[-1] % 2 == 0 and half & (half - 1) == 0 \
            and cos.shape[-1] == half:
        return rotary_triton(positions, q, k, cos, sin)
    return rotary_ref(positions, q, k, cos, sin)


def rotary_and_cache(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping, use_triton: bool = False):
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]; caches:
    [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping: [num_tokens]. Returns the rotated q."""
    half = q.shape[-1] // 2
    if use_triton and q.is_cuda and HAS_TRITON and q.shape[-1] % 2 == 0 and half & (half - 1) == 0 \
            and cos.shape[-1] == half and k_cache is not None and k_cache.is_contiguous() and v_cache.is_contiguous():
        return rotary_and_cache_triton(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    q, k = rotary_ref(positions, q, k, cos, sin)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q
