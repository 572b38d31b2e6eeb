"""PageLayout: where every LoRA weight of one rank row sits inside a page of the adapter pool.

A page holds rank row j of one adapter for every LoRA-capable linear of the model, layer after layer: for each
packed linear (q/k/v, o, gate/up, down) the A rows of its slices ([num_slices, in_features]) and then its B
column j, transposed ([out_features], all slices). An adapter of rank r is r pages; the host packs it into a
[r, page_elems] buffer in exactly this layout, so moving it to the device is one copy per run of pages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Pages start on a 16-byte boundary for any dtype: the copy engines and vector loads like aligned rows.
_PAGE_ALIGN = 8


@dataclass(frozen=True)
class Segment:
    """One packed linear of one layer inside a page."""

    layer: int
    attr: str  # the linear's attribute path in a decoder layer, e.g. "self_attn.qkv_proj"
    names: tuple[str, ...]  # HF module of each slice, e.g. ("q_proj", "k_proj", "v_proj")
    in_features: int
    slice_offsets: tuple[int, ...]  # output column where each slice starts, plus the total
    a_offset: int  # first element of slice 0's A row
    b_offset: int  # first element of the B^T row
    # Tensor parallelism: "column" (this rank holds its share of each slice's B rows; A whole), "row" (its share
    # of A's input columns; B whole, the partial products summed with the base's), None. Sizes are this rank's.
    parallel: str | None = None

    @property
    def num_slices(self) -> int:
        return len(self.names)

    @property
    def out_features(self) -> int:
        return self.slice_offsets[-1]

    def a_span(self, module: str) -> tuple[int, int]:
        lo = self.a_offset + self.names.index(module) * self.in_features
        return lo, lo + self.in_features

    def b_span(self, module: str) -> tuple[int, int]:
        i = self.names.index(module)
        return self.b_offset + self.slice_offsets[i], self.b_offset + self.slice_offsets[i + 1]


class PageLayout:
    """The page layout of a model (``LORA_MODULES`` + ``lora_layer``), built once."""

    def __init__(self, model):
        self.num_layers = model.cfg.num_hidden_layers
        # This rank's share under tensor parallelism (loraplex.distributed): adapters are sliced as they pack.
        self.tp_rank, self.tp_size = getattr(model.cfg, "tp_rank", 0), getattr(model.cfg, "tp_size", 1)
        self.lora_modules = dict(model.LORA_MODULES)  # HF module -> packed linear attribute
        self.segments: dict[tuple[int, str], Segment] = {}
        self.linears = {}
        offset = 0
        attrs = sorted(set(self.lora_modules.values()))
        for layer in range(self.num_layers):
            for attr in attrs:
                module = next(m for m, a in self.lora_modules.items() if a == attr)
                try:
                    linear = model.lora_layer(layer, module)
                except AttributeError:  # not in this layer: a MoE model's dense MLP in a sparse layer, or back
                    continue
                seg = Segment(layer, attr, tuple(linear.names), linear.in_features, tuple(linear.offsets),
                              offset, offset + len(linear.names) * linear.in_features, linear.parallel)
                offset = seg.b_offset + seg.out_features
                self.segments[(layer, attr)] = seg
                self.linears[(layer, attr)] = linear
        self.used_elems = offset
        self.page_elems = -(-offset // _PAGE_ALIGN) * _PAGE_ALIGN
        # A multi-modal model's tower / projector Linears that adapters may target: path -> (in, out).
        targets = getattr(model, "tower_lora_targets", None)
        self.tower_linears: dict[str, tuple[int, int]] = targets() if targets is not None else {}
        # Sparse layers whose routed experts adapters may target: layer -> (num_experts, hidden, intermediate).
        shapes = getattr(model, "expert_lora_shapes", None)
        self.expert_layers: dict[int, tuple[int, int, int]] = shapes() if shapes is not None else {}
        # Every spelling an adapter may use for a tower path -> the model's own.
        self.tower_paths: dict[str, str] = {}
        for path in self.tower_linears:
            for alias in model.tower_aliases(path):
                self.tower_paths.setdefault(alias, path)

    def __getstate__(self) -> dict:
        # Sent to loader processes, which need the offsets only, not the model's modules.
        return {k: v for k, v in self.__dict__.items() if k != "linears"}

    def segment(self, layer: int, module: str) -> Segment:
        return self.segments[(layer, self.lora_modules[module])]

    def page_bytes(self, dtype: torch.dtype) -> int:
        return self.page_elems * torch.empty((), dtype=dtype).element_size()

    def views(self, pool: torch.Tensor) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, attr) -> (A [num_slices, num_pages, in_features], B^T [num_pages, out_features]) views of a
        [num_pages, page_elems] pool, in the layout the LoRA kernels take."""
        num_pages = pool.shape[0]
        out = {}
        for key, seg in self.segments.items():
            a = pool[:, seg.a_offset: seg.b_offset].view(num_pages, seg.num_slices, seg.in_features)
            out[key] = (a.permute(1, 0, 2), pool[:, seg.b_offset: seg.b_offset + seg.out_features])
        return out
