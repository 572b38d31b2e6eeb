"""LoRAManager: adapter registry, CPU LRU cache of loaded weights, and the max_loras GPU slots.

Names identify adapters. Each load creates a new immutable version; a sequence keeps the version it was
admitted with, so an in-place reload never changes a running request. Weights of a version live in the CPU
cache (max_cpu_loras, LRU, pinned memory on CUDA) and, while a batch needs them, in a GPU slot (max_loras).
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict

import torch

from loraplex.errors import LoRAAlreadyLoadedError, LoRALoadError, LoRANotFoundError
from loraplex.layers.linear import LoRAState
from loraplex.lora.adapter import LoRAModel, pack_adapter
from loraplex.lora.request import LoRARequest

logger = logging.getLogger("loraplex.lora")


class LoRAManager:
    def __init__(self, model, max_loras: int, max_lora_rank: int, max_cpu_loras: int, max_num_tokens: int,
                 device: torch.device, dtype: torch.dtype, plugin_manager=None, backend: str = "auto"):
        from loraplex.kernels.lora_meta import LoRAKernelMeta

        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.device = device
        self.dtype = dtype
        self.pm = plugin_manager
        self.state = LoRAState(LoRAKernelMeta.allocate(max_num_tokens, max_loras, device), max_loras,
                               max_lora_rank, backend)
        self.linears = {}
        for i in range(model.cfg.num_hidden_layers):
            for attr in sorted(set(model.LORA_MODULES.values())):
                module = next(m for m, a in model.LORA_MODULES.items() if a == attr)
                linear = model.lora_layer(i, module)
                linear.create_lora_slots(self.state, dtype)
                self.linears[(i, attr)] = linear
        self.adapters: dict[str, LoRAModel] = {}  # current version per name
        self.cpu_cache: OrderedDict[int, LoRAModel] = OrderedDict()  # id(version) -> version, LRU order
        self.slots: list[LoRAModel | None] = [None] * max_loras
        self.slot_refs = [0] * max_loras
        self.slot_ranks = [0] * max_loras
        self.slot_last_used = [0.0] * max_loras
        self.pinned: set[str] = set()
        self._versions = itertools.count(1)
        self.stats = {"cpu_hits": 0, "cpu_misses": 0, "gpu_hits": 0, "gpu_misses": 0, "load_seconds": 0.0,
                      "num_loads": 0}

    # ------------------------------------------------------------------ registry
    def _load(self, req: LoRARequest, version: int) -> LoRAModel:
        start = time.perf_counter()
        result = None
        if self.pm is not None:
            result = self.pm.hook.loraplex_load_adapter(lora_request=req)
        if result is None:
            from loraplex.lora.peft_loader import loraplex_load_adapter

            result = loraplex_load_adapter(req)
        config, tensors = result
        weights, rank = pack_adapter(self.model, config, tensors, req.lora_name, self.max_lora_rank,
                                     self.dtype, pin=self.device.type == "cuda")
        m = LoRAModel(req.lora_name, req.lora_int_id, version, req, rank, weights,
                      sum(t.numel() * t.element_size() for pair in weights.values() for t in pair))
        elapsed = time.perf_counter() - start
        self.stats["load_seconds"] += elapsed
        self.stats["num_loads"] += 1
        self._cache_put(m)
        if self.pm is not None:
            self.pm.hook.loraplex_adapter_loaded(lora_name=m.name, lora_path=m.path, tier="cpu",
                                                 load_time_s=elapsed)
        return m

    def add_lora(self, req: LoRARequest) -> LoRAModel:
        """Load (or reload in place) an adapter; raises typed errors and leaves the engine unchanged on failure."""
        current = self.adapters.get(req.lora_name)
        if current is not None and not req.load_inplace:
            if req.lora_path and current.path and req.lora_path != current.path:
                raise LoRAAlreadyLoadedError(
                    f"The lora adapter '{req.lora_name}' has already been loaded. If you want to load the adapter "
                    "in place, set 'load_inplace' to True.", req.lora_name)
            return current
        m = self._load(req, next(self._versions))
        if current is not None:
            self._retire(current)
        self.adapters[req.lora_name] = m
        return m

    def get_for_request(self, req: LoRARequest) -> LoRAModel:
        current = self.adapters.get(req.lora_name)
        if current is not None and not req.load_inplace:
            return current
        return self.add_lora(req)

    def remove_lora(self, name: str) -> bool:
        m = self.adapters.pop(name, None)
        if m is None:
            return False
        self.pinned.discard(name)
        self._retire(m)
        return True

    def _retire(self, m: LoRAModel) -> None:
        """Forget a version: running sequences keep it alive; its slot frees once they finish."""
        self.cpu_cache.pop(id(m), None)
        for s, occupant in enumerate(self.slots):
            if occupant is m and self.slot_refs[s] == 0:
                self._clear_slot(s)

    def list_loras(self) -> list[LoRARequest]:
        return [m.request for m in self.adapters.values()]

    def pin_lora(self, name: str) -> bool:
        if name not in self.adapters:
            raise LoRANotFoundError(f"The lora adapter '{name}' cannot be found.", name)
        self.pinned.add(name)
        return True

    # ------------------------------------------------------------------ CPU cache
    def _cache_put(self, m: LoRAModel) -> None:
        self.cpu_cache[id(m)] = m
        self.cpu_cache.move_to_end(id(m))
        while len(self.cpu_cache) > self.max_cpu_loras:
            victim = next((v for v in self.cpu_cache.values() if v.name not in self.pinned), None)
            if victim is None:
                break
            self.cpu_cache.pop(id(victim))
            victim.weights = None
            if self.pm is not None:
                self.pm.hook.loraplex_adapter_evicted(lora_name=victim.name, tier="cpu")

    def _materialize(self, m: LoRAModel) -> None:
        if m.is_materialized:
            self.stats["cpu_hits"] += 1
            if id(m) in self.cpu_cache:
                self.cpu_cache.move_to_end(id(m))
            return
        self.stats["cpu_misses"] += 1
        fresh = self._load(m.request, m.version)
        m.weights = fresh.weights
        self.cpu_cache.pop(id(fresh), None)
        if self.adapters.get(m.name) is m or any(s is m for s in self.slots):
            self._cache_put(m)

    # ------------------------------------------------------------------ GPU slots (scheduler interface)
    def slot_of(self, m: LoRAModel) -> int:
        for s, occupant in enumerate(self.slots):
            if occupant is m:
                return s
        raise LoRALoadError(f"adapter '{m.name}' is not in a GPU slot", m.name)

    def _free_slot(self) -> int | None:
        candidates = [s for s in range(self.max_loras) if self.slot_refs[s] == 0]
        if not candidates:
            return None
        empty = [s for s in candidates if self.slots[s] is None]
        if empty:
            return empty[0]
        unpinned = [s for s in candidates if self.slots[s].name not in self.pinned]
        return min(unpinned or candidates, key=lambda s: self.slot_last_used[s])

    def can_acquire(self, m: LoRAModel) -> bool:
        return any(o is m for o in self.slots) or self._free_slot() is not None

    def acquire(self, m: LoRAModel) -> int:
        for s, occupant in enumerate(self.slots):
            if occupant is m:
                self.stats["gpu_hits"] += 1
                break
        else:
            s = self._free_slot()
            if s is None:
                raise RuntimeError("no free LoRA slot; the scheduler must call can_acquire first")
            self.stats["gpu_misses"] += 1
            self._materialize(m)
            self._upload(s, m)
        self.slot_refs[s] += 1
        self.slot_last_used[s] = time.monotonic()
        return s

    def release(self, m: LoRAModel) -> None:
        s = self.slot_of(m)
        self.slot_refs[s] -= 1
        if self.slot_refs[s] == 0 and self.adapters.get(m.name) is not m:
            self._clear_slot(s)  # a retired version: free it as its last request ends

    def _upload(self, s: int, m: LoRAModel) -> None:
        prev_rank = self.slot_ranks[s]
        if self.slots[s] is not None and self.pm is not None:
            self.pm.hook.loraplex_adapter_evicted(lora_name=self.slots[s].name, tier="gpu")
        for key, linear in self.linears.items():
            pair = m.weights.get(key)
            r = pair[0].shape[1] if pair is not None else 0
            if pair is not None:
                linear.lora_a[:, s, :r].copy_(pair[0], non_blocking=True)
                linear.lora_b[s, :, :r].copy_(pair[1], non_blocking=True)
            if prev_rank > r:
                linear.lora_a[:, s, r:prev_rank].zero_()
                linear.lora_b[s, :, r:prev_rank].zero_()
        self.slots[s] = m
        self.slot_ranks[s] = m.rank
        self.state.meta.set_rank(s, m.rank)

    def _clear_slot(self, s: int) -> None:
        self.slots[s] = None
        self.slot_last_used[s] = 0.0

    @property
    def num_gpu_loras(self) -> int:
        return sum(o is not None for o in self.slots)

    @property
    def num_cpu_loras(self) -> int:
        return len(self.cpu_cache)
