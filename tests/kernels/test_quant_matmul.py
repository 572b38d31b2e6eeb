"""The quantized-weight matmul kernel against its torch reference (the interpreter on the CPU, the GPU under gpu):
FP8 and 4-bit NF4 / FP4 weights, fp32 / bf16 activations, empty, single and ragged row counts, widths that are
not whole blocks, split-K; the reference's 4-bit layout against bitsandbytes' own dequantization."""
from __future__ import annotations

import pytest
import torch

from loraplex.kernels.quant_matmul import QuantMatmulConfig, dequant_matmul, dequant_matmul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(fmt: str, n: int, k: int, seed: int = 0):
    """(weight, scale, table) of a random [n, k] weight in ``fmt``, built on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    if fmt == "fp8":
        w = (torch.randn(n, k, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        return w, torch.rand(n, generator=gen) / 64 + 1e-3, None
    table = torch.linspace(-1, 1, 16) if fmt == "fp4" else torch.tensor(
        [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
         0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])  # NF4's code book, as bitsandbytes' to 4 places
    codes = torch.randint(0, 256, (n * k // 2,), generator=gen, dtype=torch.uint8)
    return codes, torch.rand(n * k // 64, generator=gen) * 0.1, table


def _run(fmt, m, n, k, dtype, cfg=None):
    w, scale, table = _weights(fmt, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = [t.to(DEVICE) if t is not None else None for t in (x, w, scale, table)]
    kind = "fp8" if fmt == "fp8" else "nibble"
    out = dequant_matmul(args[0], kind, args[1], args[2], n, args[3], 64, cfg=cfg)
    ref = dequant_matmul_ref(args[0], kind, args[1], args[2], n, args[3], 64)
    assert out.dtype == dtype and out.shape == (m, n)
    return out.float().cpu(), ref.float().cpu()


@pytest.mark.parametrize("fmt", ["fp8", "nf4", "fp4"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m, n, k", [(1, 48, 128), (5, 80, 192), (33, 32, 64), (0, 16, 64)])
def test_matches_reference(fmt, dtype, tol, m, n, k):
    out, ref = _run(fmt, m, n, k, dtype)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_split_k_and_blocks_smaller_than_the_problem(fmt):
    """Several n-, m- and k-programs, and partial sums over k-splits (one of them ragged)."""
    cfg = QuantMatmulConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, num_warps=1, num_stages=1)
    out, ref = _run(fmt, 20, 40, 320, torch.float32, cfg)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_reference_layout_is_bitsandbytes():
    """High nibble first, absmax per 64 flat weights: the reference decodes what bitsandbytes writes as it does."""
    bf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    for quant_type in ("nf4", "fp4"):
        codes, state = bf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
        table = state.code.float()
        eye = torch.eye(128)
        decoded = dequant_matmul_ref(eye, "nibble", codes.reshape(-1), state.absmax.float(), 24, table, 64).t()
        assert torch.equal(decoded, bf.dequantize_4bit(codes, state).float())
        kernel = dequant_matmul(eye, "nibble", codes.reshape(-1), state.absmax.float(), 24, table, 64).t()
        assert torch.equal(kernel, decoded)
