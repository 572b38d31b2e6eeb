"""Fused RMSNorm (+residual), rotary and silu*mul: Triton (interpreter on CPU) against the torch references."""
from __future__ import annotations

import pytest
import torch

from loraplex.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from loraplex.kernels.rms_norm import rms_norm_ref, rms_norm_triton
from loraplex.kernels.kv_cache import write_kv_cache
from loraplex.kernels.rotary import rotary_and_cache_triton, rotary_ref, rotary_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    torch.manual_seed(0)
    x = torch.randn(7, hidden, device=DEVICE).to(dtype)
    res = torch.randn(7, hidden, device=DEVICE).to(dtype) if with_residual else None
    w = (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)
    out, new_res = rms_norm_triton(x, w, 1e-5, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-5, res)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))
    if with_residual:
        torch.testing.assert_close(new_res, ref_res)


def test_rms_norm_on_head_views():
    # Qwen3's q/k norm runs over [tokens, heads, head_dim] views of the packed qkv output.
    qkv = torch.randn(5, 3 * 32 + 2 * 32, device=DEVICE)
    q = qkv[:, :96].reshape(5, 3, 32)
    w = torch.rand(32, device=DEVICE) + 0.5
    torch.testing.assert_close(rms_norm_triton(q, w, 1e-6)[0], rms_norm_ref(q, w, 1e-6)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [
(4, 2, 16), (3, 1, 32), (8, 8, 64), (24, 8, 128)])
def test_rotary(dtype, heads, kv_heads, head_dim):
    torch.manual_seed(0)
    tokens, max_pos = 6, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)  # strided views, as the model passes them
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    pos = torch.tensor([0, 5, 63, 1, 1, 30], device=DEVICE)
    out_q, out_k = rotary_triton(pos, q, k, cos, sin)
    ref_q, ref_k = rotary_ref(pos, q, k, cos, sin)
    torch.testing.assert_close(out_q.float(), ref_q.float(), **_tol(dtype))
    torch.testing.assert_close(out_k.float(), ref_k.float(), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (24, 8, 128)])
def test_rotary_and_cache(dtype, heads, kv_heads, head_dim):
    # q/k/v are strided views of one packed qkv row, the cache a view of a bigger per-layer tensor: the kernel must
    # read with the input strides and write q with the output's, k/v at each token's slot.
    torch.manual_seed(1)
    tokens, max_pos, num_blocks, block_size = 5, 64, 6, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in (q, k, v))
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    pos = torch.tensor([3, 0, 63, 7, 7], device=DEVICE)
    slots = torch.tensor([5, 0, 23, 9, 12], device=DEVICE)
    caches = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE).to(dtype)
    ref_caches = caches.clone()
    out_q = rotary_and_cache_triton(pos, q, k, v, cos, sin, caches[1, 0], caches[1, 1], slots)
    ref_q, ref_k = rotary_ref(pos, q, k, cos, sin)
    write_kv_cache(ref_k, v, ref_caches[1, 0], ref_caches[1, 1], slots)
    torch.testing.assert_close(out_q.float(), ref_q.float(), **_tol(dtype))
    torch.testing.assert_close(caches.float(), ref_caches.float(), **_tol(dtype))  # other slots/layer untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 112, 1500])
def test_silu_and_mul(dtype, d):
    torch.manual_seed(0)
    x = torch.randn(5, 2 * d, device=DEVICE).to(dtype)
    torch.testing.assert_close(silu_and_mul_triton(x).float(), silu_and_mul_ref(x).float(), **_tol(dtype))
