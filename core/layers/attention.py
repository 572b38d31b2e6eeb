"""Paged attention layer: writes this step's K/V into the cache, then attends over the cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.kernels.attention_ops import paged_attention
from loraplex.kernels.kv_cache import write_kv_cache


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None,
                 backend: str = "auto", scale: float | None = None, softcap: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        # Per layer: Gemma alternates windowed and full layers, so each layer's Attention carries its own.
        self.sliding_window = sliding_window
        self.softcap = softcap  # Gemma 2: scores = tanh(scores / softcap) * softcap before the softmax
        self.backend = backend
        # Views into the engine's KV cache, attached by the model runner once it is sized.
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the cache alone, for callers that already wrote this step's k/v into it."""
        return paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                               meta.query_start_loc, self.scale, max_query_len=meta.max_query_len,
                               max_seq_len=meta.max_seq_len, sliding_window=self.sliding_window,
                               backend=self.backend, softcap=self.softcap)
