"""Unified varlen paged attention in Triton: prefill, decode and prefix-cached prefill in one launch.

One program handles BLOCK_Q query tokens of one sequence for all query heads that share one KV head, so each
K/V tile read from the cache is reused by the whole GQA group. Its rows are (token, head-in-group) pairs with the
group padded to a power of two; the rows go through an online-softmax loop over key tiles, each key's physical
block looked up in block_tables (so a tile may span several cache blocks and block_size is free).

The grid comes only from tensor shapes and the host int max_query_len, never from device values, so a decode
step (max_query_len=1) can be captured in a CUDA graph; seq_lens/query_start_loc are read inside the kernel.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loraplex import envs
from loraplex.kernels._triton_utils import cdiv, next_power_of_2
from loraplex.kernels.attention_ops import check_paged_attention_args

__all__ = ["paged_attention_triton"]


@triton.jit
def _attend_tile(q, q_pos, m_i, l_i, acc, t, kv_end, table_row, k_base, v_base, dim, dim_ok, qk_scale,
                 softcap, sliding_window, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                 BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SLIDING: tl.constexpr, MASK: tl.constexpr,
                 UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax step over keys [t * TILE_N, (t + 1) * TILE_N).

    MASK=False is for tiles every row of the block sees in full (below the causal diagonal, no window): they skip
    the per-key bounds and visibility masks, which is most of a long prefill's or a decode's tiles.
    """
    k_pos = t * TILE_N + tl.arange(0, TILE_N)  # [TILE_N]
    k_ok = k_pos < kv_end
    if MASK:
        block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    else:
        block = tl.load(table_row + k_pos // BLOCK_SIZE).to(tl.int64)
    slot = k_pos % BLOCK_SIZE
    k_ptrs = k_base + (block * stride_kb + slot * stride_ks)[None, :] + dim[:, None] * stride_kd
    v_ptrs = v_base + (block * stride_vb + slot * stride_vs)[:, None] + dim[None, :] * stride_vd
    if MASK:
        k = tl.load(k_ptrs, mask=dim_ok[:, None] & k_ok[None, :], other=0.0)  # [HEAD_DIM_P, TILE_N]
        v = tl.load(v_ptrs, mask=k_ok[:, None] & dim_ok[None, :], other=0.0)  # [TILE_N, HEAD_DIM_P]
    else:
        k = tl.load(k_ptrs, mask=dim_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=dim_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    # "ieee" keeps fp32 inputs off TF32; for fp16/bf16 inputs it is ignored.
    s = tl.dot(q, k, input_precision="ieee") * qk_scale  # [BLOCK_M, TILE_N]
    if SOFTCAP:
        # qk_scale is scale / softcap here and softcap carries log2(e): s = tanh(scores / cap) * cap, in base 2.
        # tanh from exp2 of -2|x| (never overflows; no libdevice, so the interpreter runs it too).
        e = tl.exp2(tl.abs(s) * -2.885390081777927)  # exp(-2|x|); 2.885... = 2 * log2(e)
        th = (1.0 - e) / (1.0 + e)
        s = tl.where(s < 0, -th, th) * softcap
    if MASK:
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible yet keep m = -inf; subtracting 0 instead avoids inf - inf = nan.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, TILE_N]
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _attend_tiles(q, q_pos, m_i, l_i, acc, tile_begin, tile_end, kv_end, table_row, k_base, v_base, dim, dim_ok,
                  qk_scale, softcap, sliding_window, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                  BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SLIDING: tl.constexpr, MASK: tl.constexpr,
                  UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:
        # The interpreter (numpy >= 2.4) cannot take tensor bounds in range(); compiled code keeps the for loop,
        # which Triton software-pipelines.
        t = tile_begin
        while t < tile_end:
            m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, t, kv_end, table_row, k_base, v_base, dim, dim_ok,
                                         qk_scale, softcap, sliding_window, stride_kb, stride_ks, stride_kd,
                                         stride_vb, stride_vs, stride_vd, BLOCK_SIZE, TILE_N, SLIDING, MASK, UPCAST,
                                         SOFTCAP)
            t += 1
    else:
        for t in range(tile_begin, tile_end):
            m_i, l_i, acc = _attend_tile(q, q_pos, m_i, l_i, acc, t, kv_end, table_row, k_base, v_base, dim, dim_ok,
                                         qk_scale, softcap, sliding_window, stride_kb, stride_ks, stride_kd,
                                         stride_vb, stride_vs, stride_vd, BLOCK_SIZE, TILE_N, SLIDING, MASK, UPCAST,
                                         SOFTCAP)
    return m_i, l_i, acc


# The block-table width changes from step to step (the longest sequence's blocks): specialising on it (== 1,
# % 16) would compile a new variant in the middle of serving, a stall of over a second on an H200.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (with SOFTCAP: scale / softcap)
    softcap,  # with SOFTCAP: the cap * log2(e)
    sliding_window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # head_dim rounded up to a power of two >= 16; the tail is masked
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_P rows, >= 16 for tl.dot
    TILE_N: tl.constexpr,  # keys per inner iteration
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,  # Gemma 2's attention logit soft cap: tanh(scores / cap) * cap before the softmax
    UPCAST: tl.constexpr,  # compute in fp32 (the interpreter's bf16 arithmetic is wrong)
    INTERPRET: tl.constexpr,  # the interpreter (numpy >= 2.4) cannot take tensor bounds in range()
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # The grid is sized for the longest query; shorter sequences leave trailing programs idle.
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # keys cached before this step

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP_P  # [BLOCK_M] query index within the sequence's chunk
    head = kv_head * GROUP + rows % GROUP_P  # [BLOCK_M]
    row_ok = (tok < q_len) & (rows % GROUP_P < GROUP)
    dim = tl.arange(0, HEAD_DIM_P)
    dim_ok = dim < HEAD_DIM
    q_pos = context_len + tok  # [BLOCK_M] absolute position of each query

    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + dim[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)  # [BLOCK_M, HEAD_DIM_P]

    # Keys up to the last query of this block (a padding sequence, seq_len 0, gets no tiles and writes zeros).
    kv_end = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    first_pos = context_len + q_block * BLOCK_Q  # position of the block's first query
    if SLIDING:
        # Keys older than the first query's window are invisible to every row of this block.
        tile_begin = tl.maximum(first_pos - sliding_window + 1, 0) // TILE_N
        num_full = tile_begin  # windows cut into every tile: mask them all
    else:
        tile_begin = 0
        num_full = tl.minimum((first_pos + 1) // TILE_N, num_tiles)  # tiles left of every row's diagonal

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    m_i, l_i, acc = _attend_tiles(q, q_pos, m_i, l_i, acc, tile_begin, num_full, kv_end, table_row, k_base, v_base,
                                  dim, dim_ok, qk_scale, softcap, sliding_window, stride_kb, stride_ks, stride_kd,
                                  stride_vb, stride_vs, stride_vd, BLOCK_SIZE, TILE_N, SLIDING, False, UPCAST,
                                  SOFTCAP, INTERPRET)
    m_i, l_i, acc = _attend_tiles(q, q_pos, m_i, l_i, acc, num_full, num_tiles, kv_end, table_row, k_base, v_base,
                                  dim, dim_ok, qk_scale, softcap, sliding_window, stride_kb, stride_ks, stride_kd,
                                  stride_vb, stride_vs, stride_vd, BLOCK_SIZE, TILE_N, SLIDING, True, UPCAST,
                                  SOFTCAP, INTERPRET)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(out_ptr + o_off + dim[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def _launch_config(group_p: int, head_dim_p: int, max_query_len: int, num_programs: int,
                   interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, TILE_N, num_warps, num_stages), from H200 sweeps at 32/8 heads, head_dim 128, bf16."""
    if interpret:
        # The interpreter pays per op, not per element: few large tiles, but no more query rows than needed.
        rows = group_p * min(next_power_of_2(max_query_len), 16)
        return max(16, rows), 32, 1, 1
    if max_query_len == 1:
        # Decode is bandwidth bound. With few programs (small batch, few KV heads) each one streams a long
        # context alone, and longer key tiles keep more loads in flight: 1.6x at batch 8 x 8k keys.
        if num_programs < 256:
            return max(16, group_p), min(256, 32768 // head_dim_p), 8, 2
        return max(16, group_p), 64, 4, 2
    return max(64, group_p), (64 if head_dim_p <= 128 else 32), 4, 2


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, max_query_len: int | None = None,
                           max_seq_len: int | None = None, sliding_window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """Triton paged attention; same contract as ``loraplex.kernels.attention_ops.paged_attention``.

    Pass ``max_query_len`` (a host int, 1 for decode) to keep the launch free of host syncs (CUDA graphs);
    ``max_seq_len`` is accepted for API parity but unused, since key loops are bounded by seq_lens in the kernel.
    Rows of padding sequences (seq_len 0) are written as zeros; tokens outside query_start_loc are not written.
    """
    check_paged_attention_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, sliding_window,
                               softcap)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if head_dim > 256:
        raise ValueError(f"paged_attention_triton: head_dim must be <= 256, got {head_dim}")
    interpret = envs.triton_interpret()
    if not q.is_cuda and not interpret:
        raise ValueError(f"paged_attention_triton: needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if out is None:
        out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())  # host sync
    if max_query_len <= 0:
        return out

    group = num_heads // num_kv_heads
    group_p = next_power_of_2(group)
    head_dim_p = max(16, next_power_of_2(head_dim))
    block_m, tile_n, num_warps, num_stages = _launch_config(group_p, head_dim_p, max_query_len,
                                                            num_seqs * num_kv_heads, interpret)
    block_q = block_m // group_p
    grid = (num_seqs, num_kv_heads, cdiv(max_query_len, block_q))
    log2e = math.log2(math.e)
    # With a soft cap the scale goes in before the tanh and log2(e) after it (the cap multiplies the tanh).
    qk_scale, cap = (scale * log2e, 0.0) if softcap is None else (scale / softcap, softcap * log2e)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        qk_scale, cap, sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile_n, SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None, UPCAST=interpret or q.dtype == torch.float32, INTERPRET=interpret,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
