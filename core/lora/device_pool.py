"""DevicePool: the adapters resident on the device, in one pool of rank-row pages.

The pool is one [num_pages, page_elems] tensor (layout: loraplex.lora.layout); every LoRA linear reads it
through strided views. An adapter of rank r takes r pages, a contiguous run when one is free, any r pages
otherwise, so adapters of different ranks share the pool without padding to max_lora_rank (S-LoRA's unified
paging, restricted to adapter weights). A resident adapter is an *entry*: the kernel metadata maps it to its pages
(LoRAKernelMeta.set_entry).

Uploads run on a side stream and end with an event; the scheduler admits a request only once that event has
completed, so a step never waits on an upload. A new upload first waits for the work already queued on the
compute stream, so it never overwrites pages that an earlier step may still read.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from loraplex.lora.layout import PageLayout


class DevicePool:
    """:param num_pages: pool size in rank rows. :param max_entries: the most adapters resident at once."""

    def __init__(self, layout: PageLayout, num_pages: int, max_entries: int, dtype: torch.dtype,
                 device: torch.device, meta):
        self.layout = layout
        self.num_pages = num_pages
        self.device = device
        self.meta = meta
        self.pool = torch.zeros(num_pages, layout.page_elems, dtype=dtype, device=device)
        self.views = layout.views(self.pool)
        self._used = bytearray(num_pages)  # 1 = page taken
        self.num_free_pages = num_pages
        self._free_entries = list(range(max_entries - 1, -1, -1))
        self.resident: OrderedDict[int, object] = OrderedDict()  # entry -> LoRAModel
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def num_bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def __len__(self) -> int:
        return len(self.resident)

    def can_fit(self, rank: int) -> bool:
        return rank <= self.num_free_pages and bool(self._free_entries)

    def _alloc_pages(self, n: int) -> list[int]:
        start = self._used.find(bytes(n))  # first free run of n pages
        if start >= 0:
            pages = list(range(start, start + n))
        else:
            pages, i = [], 0
            while len(pages) < n:
                i = self._used.index(0, i)
                pages.append(i)
                i += 1
        for p in pages:
            self._used[p] = 1
        self.num_free_pages -= n
        return pages

    def upload(self, m) -> None:
        """Start copying m's host buffer into the pool (the caller checked can_fit). m is resident from now on
        and ready once ``is_ready`` says so."""
        pages = self._alloc_pages(m.rank)
        entry = self._free_entries.pop()
        # Runs of consecutive pages: one copy each (one in all when the pool had a free run).
        runs, j = [], 0
        while j < len(pages):
            k = j + 1
            while k < len(pages) and pages[k] == pages[k - 1] + 1:
                k += 1
            runs.append((j, pages[j], k - j))
            j = k
        if self.stream is None:
            for j, p, n in runs:
                self.pool[p: p + n].copy_(m.host[j: j + n])
            self.meta.set_entry(entry, pages, m.rank)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for j, p, n in runs:
                    self.pool[p: p + n].copy_(m.host[j: j + n], non_blocking=True)
                self.meta.set_entry(entry, pages, m.rank)
                event = torch.cuda.Event()
                event.record()
            m.device_event = m.host_event = event
        m.entry, m.pages = entry, pages
        self.resident[entry] = m

    @staticmethod
    def is_ready(m) -> bool:
        if m.entry < 0:
            return False
        ev = m.device_event
        if ev is not None:
            if not ev.query():
                return False
            m.device_event = None
        return True

    def evict(self, m) -> None:
        """Free m's pages and entry (never while a sequence uses it or its upload runs: the caller checks). The
        entry's table row is rewritten by the next upload into it, on the upload stream."""
        for p in m.pages:
            self._used[p] = 0
        self.num_free_pages += len(m.pages)
        self._free_entries.append(m.entry)
        self.resident.pop(m.entry, None)
        m.entry, m.pages = -1, []
