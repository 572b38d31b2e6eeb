"""LoRAModel: one immutable version of an adapter, and where its weights are (loading, host cache, device pool).

Reading, validating and packing an adapter's tensors into the pool's page layout is loraplex.lora.plan.
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

import torch

from loraplex.lora.request import LoRARequest


@dataclass(eq=False)
class LoRAModel:
    """One immutable version of an adapter and where its weights are: loading, in the host cache, in the device
    pool. Only the engine thread reads or writes the placement fields."""

    name: str
    lora_int_id: int
    version: int
    request: LoRARequest
    rank: int = 0
    num_bytes: int = 0
    # Host cache: the packed [rank, page_elems] buffer, and the event of an upload still reading it.
    host: torch.Tensor | None = field(default=None, repr=False)
    host_event: object = field(default=None, repr=False)
    is_loading: bool = False
    error: Exception | None = field(default=None, repr=False)  # the last load's failure
    # Device pool: entry id (-1 = not resident), its pages, the upload's event until it completes, and how many
    # running sequences use it.
    entry: int = -1
    pages: list[int] = field(default_factory=list, repr=False)
    device_event: object = field(default=None, repr=False)
    num_refs: int = 0
    num_waiting: int = 0  # waiting sequences that hold this version (the scheduler counts them)
    last_used: int = 0  # manager clock, for LRU
    is_fresh_load: bool = False  # loaded from storage and not yet uploaded (cache statistics)
    is_fresh_upload: bool = False  # uploaded and not yet used
    # Completes when this version is loaded and registered (add_lora / add_lora_async).
    future: concurrent.futures.Future | None = field(default=None, repr=False)
    # LoRA outside the page pool (AdapterPlan.tower: towers, projectors, MoE experts): path -> (A, B) on the host,
    # and on the device once used.
    tower: dict = field(default_factory=dict, repr=False)
    tower_device: dict | None = field(default=None, repr=False)
    has_lm: bool = True  # False: the adapter targets only the tower (its decoder page is zero and is not run)
    has_experts: bool = False  # some of ``tower`` is MoE expert LoRA: its steps run eager

    @property
    def path(self) -> str:
        return self.request.lora_path

    @property
    def is_on_host(self) -> bool:
        return self.host is not None

    @property
    def is_on_device(self) -> bool:
        return self.entry >= 0

    @property
    def is_materialized(self) -> bool:
        """Weights are somewhere in memory (host cache or device pool): no read from storage needed."""
        return self.is_on_host or self.is_on_device
