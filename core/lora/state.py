"""LoRAState: the one owner of the per-step LoRA metadata, shared by every LoRA linear of a model.

As vLLM's PunicaWrapper: the kernel backend is chosen once here, the model runner and the CUDA-graph runner hand
it each step's adapter entry per token (``set_batch``), and the layers read ``meta``, ``backend`` and
``side_stream`` from it.
"""
from __future__ import annotations

import torch

from loraplex import envs
from loraplex.kernels.lora_meta import LoRAKernelMeta
from loraplex.kernels.lora_ops import resolve_backend


class LoRAState:
    """:param max_num_tokens: tokens in the largest step. :param max_loras: distinct adapters in one step.
    :param max_rank: pages per adapter. :param max_entries: adapters resident in the pool at once."""

    def __init__(self, max_num_tokens: int, max_loras: int, max_rank: int, max_entries: int,
                 device: torch.device, backend: str = "auto"):
        self.meta = LoRAKernelMeta(max_num_tokens, max_loras, max_rank, max_entries, device)
        self.max_loras = max_loras
        self.max_rank = max_rank
        # Resolved once: an eager prefill makes hundreds of LoRA calls, each of which would re-read the env.
        self.backend = resolve_backend("LoRAState", backend, self.meta.token_lora_indices)
        # Set per step: a batch with no adapter rows skips LoRA entirely.
        self.is_active = False
        # Shrinks run here, overlapping the base matmul: at decode both are latency bound, not bandwidth bound.
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" and envs.lora_side_stream() else None

    def set_batch(self, token_entry_ids: list[int]) -> None:
        """An eager step: the pool entry of each token (-1 = base model)."""
        self.is_active = any(i >= 0 for i in token_entry_ids)
        if self.is_active:
            ids = torch.tensor(token_entry_ids, dtype=torch.int32)
            self.meta.prepare(ids.to(self.meta.device, non_blocking=True))

    def set_batch_tensor(self, token_entry_ids: torch.Tensor) -> None:
        """A CUDA-graph step: entries already in a device buffer; LoRA stays on (rows of -1 are skipped)."""
        self.is_active = True
        self.meta.prepare(token_entry_ids)
