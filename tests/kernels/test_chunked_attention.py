"""Attention of chunked-prefill steps (issue #17): chunks whose earlier tokens are already in the paged cache, at
offsets that are not block aligned, beside decodes and a whole prompt, against the dense oracle; both backends
(Triton under TRITON_INTERPRET=1 without CUDA)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_paged_attention import BACKENDS, check, make_case, oracle, run

# (chunk length, context including the chunk): a middle chunk, a last chunk of 1 token, a chunk starting at a
# block boundary, a decode, and a prompt in one chunk.
CHUNKED = [(45, 173), (1, 94), (32, 64), (1, 50), (20, 20)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 1)])
def test_chunks_over_cached_context(backend, block_size, num_heads, num_kv_heads):
    case = make_case(CHUNKED, num_heads, num_kv_heads, 32, block_size, torch.float32, seed=11)
    check(run(backend, case, 0.17, max_query_len=45, max_seq_len=173), oracle(case, 0.17), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_add_up_to_the_whole_prompt(backend):
    """A prompt attended in one pass, and in three chunks over the same cache, gives the same rows."""
    whole = make_case([(70, 70)], 4, 2, 32, 16, torch.float32, seed=12)
    full = run(backend, whole, 0.2)
    parts = []
    for start, end in ((0, 23), (23, 64), (64, 70)):
        dev = whole.q.device
        chunk = dataclasses.replace(whole, q=whole.q[start:end].clone(),
                                    seq_lens=torch.tensor([end], dtype=torch.int32, device=dev),
                                    query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=dev))
        parts.append(run(backend, chunk, 0.2))
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-5)
