"""Per-step LoRA kernel metadata over a paged adapter pool.

Adapter weights live in a pool of pages, one page per rank row (loraplex.lora.device_pool): an adapter of rank r
owns r pages anywhere in the pool, so a rank-8 adapter takes half the memory of a rank-16 one. A resident adapter
is an *entry*: ``entry_pages[e]`` lists its pages and ``entry_ranks[e]`` its rank, written when it is uploaded.

A step's tokens name entries. ``prepare`` numbers the step's distinct entries 0..k-1 in entry order (*batch
slots*, k <= max_loras), groups the tokens by slot, and gathers each slot's page row and rank. The kernels then
see at most max_loras adapters however large the pool is. Everything lives in static device buffers and
``prepare`` only writes into them with fixed-shape ops, without a host sync, so a step (prepare included) can be
captured in a CUDA graph and replayed with new entry ids copied into the graph's input buffer.

Importing this module does not need triton.
"""
from __future__ import annotations

import torch

__all__ = ["LoRAKernelMeta"]


class LoRAKernelMeta:
    """Per-step LoRA metadata in static device buffers (reused across steps and by CUDA graphs).

    :param max_num_tokens: the most tokens one step may carry.
    :param max_loras: the most distinct adapters in one step (batch slots).
    :param max_rank: the widest adapter (pages per entry).
    :param max_entries: the most adapters resident in the pool at once.
    """

    def __init__(self, max_num_tokens: int, max_loras: int, max_rank: int, max_entries: int, device):
        for name, value in (("max_num_tokens", max_num_tokens), ("max_loras", max_loras), ("max_rank", max_rank),
                            ("max_entries", max_entries)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoRAKernelMeta: {name} must be a positive int, got {value!r}")
        device = torch.device(device)
        self.max_num_tokens = max_num_tokens
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_entries = max_entries

        def i32(*shape, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=torch.int32, device=device)

        # Pool state, one row per entry plus a last all-zero row that absent slots point at.
        self.entry_pages = i32(max_entries + 1, max_rank)  # page of each rank row
        self.entry_ranks = i32(max_entries + 1)  # 0 = free entry
        # This step, read by the kernels.
        self.token_entry_ids = i32(max_num_tokens, fill=-1)  # the runner's input: entry of each token, -1 = none
        self.token_lora_indices = i32(max_num_tokens, fill=-1)  # batch slot of each token, -1 = none
        self.sorted_token_ids = torch.arange(max_num_tokens, dtype=torch.int32, device=device)  # grouped by slot
        self.num_tokens_per_lora = i32(max_loras)
        self.lora_token_start = i32(max_loras + 1)  # exclusive cumsum of the counts
        self.lora_ranks = i32(max_loras)  # rank of each slot's adapter, 0 = empty slot
        self.page_table = i32(max_loras, max_rank)  # pages of each slot's adapter
        # Scratch kept across steps so that prepare allocates as little as possible inside a graph.
        self._present = i32(max_entries + 1)
        self._slot_entry = torch.full((max_loras + 1,), max_entries, dtype=torch.int64, device=device)
        self._entry_ids = torch.arange(max_entries + 1, dtype=torch.int64, device=device)
        self._counts = i32(max_loras + 1)  # last = no adapter
        self._ones = torch.ones(max_num_tokens, dtype=torch.int32, device=device)
        self._arange = torch.arange(max_num_tokens, dtype=torch.int32, device=device)
        self.num_prepares = 0  # bumped by prepare: host-side readers cache per step (see active_slots)
        self._host_view: tuple[int, list] | None = None
        self._ref_segments: tuple[int, list] | None = None  # lora_ops' torch path: this step's token tiles

    @classmethod
    def allocate(cls, max_num_tokens: int, max_loras: int, device, max_rank: int = 16,
                 max_entries: int | None = None) -> "LoRAKernelMeta":
        return cls(max_num_tokens, max_loras, max_rank, max_entries or max_loras, device)

    @property
    def device(self) -> torch.device:
        return self.token_lora_indices.device

    # ------------------------------------------------------------------ pool state
    def set_entry(self, entry: int, pages: list[int], rank: int) -> None:
        """Record that ``entry`` holds an adapter of ``rank`` in ``pages`` (rank 0 frees it). Runs on the current
        stream: the pool calls it on its upload stream, behind the weights' copy."""
        if not 0 <= entry < self.max_entries:
            raise ValueError(f"LoRAKernelMeta.set_entry: entry {entry} is outside [0, {self.max_entries})")
        if not 0 <= rank <= self.max_rank or len(pages) != rank:
            raise ValueError(f"LoRAKernelMeta.set_entry: need 0 <= rank <= {self.max_rank} pages, got rank {rank} "
                             f"with {len(pages)} pages")
        row = torch.zeros(self.max_rank, dtype=torch.int32)
        row[:rank] = torch.tensor(pages, dtype=torch.int32)
        self.entry_pages[entry].copy_(row, non_blocking=self.device.type == "cuda")
        self.entry_ranks[entry : entry + 1].fill_(rank)

    # ------------------------------------------------------------------ per step
    def prepare(self, token_entry_ids: torch.Tensor) -> None:
        """Load this step's entry per token, number its distinct entries as batch slots and regroup the tokens.

        token_entry_ids: [num_tokens], any int dtype, any device; ids outside [0, max_entries) mean "no adapter".
        Entries past num_tokens are reset, so a smaller batch never sees stale rows. More than max_loras distinct
        entries in one step is the scheduler's bug: the extra ones run without their adapter.
        """
        if token_entry_ids.dim() != 1:
            raise ValueError(f"LoRAKernelMeta.prepare: token_entry_ids must be 1-D, got "
                             f"{tuple(token_entry_ids.shape)}")
        if token_entry_ids.is_floating_point() or token_entry_ids.is_complex() \
                or token_entry_ids.dtype == torch.bool:
            raise ValueError(f"LoRAKernelMeta.prepare: token_entry_ids must be an int tensor, got "
                             f"{token_entry_ids.dtype}")
        n = token_entry_ids.shape[0]
        if n > self.max_num_tokens:
            raise ValueError(f"LoRAKernelMeta.prepare: {n} tokens exceed max_num_tokens {self.max_num_tokens}")
        self.num_prepares += 1
        num_entries, num_slots = self.max_entries, self.max_loras
        ent = self.token_entry_ids  # [max_num_tokens]
        ent[:n].copy_(token_entry_ids)
        ent[n:].fill_(-1)
        # Entry id per token with "no adapter" mapped to the extra row num_entries.
        key = torch.where((ent >= 0) & (ent < num_entries), ent, num_entries).long()  # [max_num_tokens]
        present = self._present  # [num_entries + 1]
        present.zero_()
        present.index_fill_(0, key, 1)
        present[num_entries:].zero_()
        # Batch slot of every present entry: its rank among the present ones; absent entries -> dump slot.
        slot_of = torch.cumsum(present, 0, dtype=torch.int32).sub_(1)  # [num_entries + 1]
        slot_of = torch.where(present > 0, slot_of, num_slots).clamp_(max=num_slots)
        tok_slot = slot_of[key]  # [max_num_tokens]
        self.token_lora_indices.copy_(torch.where(tok_slot < num_slots, tok_slot, -1))
        # Entry of every slot (the dump slot num_slots collects the absent entries; free slots point at the zero row).
        self._slot_entry.fill_(num_entries)
        self._slot_entry.scatter_(0, slot_of.long(), self._entry_ids)
        entries = self._slot_entry[:num_slots]
        torch.index_select(self.entry_pages, 0, entries, out=self.page_table)
        torch.index_select(self.entry_ranks, 0, entries, out=self.lora_ranks)
        self._group(n)

    def _group(self, n: int) -> None:
        idx = self.token_lora_indices
        # Sort key: the slot, with every "no adapter" row mapped past the last slot so they group at the end.
        key = torch.where(idx < 0, self.max_loras, idx)  # [max_num_tokens]
        self._counts.zero_()
        self._counts.scatter_add_(0, key.long(), self._ones)
        self.num_tokens_per_lora.copy_(self._counts[:-1])
        # lora_token_start[0] stays 0 from __init__ (a scalar store would be a host-to-device copy, which
        # CUDA-graph capture refuses).
        torch.cumsum(self._counts[:-1], 0, dtype=torch.int32, out=self.lora_token_start[1:])
        # Rows past n all carry the largest key, so a stable sort of [:n] plus the identity for the rest
        # equals a stable sort of the whole buffer, at the cost of the live rows only.
        self.sorted_token_ids[:n].copy_(torch.argsort(key[:n], stable=True))
        self.sorted_token_ids[n:].copy_(self._arange[n:])

    def active_slots(self) -> list[tuple[int, int, int, int, list[int]]]:
        """(slot, start, count, rank, pages) of every slot with tokens this step, read back once per prepare
        (the torch kernels' host view; one device sync)."""
        if self._host_view is None or self._host_view[0] != self.num_prepares:
            self._host_view = (self.num_prepares, read_active_slots(self))
        return self._host_view[1]

    def __repr__(self) -> str:
        return (f"LoRAKernelMeta(max_num_tokens={self.max_num_tokens}, max_loras={self.max_loras}, "
                f"max_rank={self.max_rank}, max_entries={self.max_entries}, device={self.device})")


def read_active_slots(meta) -> list[tuple[int, int, int, int, list[int]]]:
    """(slot, start, count, rank, pages) of every slot with tokens, for any object with the kernel-facing buffers;
    one host sync for all of them."""
    counts = meta.num_tokens_per_lora
    n, width = counts.shape[0], meta.page_table.shape[1]
    host = torch.cat([counts, meta.lora_token_start[:-1], meta.lora_ranks, meta.page_table.reshape(-1)]).tolist()
    out = []
    for s in range(n):
        if host[s] > 0:
            rank = min(host[2 * n + s], width)
            base = 3 * n + s * width
            out.append((s, host[n + s], host[s], rank, host[base: base + rank]))
    return out
