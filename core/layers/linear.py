"""Linear layers that pack several HF projections (q/k/v, gate/up) into one matmul, with LoRA on top.

A packed layer keeps its slices' output offsets so that LoRA weights of each HF module land in the right
columns and all slices go through one shrink and one expand launch. The LoRA weights are views of the adapter
pool (loraplex.lora.device_pool); the per-step metadata comes from the model's LoRAState.
"""
from __future__ import annotations

import torch
from torch import nn

from loraplex.kernels.lora_ops import add_lora, lora_buffer, lora_expand, lora_shrink


class Linear(nn.Module):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 names: list[str] | None = None, dtype=None, device=None, fused_name: str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_sizes = list(out_sizes)
        self.out_features = sum(out_sizes)
        # HF module names of the slices, e.g. ["q_proj", "k_proj", "v_proj"]
        self.names = list(names or [])
        # The HF module that holds every slice at once where a checkpoint fuses them (Phi-3's qkv_proj).
        self.fused_name = fused_name
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self.offsets = offsets
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.lora_state = None  # loraplex.lora.state.LoRAState, shared by every LoRA layer of the model
        self.lora_a: torch.Tensor | None = None  # [num_slices, num_pages, in_features], a view of the pool
        self.lora_b: torch.Tensor | None = None  # [num_pages, out_features], B transposed, a view of the pool
        self.lora_slice_offsets: torch.Tensor | None = None  # [num_slices + 1] int32

    def slice_of(self, name: str) -> int:
        return self.names.index(name)

    def attach_lora(self, state, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Read LoRA weights from these pool views from now on; the pool is allocated once, so loading an
        adapter or running a step never allocates."""
        self.lora_state = state
        self.lora_a, self.lora_b = lora_a, lora_b
        self.lora_slice_offsets = torch.tensor(self.offsets, dtype=torch.int32, device=self.weight.device)

    def load_weight(self, name: str, tensor: torch.Tensor, kind: str = "weight") -> None:
        """Copy one HF module's weight (or bias) into its slice, or into all of them for the fused module."""
        if name == self.fused_name:
            lo, hi = 0, self.out_features
        else:
            i = self.slice_of(name) if self.names else 0
            lo, hi = self.offsets[i], self.offsets[i + 1]
        target = self.weight if kind == "weight" else self.bias
        if target is None:
            raise ValueError(f"{name} has no {kind}")
        expected = (hi - lo, self.in_features) if kind == "weight" else (hi - lo,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name}.{kind}: checkpoint shape {tuple(tensor.shape)} != model shape {expected}")
        target.data[lo:hi].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        state = self.lora_state
        if state is None or not state.is_active:
            return nn.functional.linear(x, self.weight, self.bias)
        if state.side_stream is None or not x.is_cuda:
            y = nn.functional.linear(x, self.weight, self.bias)
            add_lora(y, x, self.lora_a, self.lora_b, state.meta, self.lora_slice_offsets, backend=state.backend)
            return y
        # Fork: shrink on the side stream while the matmul runs; join before the expand adds into y. The scratch
        # is allocated on the main stream, which waits for the side stream before reusing anything.
        buf = lora_buffer(x, self.lora_a, state.meta, state.backend)  # [num_splits, num_slices, num_tokens, max_rank]
        main = torch.cuda.current_stream(x.device)
        state.side_stream.wait_stream(main)
        with torch.cuda.stream(state.side_stream):
            lora_shrink(x, self.lora_a, buf, state.meta, backend=state.backend)
        y = nn.functional.linear(x, self.weight, self.bias)
        main.wait_stream(state.side_stream)
        lora_expand(buf, self.lora_b, y, state.meta, self.lora_slice_offsets, backend=state.backend)
        return y
