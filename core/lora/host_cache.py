"""HostCache: adapter versions whose packed pages are in host memory, LRU, at most max_cpu_loras of them.

Each cached version owns one [rank, page_elems] buffer in the pool's page layout, so its upload is one copy per
run of device pages. On CUDA the buffers are pinned, so that copy is a DMA on a side stream; HostBufferPool
recycles them by rank (an arena of whole-adapter buffers, never one pinned allocation per tensor).
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict

import torch

logger = logging.getLogger("loraplex.lora")


def _pinned(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Page-locked memory of exactly this size. torch's pinned allocator rounds every block up to a power of two
    (48.6 MB -> 64 MB), so pageable memory is registered with CUDA instead, falling back to that allocator when
    registration fails. Touched first: on an H200 host registering 48.6 MB took 27 ms untouched, 9-16 ms with the
    zeroing (torch's pinned allocator: 30 ms; benchmarks/probe_pinned.py)."""
    t = torch.zeros(rows, cols, dtype=dtype)
    try:
        cudart = torch.cuda.cudart()
        ptr = t.data_ptr()
        err = cudart.cudaHostRegister(ptr, t.numel() * t.element_size(), 0)
        if int(err) == 0 and t.is_pinned():
            weakref.finalize(t, cudart.cudaHostUnregister, ptr)
            return t
        if int(err) == 0:
            cudart.cudaHostUnregister(ptr)
    except Exception as e:  # no cudart binding, or registration refused
        logger.debug("cudaHostRegister failed (%s); using torch's pinned allocator", e)
    return t.pin_memory()


class HostBufferPool:
    """Whole-adapter host buffers [rank, page_elems], reused by rank. Thread-safe: loader threads take buffers,
    the engine thread returns them."""

    def __init__(self, page_elems: int, dtype: torch.dtype, pin: bool, max_free_bytes: int = 2 * 2**30):
        self.page_elems = page_elems
        self.dtype = dtype
        self.pin = pin
        self.max_free_bytes = max_free_bytes
        self._free: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.num_allocated = 0

    def get(self, rank: int) -> torch.Tensor:
        with self._lock:
            bufs = self._free.get(rank)
            if bufs:
                buf = bufs.pop()
                self._free_bytes -= buf.numel() * buf.element_size()
                return buf
            self.num_allocated += 1
        if self.pin:
            return _pinned(rank, self.page_elems, self.dtype)
        return torch.empty(rank, self.page_elems, dtype=self.dtype)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.shape[0], []).append(buf)
            self._free.move_to_end(buf.shape[0])
            self._free_bytes += buf.numel() * buf.element_size()
            while self._free_bytes > self.max_free_bytes:  # drop buffers of the least recently freed rank
                rank, bufs = next(iter(self._free.items()))
                dropped = bufs.pop(0)
                self._free_bytes -= dropped.numel() * dropped.element_size()
                if not bufs:
                    del self._free[rank]


class HostCache:
    """LRU of the versions held in host memory (engine thread only). Loads in flight hold a reservation, so
    that a finished load always has its place."""

    def __init__(self, capacity: int, buffers: HostBufferPool):
        self.capacity = capacity
        self.buffers = buffers
        self.entries: OrderedDict[int, object] = OrderedDict()  # id(version) -> LoRAModel, least recent first
        self.num_reserved = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_free(self) -> int:
        return self.capacity - len(self.entries) - self.num_reserved

    def add(self, m, buf: torch.Tensor) -> None:
        m.host = buf
        self.entries[id(m)] = m

    def touch(self, m) -> None:
        if id(m) in self.entries:
            self.entries.move_to_end(id(m))

    @staticmethod
    def is_busy(m) -> bool:
        """An upload still reads m's buffer."""
        ev = m.host_event
        if ev is not None and ev.query():
            m.host_event = ev = None
        return ev is not None

    def remove(self, m) -> None:
        """Drop m's buffer (never while an upload reads it: the caller checks is_busy)."""
        self.entries.pop(id(m), None)
        if m.host is not None:
            self.buffers.put(m.host)
            m.host = None
