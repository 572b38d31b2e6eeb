"""HostCache: adapter versions whose packed pages are in host memory, LRU, at most max_cpu_loras of them.

Each cached version owns one [rank, page_elems] buffer in the pool's page layout, so its upload is one copy per
run of device pages. On CUDA the buffers are pinned, so that copy is a DMA on a side stream; HostBufferPool
recycles them by rank (an arena of whole-adapter buffers, never one pinned allocation per tensor).
"""
from __future__ import annotations

import logging
import os
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
    return t if _register(t) else t.pin_memory()


_CUDART = None


def _cudart():
    """(register, unregister) of the libcudart this process has loaded, through ctypes, which lets go of the GIL
    during the call: pinning 48.6 MB takes milliseconds, and the engine thread must not wait for it. Falls back
    to torch's bindings."""
    global _CUDART
    if _CUDART is None:
        import ctypes

        path = None
        try:
            with open("/proc/self/maps") as f:
                path = next((line.split()[-1] for line in f if "libcudart.so" in line), None)
        except OSError:
            pass
        if path is not None:
            lib = ctypes.CDLL(path)
            lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
            _CUDART = (lambda ptr, size: lib.cudaHostRegister(ptr, size, 0), lib.cudaHostUnregister)
        else:
            rt = torch.cuda.cudart()
            _CUDART = (lambda ptr, size: int(rt.cudaHostRegister(ptr, size, 0)), rt.cudaHostUnregister)
    return _CUDART


def _register(t: torch.Tensor) -> bool:
    """Page-lock t's memory with CUDA (unregistered when t is collected); False when CUDA refuses."""
    try:
        torch.cuda.init()
        register, unregister = _cudart()
        ptr = t.data_ptr()
        if int(register(ptr, t.numel() * t.element_size())) != 0:
            return False
        if not t.is_pinned():
            unregister(ptr)
            return False
        weakref.finalize(t, unregister, ptr)
        return True
    except Exception as e:  # no CUDA runtime to call
        logger.debug("cudaHostRegister failed (%s)", e)
        return False


class HostBufferPool:
    """Whole-adapter host buffers [rank, page_elems], reused by rank. Thread-safe: loaders take buffers, the
    engine thread returns them. With ``shared``, buffers live in named shared memory, so that loader processes
    write into them (``name_of``)."""

    def __init__(self, page_elems: int, dtype: torch.dtype, pin: bool, max_free_bytes: int = 2 * 2**30,
                 shared: bool = False):
        self.page_elems = page_elems
        self.dtype = dtype
        self.pin = pin
        self.shared = shared
        self.max_free_bytes = max_free_bytes
        self._free: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._free_bytes = 0
        self._lock = threading.Lock()
        self._segments: dict[int, object] = {}  # id(buffer) -> SharedMemory, kept open while the buffer lives
        self.num_allocated = 0

    def get(self, rank: int) -> torch.Tensor:
        with self._lock:
            bufs = self._free.get(rank)
            if bufs:
                buf = bufs.pop()
                self._free_bytes -= buf.numel() * buf.element_size()
                return buf
            self.num_allocated += 1
        if self.shared:
            return self._shared(rank)
        if self.pin:
            return _pinned(rank, self.page_elems, self.dtype)
        return torch.empty(rank, self.page_elems, dtype=self.dtype)

    def _shared(self, rank: int) -> torch.Tensor:
        from multiprocessing import shared_memory

        elem = torch.empty((), dtype=self.dtype).element_size()
        size = rank * self.page_elems * elem
        # tmpfs hands out pages lazily: writing past its size would kill the process with SIGBUS, not fail.
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize < size:
            raise MemoryError(f"/dev/shm has {st.f_bavail * st.f_frsize / 1e9:.2f} GB free, an adapter needs "
                              f"{size / 1e9:.2f} GB (raise the shared-memory size or lower max_cpu_loras)")
        shm = shared_memory.SharedMemory(create=True, size=size)
        t = torch.frombuffer(shm.buf, dtype=self.dtype, count=rank * self.page_elems).view(rank, self.page_elems)
        t.zero_()  # touched before registering: much faster to pin (see _pinned)
        if self.pin and not _register(t):
            logger.warning("could not pin a shared LoRA host buffer: its uploads will be synchronous copies")
        with self._lock:
            self._segments[id(t)] = shm
        weakref.finalize(t, _release_segment, shm)
        return t

    def name_of(self, buf: torch.Tensor) -> str:
        with self._lock:
            return self._segments[id(buf)].name

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.shape[0], []).append(buf)
            self._free.move_to_end(buf.shape[0])
            self._free_bytes += buf.numel() * buf.element_size()
            while self._free_bytes > self.max_free_bytes:  # drop buffers of the least recently freed rank
                rank, bufs = next(iter(self._free.items()))
                dropped = bufs.pop(0)
                self._free_bytes -= dropped.numel() * dropped.element_size()
                self._segments.pop(id(dropped), None)
                if not bufs:
                    del self._free[rank]


def _release_segment(shm) -> None:
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    # The mapping itself goes with the memoryview the dead tensor held; close() would refuse while one exists.


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
