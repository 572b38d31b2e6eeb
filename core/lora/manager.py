"""LoRAManager: the multi-adapter runtime, kept off the engine thread's critical path.

Its parts, one module each:

- ``LoRARegistry`` (registry.py): adapter names, their current version, loads in flight.
- ``AdapterLoader`` (loader.py): worker threads read, validate and pack adapters into host buffers.
- ``HostCache`` (host_cache.py): packed adapters in host memory (pinned on CUDA), LRU, ``max_cpu_loras``.
- ``DevicePool`` (device_pool.py): resident adapters in rank-row pages on the device; uploads on a side stream.
- ``LoRAState`` (state.py): the per-step kernel metadata every LoRA layer reads.

The engine thread never reads a file nor waits on a load or an upload: ``get_for_request`` only registers (and
queues a load for an unknown adapter); ``poll`` takes finished loads and uploads; ``prefetch`` starts loads and
uploads for the adapters that waiting requests will want, in the order the scheduler will want them, evicting
first what nobody waits for; the scheduler admits a request once ``is_ready`` says its adapter is resident.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time

import torch

from loraplex.errors import InvalidRequestError, LoRAError, LoRALoadError
from loraplex.lora.adapter import LoRAModel
from loraplex.lora.plan import pack_pages, plan_adapter
from loraplex.lora.device_pool import DevicePool
from loraplex.lora.host_cache import HostBufferPool, HostCache
from loraplex.lora.layout import PageLayout
from loraplex.lora.loader import AdapterLoader, InlineLoader, ProcessLoader
from loraplex.lora.registry import LoRARegistry
from loraplex.lora.request import LoRARequest
from loraplex.lora.state import LoRAState

logger = logging.getLogger("loraplex.lora")


def pool_pages(layout: PageLayout, args, device: torch.device, dtype: torch.dtype, budget_bytes: int | None) -> int:
    """Pages of the device pool: ``max_gpu_loras`` adapters of ``max_lora_rank`` when given (fewer than
    max_loras is fine: lower ranks share it); else, on CUDA, ``lora_memory_fraction`` of the memory left after
    the weights (budget_bytes), and at least room for ``max_loras`` adapters of ``max_lora_rank``; on the CPU
    that minimum."""
    floor = args.max_loras * args.max_lora_rank
    if args.max_gpu_loras is not None:
        return args.max_gpu_loras * args.max_lora_rank
    if device.type != "cuda" or budget_bytes is None:
        return floor
    return max(floor, int(budget_bytes * args.lora_memory_fraction) // layout.page_bytes(dtype))


class LoRAManager:
    """:param model: the base model (``LORA_MODULES``, ``lora_layer``). :param args: the EngineArgs (``max_loras``,
    ``max_lora_rank``, ``max_cpu_loras``, ``num_lora_loader_workers``). :param num_pages: device pool size in rank
    rows (see pool_pages). :param max_num_tokens: tokens in the largest step."""

    def __init__(self, model, args, device: torch.device, dtype: torch.dtype, num_pages: int, max_num_tokens: int,
                 plugin_manager=None, layout: PageLayout | None = None):
        self.model = model
        self.max_loras = args.max_loras
        self.max_lora_rank = args.max_lora_rank
        self.max_cpu_loras = args.max_cpu_loras
        self.device = device
        self.dtype = dtype
        self.pm = plugin_manager
        self.layout = layout or PageLayout(model)
        max_entries = num_pages  # every resident adapter takes at least one page
        self.state = LoRAState(max_num_tokens, self.max_loras, self.max_lora_rank, max_entries, device)
        self.pool = DevicePool(self.layout, num_pages, max_entries, dtype, device, self.state.meta)
        for key, linear in self.layout.linears.items():
            linear.attach_lora(self.state, *self.pool.views[key])
        # Tensor-parallel ranks each run the engine: loads and uploads complete at steps the requests fix, so
        # that every rank schedules the same batches (loraplex.distributed).
        self.is_deterministic = getattr(model.cfg, "tp_size", 1) > 1
        self.loader_kind = "inline" if self.is_deterministic else args.lora_loader if args.lora_loader != "auto" \
            else ("process" if device.type == "cuda" else "thread")
        buffers = HostBufferPool(self.layout.page_elems, dtype, pin=device.type == "cuda",
                                 shared=self.loader_kind == "process")
        self.host = HostCache(self.max_cpu_loras, buffers)
        self.num_loader_workers = args.num_lora_loader_workers
        if self.loader_kind == "process":
            self.loader = ProcessLoader(self.num_loader_workers, self._load_job, self.layout, self.max_lora_rank,
                                        buffers)
        elif self.loader_kind == "inline":
            self.loader = InlineLoader(self._load_job)
        else:
            self.loader = AdapterLoader(self.num_loader_workers, self._load_job)
        self.registry = LoRARegistry()
        self.num_active = 0  # adapters used by running sequences (the scheduler caps it at max_loras)
        self.epoch = 0  # bumped when something the scheduler's admission or prefetch depends on changes
        self._clock = 0
        self._uploading: list[LoRAModel] = []
        self._failed: list[LoRAModel] = []
        self._position: dict[int, int] = {}  # wanted order of the last prefetch: id(version) -> position
        # Called (engine thread) when a load registers a name, before its add_lora future completes.
        self.on_registry_change = None
        self.stats = {"num_loads": 0, "load_seconds": 0.0, "max_load_seconds": 0.0, "num_load_errors": 0,
                      "num_uploads": 0, "num_evictions": 0, "cpu_hits": 0, "cpu_misses": 0, "gpu_hits": 0,
                      "gpu_misses": 0, "engine_seconds": 0.0}
        logger.info("LoRA pool: %d pages of %.2f MB (%d adapters of rank %d), %d loader %ses", num_pages,
                    self.layout.page_bytes(dtype) / 1e6, num_pages // self.max_lora_rank, self.max_lora_rank,
                    self.num_loader_workers, self.loader_kind)

    # ------------------------------------------------------------------ registry (engine thread)
    @property
    def adapters(self) -> dict[str, LoRAModel]:
        """Current version per name."""
        return self.registry.current

    def get_for_request(self, req: LoRARequest) -> LoRAModel:
        """The version a new request runs with. An unknown adapter gets a new version that prefetch loads in
        queue order (never here); the request waits for it while the others run."""
        m, is_new = self.registry.lookup(req, check_path=False)
        if is_new:
            m.future = concurrent.futures.Future()
            self.epoch += 1
        return m

    def add_lora_async(self, req: LoRARequest) -> concurrent.futures.Future:
        """Load (or reload in place) an adapter in the loader; the future completes, in ``poll``, with the
        registered version or the typed error. The engine keeps serving meanwhile."""
        m, _ = self.registry.lookup(req, check_path=True)
        if self.registry.pending.get(m.name) is m and not m.is_loading:
            self._start_load(m)
        return m.future

    def add_lora(self, req: LoRARequest) -> LoRAModel:
        """Blocking add_lora_async; raises typed errors and leaves the engine unchanged on failure."""
        future = self.add_lora_async(req)
        while not future.done():
            self.loader.wait(0.05)
            self.poll()
        return future.result()

    def remove_lora(self, name: str) -> bool:
        was_pending = name in self.registry.pending
        m = self.registry.remove(name)
        if m is not None:
            self._drop_if_unused(m)
        self.epoch += 1
        return m is not None or was_pending

    def list_loras(self) -> list[LoRARequest]:
        return [m.request for m in self.registry.current.values()]

    def pin_lora(self, name: str) -> bool:
        """Keep an adapter in the host cache and, once resident, in the device pool. Refused when the pinned
        adapters would leave no room for one more adapter of max_lora_rank in either: requests for the others
        could then never run."""
        m = self.registry.current.get(name)
        if m is not None and name not in self.registry.pinned:
            pinned = [v for v in self.registry.current.values() if v.name in self.registry.pinned]
            if sum(v.rank for v in pinned) + m.rank > self.pool.num_pages - self.max_lora_rank \
                    or len(pinned) + 1 > self.max_cpu_loras - 1:
                raise InvalidRequestError(
                    f"cannot pin the lora adapter '{name}': the pinned adapters would fill the device pool "
                    f"({self.pool.num_pages} rank rows) or the CPU cache (max_cpu_loras={self.max_cpu_loras}); "
                    "raise max_gpu_loras / max_cpu_loras or unpin another")
        self.registry.pin(name)
        return True

    def _is_retired(self, m: LoRAModel) -> bool:
        reg = self.registry
        return reg.current.get(m.name) is not m and reg.pending.get(m.name) is not m

    def _drop_if_unused(self, m: LoRAModel) -> None:
        """Free a retired version's memory once no sequence holds it (waiting ones would have to reload it, and
        an in-place reload may have replaced its files)."""
        if not self._is_retired(m) or m.num_refs or m.num_waiting:
            return
        if m.is_on_device and m.device_event is None:
            self.pool.evict(m)
        if m.is_on_host and not self.host.is_busy(m):
            self.host.remove(m)

    # ------------------------------------------------------------------ loading
    def _start_load(self, m: LoRAModel) -> None:
        m.is_loading = True
        if m.future is None:
            m.future = concurrent.futures.Future()
        self.host.num_reserved += 1
        self.loader.submit(m)

    def _load_job(self, m: LoRAModel):
        """Loader thread: read, validate, pack. Returns (host buffer, rank, bytes read)."""
        from loraplex.lora.peft_loader import check_allowed, loraplex_load_adapter

        req = m.request
        # Every read from storage, reloads after a CPU-cache eviction included: the allowlist the request
        # carries (the server's --allowed-lora-paths) is checked now, not only at its first load.
        check_allowed(req)
        result = None
        if self.pm is not None:
            result = self.pm.hook.loraplex_load_adapter(lora_request=req)
        if result is None:
            result = loraplex_load_adapter(req)
        config, tensors = result
        plan = plan_adapter(self.layout, config, tensors, m.name, self.max_lora_rank)
        buf = self.host.buffers.get(plan.rank)
        try:
            pack_pages(plan, self.layout, buf)
        except BaseException:
            self.host.buffers.put(buf)
            raise
        return buf, plan.rank, plan.num_bytes, plan.tower, bool(plan.pieces)

    def poll(self) -> None:
        """Engine thread, every step: take finished loads (register them, or record their failure for the
        engine to fail their requests) and finished uploads."""
        start = time.perf_counter()
        for res in self.loader.drain():
            m = res.version
            m.is_loading = False
            self.host.num_reserved -= 1
            self.epoch += 1
            self.stats["num_loads"] += 1
            self.stats["load_seconds"] += res.seconds
            self.stats["max_load_seconds"] = max(self.stats["max_load_seconds"], res.seconds)
            if res.error is not None:
                self._load_failed(m, res.error)
                continue
            m.rank, m.num_bytes, m.error = res.rank, res.num_bytes, None
            m.tower = res.tower
            m.has_experts = any(".mlp.experts." in path for path in res.tower)
            m.has_lm = res.has_lm
            m.is_fresh_load = True
            self._host_put(m, res.buf)
            old = self.registry.commit(m)
            if old is not None:
                self._drop_if_unused(old)
            if self.on_registry_change is not None and self.registry.current.get(m.name) is m:
                self.on_registry_change()  # before the future: whoever awaited it sees the name registered
            if not m.future.done():
                m.future.set_result(m)
            if self.pm is not None:
                self.pm.hook.loraplex_adapter_loaded(lora_name=m.name, lora_path=m.path, tier="cpu",
                                                     load_time_s=res.seconds)
            self._drop_if_unused(m)  # removed while it loaded, and nobody waits for it
        if self._uploading:
            still = []
            for m in self._uploading:
                if m.device_event is not None and m.device_event.query():
                    m.device_event = None
                    self.epoch += 1
                    self._drop_if_unused(m)
                if m.device_event is not None:
                    still.append(m)
            self._uploading = still
        self.stats["engine_seconds"] += time.perf_counter() - start

    def _load_failed(self, m: LoRAModel, error: BaseException) -> None:
        if not isinstance(error, LoRAError):
            error = LoRALoadError(f"adapter '{m.name}': loading failed: {type(error).__name__}: {error}", m.name)
        m.error = error
        self.stats["num_load_errors"] += 1
        self.registry.forget_pending(m)
        if not m.future.done():
            m.future.set_exception(error)
        logger.warning("LoRA adapter %r failed to load: %s", m.name, error)
        self._failed.append(m)

    def take_failed(self) -> list[LoRAModel]:
        """Versions whose load failed since the last call; their waiting requests must fail (with m.error)."""
        failed, self._failed = self._failed, []
        return failed

    def has_inflight(self) -> bool:
        return self.loader.num_in_flight > 0 or bool(self._uploading)

    def wait_for_progress(self, timeout: float) -> None:
        """An idle engine waits here for a load or an upload to finish (at most timeout seconds)."""
        if self.loader.num_in_flight:
            self.loader.wait(timeout)
        elif self._uploading:
            self._uploading[0].device_event.synchronize()

    def _host_put(self, m: LoRAModel, buf: torch.Tensor) -> None:
        # Prefetch keeps its loads within capacity; a load a caller asked for (add_lora, an unknown adapter)
        # may not be, and then makes room as prefetch would have.
        while len(self.host) >= self.host.capacity:
            victim = self._host_victim(self._position, -1)
            if victim is None:
                break  # everything cached is pinned or uploading: run over capacity until they free up
            self._evict_host(victim)
        self.host.add(m, buf)

    # ------------------------------------------------------------------ prefetch (engine thread)
    def prefetch(self, wanted: list[LoRAModel]) -> None:
        """Start loads and uploads for ``wanted`` (distinct versions of waiting requests, in the order the
        scheduler will want them): uploads while the pool has room without evicting an adapter wanted sooner
        or in use, loads while the host cache does and at most 2 per loader thread are in flight."""
        start = time.perf_counter()
        position = self._position = {id(m): i for i, m in enumerate(wanted)}
        is_device_full = False
        max_loads = 2 * self.num_loader_workers
        for i, m in enumerate(wanted):
            if m.is_on_device:
                continue
            if m.is_on_host:
                if not is_device_full and self._make_device_room(m.rank, position, i):
                    self._upload(m)
                else:
                    is_device_full = True
                continue
            if m.is_loading:
                continue
            if self.loader.num_in_flight >= max_loads:
                break
            if self.host.num_free <= 0:
                victim = self._host_victim(position, i)
                if victim is None:
                    break
                self._evict_host(victim)
            self.stats["cpu_misses"] += 1
            self._start_load(m)
        self.stats["engine_seconds"] += time.perf_counter() - start

    def _upload(self, m: LoRAModel) -> None:
        if m.is_fresh_load:
            m.is_fresh_load = False
        else:
            self.stats["cpu_hits"] += 1
        self.pool.upload(m)
        m.is_fresh_upload = True
        self.host.touch(m)
        self.stats["num_uploads"] += 1
        if m.device_event is not None and self.is_deterministic:
            m.device_event.synchronize()  # resident now, on every rank alike
            m.device_event = m.host_event = None
        if m.device_event is not None:
            self._uploading.append(m)
        self.epoch += 1

    def _evictable(self, m: LoRAModel) -> bool:
        return m.num_refs == 0 and m.device_event is None and not self.registry.is_pinned(m)

    def _make_device_room(self, rank: int, position: dict, i: int) -> bool:
        """Evict until ``rank`` pages and an entry are free, never an adapter in use, pinned, still uploading, or
        wanted at or before position i. Victims: adapters nobody waits for, least recently used first; then
        the one wanted last."""
        while not self.pool.can_fit(rank):
            victim = None
            for m in self.pool.resident.values():  # least recently used first
                if id(m) not in position and self._evictable(m):
                    victim = m
                    break
            if victim is None:
                later = [m for m in self.pool.resident.values()
                         if position.get(id(m), -1) > i and self._evictable(m)]
                if not later:
                    return False
                victim = max(later, key=lambda m: position[id(m)])
            self.pool.evict(victim)
            self.stats["num_evictions"] += 1
            self.epoch += 1
            if self.pm is not None:
                self.pm.hook.loraplex_adapter_evicted(lora_name=victim.name, tier="gpu")
            self._drop_if_unused(victim)
        return True

    def _host_victim(self, position: dict, i: int) -> LoRAModel | None:
        """The host copy to drop: one nobody waits for or already on the device, least recently used first; then
        the one wanted last after position i. Never pinned or still being uploaded."""
        later = None
        for m in self.host.entries.values():
            if self.registry.is_pinned(m) or self.host.is_busy(m):
                continue
            pos = position.get(id(m))
            if pos is None or m.is_on_device:
                return m
            if pos > i and (later is None or pos > position[id(later)]):
                later = m
        return later

    def _evict_host(self, m: LoRAModel) -> None:
        self.host.remove(m)
        if self.pm is not None:
            self.pm.hook.loraplex_adapter_evicted(lora_name=m.name, tier="cpu")

    # ------------------------------------------------------------------ scheduler interface (engine thread)
    @staticmethod
    def is_ready(m: LoRAModel) -> bool:
        """Resident on the device with its upload complete: a request with it can be admitted now."""
        return m.entry >= 0 and m.device_event is None

    def acquire(self, m: LoRAModel) -> int:
        """A sequence starts running with m (is_ready): returns its pool entry, which the sequence keeps."""
        if not self.is_ready(m):
            raise LoRALoadError(f"adapter '{m.name}' is not resident; the scheduler must check is_ready", m.name)
        if m.is_fresh_upload:
            m.is_fresh_upload = False
            self.stats["gpu_misses"] += 1
        else:
            self.stats["gpu_hits"] += 1
        m.num_refs += 1
        if m.num_refs == 1:
            self.num_active += 1
        self._touch(m)
        return m.entry

    def remove_waiting(self, m: LoRAModel) -> None:
        """A waiting sequence with m was admitted or finished (the scheduler counts m.num_waiting up itself)."""
        m.num_waiting -= 1
        if m.num_waiting == 0:
            if self.registry.pending.get(m.name) is m and not m.is_loading and not m.is_materialized:
                self.registry.forget_pending(m)  # its requests went away before prefetch loaded it
            self._drop_if_unused(m)

    def release(self, m: LoRAModel) -> None:
        m.num_refs -= 1
        if m.num_refs == 0:
            self.num_active -= 1
            self.epoch += 1
            self._touch(m)
            self._drop_if_unused(m)

    def _touch(self, m: LoRAModel) -> None:
        self._clock += 1
        m.last_used = self._clock
        if m.entry >= 0:
            self.pool.resident.move_to_end(m.entry)
        self.host.touch(m)

    @property
    def num_gpu_loras(self) -> int:
        return len(self.pool)

    @property
    def num_cpu_loras(self) -> int:
        return len(self.host)

    def close(self) -> None:
        self.loader.shutdown()
