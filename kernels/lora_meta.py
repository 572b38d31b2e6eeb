"""Per-step LoRA kernel metadata: which adapter slot each token uses, with tokens grouped by slot.

The LoRA kernels work on tokens grouped by slot, so each program multiplies a block of rows that share one
adapter's weights. The grouping lives in static buffers sized for the largest step: the kernels' grid then
depends only on tensor shapes and ``prepare`` only writes into the buffers, so a step can be captured in a CUDA
graph with ``prepare`` inside it and replayed with new slot ids copied into the graph's input buffer.

Importing this module does not need triton.
"""
from __future__ import annotations

import torch

__all__ = ["LoRAKernelMeta"]


class LoRAKernelMeta:
    """Per-step LoRA metadata in static device buffers (reused across steps and by CUDA graphs)."""

    def __init__(self, token_lora_indices: torch.Tensor, sorted_token_ids: torch.Tensor,
                 num_tokens_per_lora: torch.Tensor, lora_token_start: torch.Tensor, lora_ranks: torch.Tensor):
        self.token_lora_indices = token_lora_indices  # [max_num_tokens] int32, slot of each token, -1 = none
        self.sorted_token_ids = sorted_token_ids  # [max_num_tokens] int32, token ids grouped by slot, stable
        self.num_tokens_per_lora = num_tokens_per_lora  # [max_loras] int32
        self.lora_token_start = lora_token_start  # [max_loras + 1] int32, exclusive cumsum of the counts
        self.lora_ranks = lora_ranks  # [max_loras] int32, 0 = empty slot
        self.max_num_tokens = token_lora_indices.shape[0]
        self.max_loras = num_tokens_per_lora.shape[0]
        device = token_lora_indices.device
        # Scratch kept across steps so that prepare allocates as little as possible inside a graph.
        self._counts = torch.zeros(self.max_loras + 1, dtype=torch.int32, device=device)  # last = no adapter
        self._ones = torch.ones(self.max_num_tokens, dtype=torch.int32, device=device)
        self._arange = torch.arange(self.max_num_tokens, dtype=torch.int32, device=device)

    @classmethod
    def allocate(cls, max_num_tokens: int, max_loras: int, device) -> "LoRAKernelMeta":
        if max_num_tokens <= 0 or max_loras <= 0:
            raise ValueError(f"LoRAKernelMeta.allocate: max_num_tokens ({max_num_tokens}) and max_loras "
                             f"({max_loras}) must be positive")
        device = torch.device(device)

        def i32(n: int, fill: int) -> torch.Tensor:
            return torch.full((n,), fill, dtype=torch.int32, device=device)

        meta = cls(i32(max_num_tokens, -1), torch.arange(max_num_tokens, dtype=torch.int32, device=device),
                   i32(max_loras, 0), i32(max_loras + 1, 0), i32(max_loras, 0))
        return meta

    @property
    def device(self) -> torch.device:
        return self.token_lora_indices.device

    def set_rank(self, slot: int, rank: int) -> None:
        """Record the rank of the adapter now in ``slot`` (0 frees it); kernels skip rank columns past it."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRAKernelMeta.set_rank: slot {slot} is outside [0, {self.max_loras})")
        if rank < 0:
            raise ValueError(f"LoRAKernelMeta.set_rank: rank must be >= 0, got {rank}")
        self.lora_ranks[slot] = rank

    def prepare(self, token_lora_indices: torch.Tensor) -> None:
        """Load this step's slot per token and regroup tokens by slot, on device and without a host sync.

        token_lora_indices: [num_tokens], any int dtype, any device. Slots outside [0, max_loras) count as
        "no adapter". Entries past num_tokens are reset to -1, so a smaller batch never sees stale rows.
        """
        if token_lora_indices.dim() != 1:
            raise ValueError(f"LoRAKernelMeta.prepare: token_lora_indices must be 1-D, got "
                             f"{tuple(token_lora_indices.shape)}")
        if token_lora_indices.is_floating_point() or token_lora_indices.is_complex() \
                or token_lora_indices.dtype == torch.bool:
            raise ValueError(f"LoRAKernelMeta.prepare: token_lora_indices must be an int tensor, got "
                             f"{token_lora_indices.dtype}")
        n = token_lora_indices.shape[0]
        if n > self.max_num_tokens:
            raise ValueError(f"LoRAKernelMeta.prepare: {n} tokens exceed max_num_tokens {self.max_num_tokens}")
        idx = self.token_lora_indices  # [max_num_tokens]
        idx[:n].copy_(token_lora_indices)
        idx[n:].fill_(-1)
        idx.masked_fill_((idx < 0) | (idx >= self.max_loras), -1)
        # Sort key: the slot, with every "no adapter" row mapped past the last slot so they group at the end.
        key = torch.where(idx < 0, self.max_loras, idx)  # [max_num_tokens]
        self._counts.zero_()
        self._counts.scatter_add_(0, key.long(), self._ones)
        self.num_tokens_per_lora.copy_(self._counts[:-1])
        # lora_token_start[0] stays 0 from allocate (a scalar store would be a host-to-device copy, which
        # CUDA-graph capture refuses).
        torch.cumsum(self._counts[:-1], 0, dtype=torch.int32, out=self.lora_token_start[1:])
        # Rows past n all carry the largest key, so a stable sort of [:n] plus the identity for the rest
        # equals a stable sort of the whole buffer, at the cost of the live rows only.
        self.sorted_token_ids[:n].copy_(torch.argsort(key[:n], stable=True))
        self.sorted_token_ids[n:].copy_(self._arange[n:])

    def __repr__(self) -> str:
        return (f"LoRAKernelMeta(max_num_tokens={self.max_num_tokens}, max_loras={self.max_loras}, "
                f"device={self.device})")
