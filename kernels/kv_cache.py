"""Write this step's K/V into the paged KV cache.

A plain scatter is enough: the write is memory bound, and pure tensor indexing (no host sync, no data-dependent
shapes) is what lets the decode step be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

__all__ = ["write_kv_cache"]


def _check(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    if k_cache is None or v_cache is None:
        raise ValueError("write_kv_cache: the KV cache is not allocated (k_cache/v_cache is None)")
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"write_kv_cache: k and v must be [num_tokens, num_kv_heads, head_dim] with equal shapes, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"write_kv_cache: k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim] with equal shapes, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"write_kv_cache: k is {tuple(k.shape)} but the cache holds (num_kv_heads, head_dim) = "
                         f"{tuple(k_cache.shape[2:])}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"write_kv_cache: slot_mapping must be [num_tokens={k.shape[0]}], "
                         f"got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"write_kv_cache: slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"write_kv_cache: dtype mismatch, k/v are {k.dtype}/{v.dtype} but the cache is "
                         f"{k_cache.dtype}/{v_cache.dtype}")
    if k.device != k_cache.device or slot_mapping.device != k_cache.device:
        raise ValueError(f"write_kv_cache: k on {k.device}, slot_mapping on {slot_mapping.device}, "
                         f"cache on {k_cache.device}: all must be on one device")


def _write_one(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    # x: [num_tokens, num_kv_heads, head_dim]; cache: [num_blocks, block_size, num_kv_heads, head_dim]
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    try:
        # Flattening blocks and offsets is free when the cache's leading dims are dense, which they are for the
        # engine's per-layer views; index_copy_ is then one scatter kernel.
        flat = cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, num_kv_heads, head_dim]
    except RuntimeError:
        flat = None
    if flat is not None:
        flat.index_copy_(0, slots, x)
        return
    block_size = cache.shape[1]
    cache.index_put_((torch.div(slots, block_size, rounding_mode="floor"), slots % block_size), x)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter ``k``/``v`` into the paged cache in place.

    k, v:             [num_tokens, num_kv_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping:     [num_tokens] int32/int64, flat slot = block_id * block_size + offset

    Slots are not bounds-checked (that would need a host sync); padded tokens must point at a scratch block.
    Duplicate slots (several padded tokens on one scratch slot) leave an arbitrary one of them written.
    """
    _check(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    slots = slot_mapping.long()  # index_copy_ wants int64; a no-op for the engine's int64 slot_mapping
    _write_one(k, k_cache, slots)
    _write_one(v, v_cache, slots)
