"""The fused MoE Triton kernel against its torch reference (the interpreter on the CPU, the GPU under gpu):
token counts with empty experts and one expert taking every token, top-1 / top-2, dtypes; and moe_align's
layout (every pair once, blocks of one expert, fixed sizes)."""
from __future__ import annotations

import pytest
import torch

from loraplex.kernels.fused_moe import fused_moe, fused_moe_ref, moe_align

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0, one_expert=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if one_expert:
        logits[:, 1] += 100.0
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 4, 2), (5, 8, 2), (33, 4, 1), (70, 8, 2)])
def test_fused_moe_matches_reference(num_tokens, num_experts, top_k, dtype, tol):
    x, w13, w2, weights, ids = _case(num_tokens, num_experts, top_k, 64, 48, dtype)
    out = fused_moe(x, w13, w2, weights, ids)
    ref = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_one_expert_takes_every_token():
    x, w13, w2, weights, ids = _case(40, 4, 1, 32, 16, torch.float32, one_expert=True)
    assert (ids == 1).all()
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids),
                               atol=1e-4, rtol=1e-4)


def test_moe_align_layout():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (23, 2), generator=gen)
    ids[:, 0] = torch.where(ids[:, 0] == 3, 0, ids[:, 0])  # expert 3 only as a second choice
    block = 4
    pairs, experts = moe_align(ids, 6, block)
    num_pairs = ids.numel()
    assert pairs.numel() == -(-(num_pairs + 6 * (block - 1)) // block) * block  # fixed by the shapes alone
    real = pairs[pairs < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    flat = ids.reshape(-1)
    for b, e in enumerate(experts.tolist()):
        rows = pairs[b * block:(b + 1) * block]
        rows = rows[rows < num_pairs]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows.long()] == e).all() and rows.numel() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 300])
def test_fused_moe_cuda_and_graph(num_tokens):
    """bf16 on the GPU, Mixtral-like proportions; captured in a CUDA graph and replayed with new routing."""
    x, w13, w2, weights, ids = _case(num_tokens, 8, 2, 256, 512, torch.bfloat16)
    ref = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids).float(), ref, atol=3e-2, rtol=3e-2)
    fused_moe(x, w13, w2, weights, ids)  # warm: compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    x2, _, _, weights2, ids2 = _case(num_tokens, 8, 2, 256, 512, torch.bfloat16, seed=5)
    x.copy_(x2), weights.copy_(weights2), ids.copy_(ids2)
    graph.replay()
    ref2 = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), ref2, atol=3e-2, rtol=3e-2)
