"""Rotary position embedding (HF's rotate-half layout), with Llama 3, linear and LongRoPE scaling and partial
rotation (Phi: the first rotary_dim dims of each head rotate, the rest pass through)."""
from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.errors import UnsupportedModelError
from loraplex.kernels.rotary import rotary, rotary_and_cache


def longrope_original_len(scaling: dict | None) -> int | None:
    """LongRoPE's pre-training length, beyond which HF switches to the long factors; None for other ropes."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
        return None
    return int(scaling["original_max_position_embeddings"])


def _inv_freq(head_dim: int, theta: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    # float32 throughout, as HF computes it, so positions map to bit-identical angles.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if rope_type in ("longrope", "su"):
        # HF's LongRoPE with its short factors: what it computes for sequences up to the pre-training length, the
        # only ones served (ModelConfig bounds max_model_len by it). The attention factor scales cos and sin.
        original = longrope_original_len(scaling)
        factor = scaling.get("factor") or max_position / original
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
        if short.shape != inv_freq.shape:
            raise UnsupportedModelError(f"longrope short_factor has {short.numel()} values, the rotary dims need "
                                        f"{inv_freq.numel()}")
        return 1.0 / (short * theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), attn
    raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None,
                 fused: bool = False, rotary_dim: int | None = None):
        super().__init__()
        self.fused = fused
        # cos/sin: [max_position, rotary_dim / 2]; heads wider than rotary_dim keep their tail as it is.
        inv_freq, attn_scale = _inv_freq(rotary_dim or head_dim, theta, scaling or {}, max_position)
        inv_freq = inv_freq.float()
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        self.register_buffer("cos", (freqs.cos() * attn_scale).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attn_scale).float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
        return rotary(positions, q, k, self.cos, self.sin, use_triton=self.fused)

    def forward_to_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate q and k and write k and v into the paged cache (one kernel when fused); returns the rotated q."""
        return rotary_and_cache(positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slot_mapping,
                                use_triton=self.fused)
