"""Paged attention entry point: Triton on CUDA, a torch reference everywhere else.

The torch reference is not only an oracle: it is the CPU production path (the whole engine runs on it in CI), so
it batches every decode sequence into one SDPA call and loops per sequence only for prefill chunks.

Importing this module does not need triton; ``paged_attention_triton`` is resolved lazily.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["paged_attention", "paged_attention_ref", "paged_attention_triton", "HAS_TRITON"]


def _has_triton() -> bool:
    # find_spec, not import: CPU processes never pay for importing triton.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON = _has_triton()

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Upper bound on the fp32 K+V gathered for one batched decode call; bigger batches are split.
_DECODE_GATHER_BYTES = 256 << 20


def check_paged_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               query_start_loc: torch.Tensor, out: torch.Tensor | None,
                               sliding_window: int | None, softcap: float | None = None) -> None:
    """Shape/dtype/device checks shared by both backends; never syncs with the device."""
    if q.dim() != 3:
        raise ValueError(f"paged_attention: q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    if k_cache is None or v_cache is None:
        raise ValueError("paged_attention: the KV cache is not allocated (k_cache/v_cache is None)")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim] with equal shapes, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"paged_attention: q has head_dim {head_dim} but the cache has {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"paged_attention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if q.dtype not in _FLOAT_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paged_attention: q, k_cache and v_cache must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.dtype not in _INDEX_DTYPES:
        raise ValueError(f"paged_attention: block_tables must be [num_seqs, max_blocks_per_seq] int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    num_seqs = block_tables.shape[0]
    if seq_lens.dim() != 1 or seq_lens.shape[0] != num_seqs or seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"paged_attention: seq_lens must be [num_seqs={num_seqs}] int32, got "
                         f"{tuple(seq_lens.shape)} {seq_lens.dtype}")
    if (query_start_loc.dim() != 1 or query_start_loc.shape[0] != num_seqs + 1
            or query_start_loc.dtype not in _INDEX_DTYPES):
        raise ValueError(f"paged_attention: query_start_loc must be [num_seqs + 1 = {num_seqs + 1}] int32, got "
                         f"{tuple(query_start_loc.shape)} {query_start_loc.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.device != q.device:
            raise ValueError(f"paged_attention: {name} is on {t.device} but q is on {q.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"paged_attention: out must match q ({tuple(q.shape)} {q.dtype} on {q.device}), got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"paged_attention: sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"paged_attention: softcap must be a positive float or None, got {softcap!r}")


def _sdpa(q, k, v, mask, scale, softcap, is_causal=False):
    """SDPA, or with a soft cap (Gemma 2: scores = tanh(scores / softcap) * softcap before the mask and softmax)
    the same product written out, since SDPA has no hook between the scores and the softmax.

    q: [..., q_len, head_dim]; k, v: [..., L, head_dim]; mask: bool, broadcastable to [..., q_len, L], or None.
    """
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (scale / softcap)) * softcap  # [..., q_len, L]
    if is_causal:
        q_len, length = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(q_len, length, dtype=torch.bool, device=q.device).tril(length - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def _gather_kv(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, num_kv_heads, head_dim]; tables: [..., num_blocks_needed]
    # Returns the first `length` keys of each table as [..., length, num_kv_heads, head_dim].
    blocks = cache[tables.long()]  # [..., num_blocks_needed, block_size, num_kv_heads, head_dim]
    return blocks.flatten(-4, -3)[..., :length, :, :]


def _decode_batch(q, k_cache, v_cache, block_tables, seq_lens, tokens, seqs, max_len, scale, sliding_window, softcap,
                  out):
    # One SDPA over all decode sequences: K/V padded to the longest one and masked per row.
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-max_len // block_size)
    seq_idx = torch.tensor(seqs, dtype=torch.long, device=q.device)  # [B]
    tok_idx = torch.tensor(tokens, dtype=torch.long, device=q.device)  # [B]
    lens = seq_lens[seq_idx].long()  # [B]
    pos = torch.arange(max_len, device=q.device)
    mask = pos[None, :] < lens[:, None]  # [B, L]
    k = _gather_kv(k_cache, block_tables[seq_idx, :num_blocks], max_len)  # [B, L, num_kv_heads, head_dim]
    v = _gather_kv(v_cache, block_tables[seq_idx, :num_blocks], max_len)
    # Padding keys come from never-written slots; masking their scores is not enough when they hold NaN/inf
    # (NaN + -inf is NaN, 0 * NaN is NaN), so zero them in the gathered copy.
    k.masked_fill_(~mask[:, :, None, None], 0)
    v.masked_fill_(~mask[:, :, None, None], 0)
    k = k.transpose(1, 2).float()  # [B, num_kv_heads, L, head_dim]
    v = v.transpose(1, 2).float()
    if sliding_window is not None:
        mask &= pos[None, :] >= (lens - sliding_window)[:, None]
    # The query heads of one KV head ride in SDPA's query-length dim, so K/V are never repeated for GQA.
    qb = q[tok_idx].float().view(len(seqs), num_kv_heads, group, head_dim)  # [B, num_kv_heads, group, head_dim]
    o = _sdpa(qb, k, v, mask[:, None, None, :], scale, softcap)
    out[tok_idx] = o.reshape(len(seqs), num_heads, head_dim).to(out.dtype)


def _prefill_one(q, k_cache, v_cache, block_table, start, q_len, seq_len, scale, sliding_window, softcap, out):
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-seq_len // block_size)
    k = _gather_kv(k_cache, block_table[:num_blocks], seq_len)  # [L, num_kv_heads, head_dim]
    v = _gather_kv(v_cache, block_table[:num_blocks], seq_len)
    # [num_kv_heads, group, L, head_dim] as an expanded view: SDPA's CPU kernel takes it without a copy per group.
    k = k.permute(1, 0, 2).float().unsqueeze(1).expand(num_kv_heads, group, seq_len, head_dim)
    v = v.permute(1, 0, 2).float().unsqueeze(1).expand(num_kv_heads, group, seq_len, head_dim)
    qs = q[start:start + q_len].float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    ctx = seq_len - q_len
    if ctx == 0 and (sliding_window is None or sliding_window >= seq_len):
        # Plain causal prompt: SDPA's built-in causal mask is cheaper than materialising one.
        o = _sdpa(qs, k, v, None, scale, softcap, is_causal=True)
    else:
        q_pos = torch.arange(ctx, seq_len, device=q.device)[:, None]  # [q_len, 1]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]  # [1, L]
        mask = k_pos <= q_pos  # [q_len, L]
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = _sdpa(qs, k, v, mask, scale, softcap)
    # o: [num_kv_heads, group, q_len, head_dim]
    out[start:start + q_len] = o.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(out.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                        out: torch.Tensor | None = None, max_query_len: int | None = None,
                        max_seq_len: int | None = None, sliding_window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Torch paged attention (fp32 math); same contract as :func:`paged_attention`.

    Reads seq_lens/query_start_loc on the host (one sync), so it is not CUDA-graph capturable.
    Rows of padding sequences (seq_len 0) and tokens outside query_start_loc come back as zeros.
    """
    check_paged_attention_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, sliding_window,
                               softcap)
    if out is None:
        out = torch.zeros_like(q)  # [num_tokens, num_heads, head_dim]
    else:
        out.zero_()
    lens = seq_lens.tolist()
    starts = query_start_loc.tolist()
    row_bytes = 2 * 4 * k_cache.shape[2] * k_cache.shape[3]  # fp32 K+V of one key position
    decode_tokens, decode_seqs, decode_max = [], [], 0

    def flush():
        nonlocal decode_max
        if decode_seqs:
            _decode_batch(q, k_cache, v_cache, block_tables, seq_lens, decode_tokens, decode_seqs, decode_max,
                          scale, sliding_window, softcap, out)
        decode_tokens.clear()
        decode_seqs.clear()
        decode_max = 0

    for s, seq_len in enumerate(lens):
        start, q_len = starts[s], starts[s + 1] - starts[s]
        if seq_len == 0 or q_len == 0:
            continue
        if q_len > seq_len:
            raise ValueError(f"paged_attention: sequence {s} has {q_len} query tokens but seq_len {seq_len}")
        if q_len > 1:
            _prefill_one(q, k_cache, v_cache, block_tables[s], start, q_len, seq_len, scale, sliding_window, softcap,
                         out)
            continue
        new_max = max(decode_max, seq_len)
        if decode_seqs and (len(decode_seqs) + 1) * new_max * row_bytes > _DECODE_GATHER_BYTES:
            flush()
            new_max = seq_len
        decode_tokens.append(start)
        decode_seqs.append(s)
        decode_max = new_max
    flush()
    return out


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        from loraplex import envs

        backend = envs.use_triton_kernels()
        if backend == "auto":
            backend = "triton" if (q.is_cuda and HAS_TRITON) else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"paged_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("paged_attention: backend='triton' but triton is not installed")
    return backend


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, max_query_len: int | None = None,
                    max_seq_len: int | None = None, sliding_window: int | None = None,
                    backend: str = "auto", softcap: float | None = None) -> torch.Tensor:
    """Causal varlen attention of this step's queries over the paged KV cache (prefill, decode or both).

    q:               [num_tokens, num_heads, head_dim], num_heads a multiple of num_kv_heads
    k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim], already holding this step's K/V
    block_tables:    [num_seqs, max_blocks_per_seq] int32
    seq_lens:        [num_seqs] int32, context length including this step's tokens; 0 = padding sequence
    query_start_loc: [num_seqs + 1] int32; query i of seq s sits at position seq_lens[s] - q_len + i
    softcap:         None, or Gemma 2's attention logit soft cap: scores = tanh(scores / softcap) * softcap
    Returns out [num_tokens, num_heads, head_dim] in q's dtype. ``backend="auto"`` honours LORAPLEX_KERNELS.
    """
    if _resolve_backend(backend, q) == "triton":
        from loraplex.kernels.paged_attention import paged_attention_triton as impl
    else:
        impl = paged_attention_ref
    return impl(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out=out,
                max_query_len=max_query_len, max_seq_len=max_seq_len, sliding_window=sliding_window, softcap=softcap)


def __getattr__(name: str):
    # Lazy so that this module imports on machines without triton.
    if name == "paged_attention_triton":
        from loraplex.kernels.paged_attention import paged_attention_triton

        return paged_attention_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
