"""Linear layers that pack several HF projections (q/k/v, gate/up) into one matmul, with LoRA on top.

A packed layer keeps its slices' output offsets so that LoRA weights of each HF module land in the right
columns and all slices go through one shrink and one expand launch. The LoRA weights are views of the adapter
pool (loraplex.lora.device_pool); the per-step metadata comes from the model's LoRAState.

A quantized base (loraplex.models.quant) keeps the weight as buffers of its format (4-bit codes, FP8 weights and
scales) instead of ``weight``; LoRA is added on top of its output exactly as on a float weight.
"""
from __future__ import annotations

import torch
from torch import nn

from loraplex.kernels.lora_ops import add_lora, lora_buffer, lora_expand, lora_shrink
from loraplex.layers import bnb4, fp8, gguf_quant


class Linear(nn.Module):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 names: list[str] | None = None, dtype=None, device=None, fused_name: str | None = None,
                 tp=None, parallel: str | None = None):
        super().__init__()
        # Tensor parallelism (loraplex.distributed.TensorParallel): "column" layers hold this rank's rows of each
        # slice, "row" layers its columns, their outputs summed over the ranks. The sizes given are this rank's.
        self.tp = tp if tp is not None and tp.is_parallel else None
        self.parallel = parallel if self.tp is not None else None
        if self.parallel == "row" and bias:
            raise ValueError("a row-parallel linear with a bias is not supported")
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
        # A quantized base (loraplex.models.quant): the weight object (Bnb4Weight, Fp8Weight, GgufWeight) that reads
        # this layer's buffers in place of ``weight``; and each slice's unpacked tensors until all have come.
        self.quant = None
        self._quant_parts: dict[str, tuple] = {}

    @property
    def device(self) -> torch.device:
        return self.weight.device if self.quant is None else getattr(self, self._quant_buffer).device

    def slice_of(self, name: str) -> int:
        return self.names.index(name)

    def attach_lora(self, state, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Read LoRA weights from these pool views from now on; the pool is allocated once, so loading an
        adapter or running a step never allocates."""
        self.lora_state = state
        self.lora_a, self.lora_b = lora_a, lora_b
        self.lora_slice_offsets = torch.tensor(self.offsets, dtype=torch.int32, device=self.device)

    def load_weight(self, name: str, tensor: torch.Tensor, kind: str = "weight") -> None:
        """Copy one HF module's weight (or bias) into its slice, or into all of them for the fused module."""
        lo, hi = self._slice_rows(name)
        if self.parallel == "column" or (self.parallel == "row" and kind == "weight"):
            dim = 0 if self.parallel == "column" else 1
            full = (hi - lo if dim == 0 else self.in_features) * self.tp.world_size
            if tensor.shape[dim] != full:
                raise ValueError(f"{name}.{kind}: checkpoint shape {tuple(tensor.shape)}: dim {dim} is not {full}")
            tensor = tensor.chunk(self.tp.world_size, dim)[self.tp.rank]  # this rank's share
        target = self.weight if kind == "weight" else self.bias
        if target is None:
            raise ValueError(f"{name} has no {kind}")
        expected = (hi - lo, self.in_features) if kind == "weight" else (hi - lo,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name}.{kind}: checkpoint shape {tuple(tensor.shape)} != model shape {expected}")
        target.data[lo:hi].copy_(tensor)

    def _slice_rows(self, name: str) -> tuple[int, int]:
        if name == self.fused_name:
            return 0, self.out_features
        i = self.slice_of(name) if self.names else 0
        return self.offsets[i], self.offsets[i + 1]

    def load_quantized(self, name: str, parts: dict[str, torch.Tensor], spec) -> None:
        """One HF module's quantized weight: "weight" and the tensors beside it (bitsandbytes' quant state, FP8's
        scales, the GGUF type). The layer turns quantized when every slice has come."""
        lo, hi = self._slice_rows(name)
        unpack = {"bitsandbytes": bnb4.unpack, "fp8": fp8.unpack, "gguf": gguf_quant.unpack}[spec.method]
        self._quant_parts[name] = unpack(parts, (hi - lo, self.in_features), name)
        covered = [self.fused_name] if self.fused_name in self._quant_parts else (self.names or [name])
        if not all(n in self._quant_parts for n in covered):
            return
        pieces = [self._quant_parts.pop(n) for n in covered]
        if spec.method == "bitsandbytes":
            rows = [self._slice_rows(n)[1] - self._slice_rows(n)[0] for n in covered]
            self._set_quantized(*bnb4.Bnb4Weight.stack(pieces, rows, self.in_features, covered))
        elif spec.method == "gguf":
            stacked = gguf_quant.GgufWeight.stack(pieces)
            if stacked is not None:
                self._set_quantized(*stacked)
                return
            # Slices of several types, or a type kept only dequantized: this layer loads as floats.
            for n, (blocks, qtype) in zip(covered, pieces):
                self.load_weight(n, gguf_quant.dequantize_any(blocks, qtype))
        else:
            self._set_quantized(*fp8.Fp8Weight.stack(pieces, spec.act_strategy, spec.is_act_dynamic))

    def quantize_(self, spec) -> None:
        """Quantize the float weight in place (a float checkpoint with quantization="bitsandbytes" / "fp8")."""
        if spec.method == "bitsandbytes":
            codes, absmax = bnb4.quantize(self.weight.data, spec.quant_type, spec.blocksize)
            self._set_quantized(bnb4.Bnb4Weight((self.out_features, self.in_features), spec.quant_type,
                                                spec.blocksize), {"qcodes": codes, "qabsmax": absmax})
        else:
            weight, scale = fp8.quantize(self.weight.data)
            # Per-channel weight scales; activations as the spec says, their scales computed per step.
            self._set_quantized(fp8.Fp8Weight(spec.act_strategy, True), {"qweight": weight, "qscale": scale})

    def _set_quantized(self, quant, buffers: dict[str, torch.Tensor]) -> None:
        device = self.weight.device
        self.quant = quant
        for key, tensor in buffers.items():
            self.register_buffer(key, tensor.to(device))
        self._quant_buffer = next(iter(buffers))
        del self.weight  # the float weight is not kept: that is the memory a quantized base saves
        self.weight = None

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.matmul(self, x)
        return nn.functional.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features]
        y = self._forward(x)
        return self.tp.all_reduce(y) if self.parallel == "row" else y  # the ranks' partial sums

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.lora_state
        if state is None or not state.is_active:
            return self._base(x)
        if state.side_stream is None or not x.is_cuda:
            y = self._base(x)
            add_lora(y, x, self.lora_a, self.lora_b, state.meta, self.lora_slice_offsets, backend=state.backend)
            return y
        # Fork: shrink on the side stream while the matmul runs; join before the expand adds into y. The scratch
        # is allocated on the main stream, which waits for the side stream before reusing anything.
        buf = lora_buffer(x, self.lora_a, state.meta, state.backend)  # [num_splits, num_slices, num_tokens, max_rank]
        main = torch.cuda.current_stream(x.device)
        state.side_stream.wait_stream(main)
        with torch.cuda.stream(state.side_stream):
            lora_shrink(x, self.lora_a, buf, state.meta, backend=state.backend)
        y = self._base(x)
        main.wait_stream(state.side_stream)
        lora_expand(buf, self.lora_b, y, state.meta, self.lora_slice_offsets, backend=state.backend)
        return y

