"""Paged attention (Triton + torch reference) and KV-cache writes against a naive contiguous oracle.

Without CUDA the Triton kernel runs under the interpreter (tests/conftest.py), so the CPU cases stay small.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from loraplex.kernels.attention_ops import HAS_TRITON, paged_attention, paged_attention_ref
from loraplex.kernels.kv_cache import write_kv_cache

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
# Real Triton needs CUDA tensors; without CUDA the interpreter takes CPU ones.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}
# (q_len, seq_len): prefill, decode, padding, prefill over a cached prefix, 1-token prompt, decode on a block edge,
# prefill crossing blocks.
MIXED = [(6, 6), (1, 37), (1, 0), (9, 41), (1, 1), (1, 64), (17, 17)]


def _triton_impl():
    from loraplex.kernels.paged_attention import paged_attention_triton

    return paged_attention_triton


@dataclass
class Case:
    specs: list
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    keys: list  # per sequence [seq_len, num_kv_heads, head_dim], contiguous
    values: list

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc)


def make_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, device=DEVICE, seed=0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-seq_len // block_size) for _, seq_len in specs]
    num_blocks = 1 + sum(per_seq) + 3  # block 0 is the engine's scratch block; a few stay unused
    width = max(per_seq + [1]) + 1  # a slack column pointing at the scratch block, as the engine pads tables
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # non-contiguous block ids
    block_tables = torch.zeros(len(specs), width, dtype=torch.int32)
    # Never-written slots hold NaN: reading one anywhere (without masking it away) poisons the output.
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    keys, values = [], []
    for s, (_, seq_len) in enumerate(specs):
        block_tables[s, :per_seq[s]] = torch.tensor([perm.pop() for _ in range(per_seq[s])], dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(seq_len)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        write_kv_cache(k, v, k_cache, v_cache, slots)
        keys.append(k)
        values.append(v)
    q_lens = [q_len for q_len, _ in specs]
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor([seq_len for _, seq_len in specs], dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return Case(specs, to(q), to(k_cache), to(v_cache), to(block_tables), to(seq_lens), to(qsl), keys, values)


def oracle(case: Case, scale: float, sliding_window=None, softcap=None) -> torch.Tensor:
    """Contiguous K/V per sequence, explicit causal (+window) mask, optional soft cap, fp64 math."""
    q = case.q.cpu().double()
    group = q.shape[1] // case.keys[0].shape[1] if case.keys else 1
    out = torch.zeros_like(q)
    start = 0
    for s, (q_len, seq_len) in enumerate(case.specs):
        if seq_len > 0:
            k = case.keys[s].double().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
            v = case.values[s].double().repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[start:start + q_len], k) * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
            k_pos = torch.arange(seq_len)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            scores = scores.masked_fill(~mask, float("-inf"))
            out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += q_len
    return out


def check(out, ref, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=rtol)


def run(backend, case, scale, **kw):
    if backend == "torch":
        return paged_attention_ref(*case.args(), scale, **kw)
    return _triton_impl()(*case.args(), scale, **kw)


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
HEADS = [(4, 4), (4, 2), (8, 2), (4, 1)]  # MHA, GQA 2, GQA 4, MQA


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch_fp32(backend, block_size, num_heads, num_kv_heads, head_dim):
    case = make_case(MIXED, num_heads, num_kv_heads, head_dim, block_size, torch.float32)
    scale = head_dim ** -0.5
    check(run(backend, case, scale, max_query_len=17, max_seq_len=64), oracle(case, scale), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 1)])
def test_half_dtypes(backend, dtype, num_heads, num_kv_heads):
    case = make_case(MIXED, num_heads, num_kv_heads, 64, 16, dtype, seed=1)
    check(run(backend, case, 0.125), oracle(case, 0.125), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sliding_window", [1, 5, 16, 100])
def test_sliding_window(backend, sliding_window):
    case = make_case(MIXED, 4, 2, 64, 16, torch.float32, seed=2)
    check(run(backend, case, 0.125, sliding_window=sliding_window), oracle(case, 0.125, sliding_window),
          torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,sliding_window", [(2.0, None), (0.5, 5), (50.0, None)])
def test_softcap(backend, softcap, sliding_window):
    # Gemma 2's attention logit soft cap over decode, padding, prefill and prefill-with-context rows (MIXED), with
    # and without a window. Scale 1.0 on N(0, 1) q/k gives scores of a few units: caps of 0.5 and 2 change the
    # softmax a lot, 50 barely (the tanh near 0 must not lose precision).
    case = make_case(MIXED, 4, 2, 32, 16, torch.float32, seed=8)
    out = run(backend, case, 1.0, sliding_window=sliding_window, softcap=softcap)
    check(out, oracle(case, 1.0, sliding_window, softcap), torch.float32)
    if softcap < 10:  # the cap matters: uncapped attention is far from it
        assert (out.double() - oracle(case, 1.0, sliding_window)).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_bf16_long_prefill(backend):
    # Several query blocks and full (unmasked) key tiles: the soft cap must apply on the MASK=False path too.
    case = make_case([(40, 40), (33, 70), (1, 50)], 4, 2, 32, 16, torch.bfloat16, seed=9)
    check(run(backend, case, 0.5, softcap=3.0), oracle(case, 0.5, softcap=3.0), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [80, 96, 16])
def test_odd_head_dims(backend, head_dim):
    case = make_case(MIXED, 4, 2, head_dim, 16, torch.float32, seed=3)
    scale = head_dim ** -0.5
    check(run(backend, case, scale), oracle(case, scale), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_only_with_padding_into_out(backend):
    # The CUDA-graph decode layout: one token per sequence, trailing padding sequences with seq_len 0.
    specs = [(1, 5), (1, 33), (1, 16), (1, 0), (1, 0)]
    case = make_case(specs, 4, 2, 64, 16, torch.float32, seed=4)
    out = torch.full_like(case.q, float("nan"))
    assert run(backend, case, 0.125, out=out, max_query_len=1, max_seq_len=64) is out
    check(out, oracle(case, 0.125), torch.float32)
    assert (out[3:] == 0).all()  # padding rows are zeros, never stale values


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_prefill_over_prefix(backend):
    # Several query blocks per sequence, prefix reuse and a decode sequence in one launch.
    case = make_case([(40, 40), (33, 70), (1, 50)], 2, 1, 32, 16, torch.float32, seed=5)
    check(run(backend, case, 0.2), oracle(case, 0.2), torch.float32)


def test_public_entry_dispatch():
    case = make_case(MIXED, 4, 2, 64, 16, torch.float32, seed=6)
    ref = paged_attention_ref(*case.args(), 0.125)
    torch.testing.assert_close(paged_attention(*case.args(), 0.125, backend="torch"), ref, atol=0, rtol=0)
    if not torch.cuda.is_available():  # auto means torch on CPU
        torch.testing.assert_close(paged_attention(*case.args(), 0.125), ref, atol=0, rtol=0)
    if HAS_TRITON:
        check(paged_attention(*case.args(), 0.125, backend="triton"), oracle(case, 0.125), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        paged_attention(*case.args(), 0.125, backend="cuda")


@pytest.mark.parametrize("sliding_window", [None, 7])
def test_matches_hf_eager(sliding_window):
    """The CPU path must agree with transformers' eager attention (Llama/Mistral) to fp32 precision."""
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay
    from transformers.models.llama.modeling_llama import eager_attention_forward

    num_heads, num_kv_heads, head_dim, seq_len = 8, 2, 64, 45
    case = make_case([(seq_len, seq_len)], num_heads, num_kv_heads, head_dim, 16, torch.float32, "cpu", seed=7)
    q_idx, kv_idx = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    allowed = causal_mask_function(0, 0, q_idx, kv_idx)
    if sliding_window is not None:
        allowed = allowed & sliding_window_overlay(sliding_window)(0, 0, q_idx, kv_idx)
    mask = torch.zeros(seq_len, seq_len).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads, training=False)
    hf, _ = eager_attention_forward(module, case.q.transpose(0, 1)[None], case.keys[0].transpose(0, 1)[None],
                                    case.values[0].transpose(0, 1)[None], mask[None, None], head_dim ** -0.5)
    ours = paged_attention_ref(*case.args(), head_dim ** -0.5, sliding_window=sliding_window)
    torch.testing.assert_close(ours, hf[0], atol=1e-5, rtol=1e-5)


def test_argument_errors():
    case = make_case([(3, 3)], 4, 2, 64, 16, torch.float32)
    q, kc, vc, bt, sl, qsl = case.args()
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_ref(q[:, :3], kc, vc, bt, sl, qsl, 1.0)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        paged_attention_ref(q.half(), kc, vc, bt, sl, qsl, 1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention_ref(q, kc, vc, bt, sl, qsl[:1], 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_ref(q, kc, vc, bt.float(), sl, qsl, 1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention_ref(q, kc, vc, bt, sl, qsl, 1.0, sliding_window=0)
    with pytest.raises(ValueError, match="softcap"):
        paged_attention_ref(q, kc, vc, bt, sl, qsl, 1.0, softcap=0.0)
    with pytest.raises(ValueError, match="out"):
        paged_attention_ref(q, kc, vc, bt, sl, qsl, 1.0, out=torch.empty(3, 4, 32))
    cache, k = torch.zeros(4, 16, 2, 32), torch.randn(3, 2, 32)
    with pytest.raises(ValueError, match="dtype"):
        write_kv_cache(k.half(), k.half(), cache, cache.clone(), torch.arange(3))
    with pytest.raises(ValueError, match="num_kv_heads"):
        write_kv_cache(k[:, :1], k[:, :1], cache, cache.clone(), torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, k, cache, cache.clone(), torch.arange(4))
    with pytest.raises(ValueError, match="not allocated"):
        write_kv_cache(k, k, None, None, torch.arange(3))


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dense", [True, False])
def test_write_kv_cache(slot_dtype, dense):
    num_blocks, block_size, num_kv_heads, head_dim = 6, 16, 2, 32
    if dense:
        k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
        v_cache = torch.zeros_like(k_cache)
    else:  # (block, offset) cannot be flattened into one dim: exercises the index_put_ path
        k_cache = torch.zeros(num_blocks, 2 * block_size, num_kv_heads, head_dim)[:, :block_size]
        v_cache = torch.zeros(num_blocks, 2 * block_size, num_kv_heads, head_dim)[:, block_size:]
        with pytest.raises(RuntimeError):
            k_cache.view(-1, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:20]
    k, v = torch.randn(20, num_kv_heads, head_dim), torch.randn(20, num_kv_heads, head_dim)
    write_kv_cache(k, v, k_cache, v_cache, slots.to(slot_dtype))
    flat_k, flat_v = (c.reshape(-1, num_kv_heads, head_dim) for c in (k_cache, v_cache))
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert (flat_k[untouched] == 0).all() and (flat_v[untouched] == 0).all()


# ---------------------------------------------------------------------------------------------- GPU


def _gpu_specs(gen, num_decode, num_prefill, max_len):
    lens = torch.randint(1, max_len + 1, (num_decode + num_prefill,), generator=gen).tolist()
    specs = [(1, n) for n in lens[:num_decode]]
    specs += [(min(n, int(torch.randint(2, 300, (1,), generator=gen))), n) for n in lens[num_decode:]]
    return specs


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype,sliding_window,num_prefill", [
    (32, 8, 128, torch.bfloat16, None, 8), (32, 8, 128, torch.float16, 512, 8),  # realistic mixed steps
    (32, 8, 128, torch.bfloat16, None, 0), (32, 32, 64, torch.bfloat16, None, 0),  # batch-64 decode
    (16, 1, 128, torch.bfloat16, None, 0), (28, 4, 96, torch.bfloat16, 1024, 0)])
def test_gpu_realistic(num_heads, num_kv_heads, head_dim, dtype, sliding_window, num_prefill):
    gen = torch.Generator().manual_seed(0)
    specs = _gpu_specs(gen, 64 - num_prefill, num_prefill, 2048) + [(1, 0), (1, 0)]
    case = make_case(specs, num_heads, num_kv_heads, head_dim, 16, dtype, device="cuda")
    kw = dict(sliding_window=sliding_window, max_query_len=max(q for q, _ in specs))
    out = _triton_impl()(*case.args(), head_dim ** -0.5, **kw)
    ref = paged_attention_ref(*case.args(), head_dim ** -0.5, **kw)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_replay():
    """write_kv_cache + decode attention captured once, replayed with new lengths, tables, padding and queries."""
    num_heads, num_kv_heads, head_dim, block_size, batch, per_seq = 32, 8, 128, 16, 64, 40
    gen = torch.Generator().manual_seed(2)
    cache_shape = (1 + batch * per_seq, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to("cuda", torch.bfloat16)
    v_cache = torch.randn(cache_shape, generator=gen).to("cuda", torch.bfloat16)
    # Static buffers, as the engine's CUDAGraphRunner keeps them.
    q = torch.zeros(batch, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = torch.zeros_like(q[:, :num_kv_heads]), torch.zeros_like(q[:, :num_kv_heads])
    slots = torch.zeros(batch, dtype=torch.int64, device="cuda")
    tables = torch.zeros(batch, per_seq + 8, dtype=torch.int32, device="cuda")
    seq_lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def step():
        write_kv_cache(k_new, v_new, k_cache, v_cache, slots)
        _triton_impl()(q, k_cache, v_cache, tables, seq_lens, qsl, head_dim ** -0.5, out=out, max_query_len=1,
                       max_seq_len=(per_seq + 8) * block_size)

    step()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    rows = torch.arange(batch, device="cuda")
    for n_real in (batch, batch - 5, 1):
        lens = torch.randint(1, per_seq * block_size, (batch,), generator=gen).cuda()
        lens[n_real:] = 0
        seq_lens.copy_(lens)
        for buf in (q, k_new, v_new):
            buf.copy_(torch.randn(buf.shape, generator=gen))
        tables.zero_()
        tables[:, :per_seq] = (torch.randperm(batch * per_seq, generator=gen) + 1).view(batch, per_seq).cuda()
        pos = (lens - 1).clamp(min=0)
        slots.copy_(tables[rows, pos // block_size].long() * block_size + pos % block_size)
        slots[n_real:] = rows[n_real:] % block_size  # padding rows write into scratch block 0
        graph.replay()
        torch.cuda.synchronize()
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        assert torch.equal(flat_k[slots[:n_real]], k_new[:n_real])
        expected = paged_attention_ref(q, k_cache, v_cache, tables, seq_lens, qsl, head_dim ** -0.5)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
        assert (out[n_real:] == 0).all()
