"""Paged KV cache bookkeeping: which cache blocks each sequence owns, and the prefix cache.

Prefix caching (vLLM's automatic prefix caching): a full block whose K/V have been computed is indexed by a hash of
(its parent block's hash, its token ids, the sequence's cache key). The cache key digests everything else the K/V
depend on: the adapter *version* the sequence runs with (a process-unique id per LoRAModel, 0 for the base model)
and its multi-modal inputs. A version, not a name: an in-place reload makes a new version, so blocks computed with
the old weights can never match a request for the new ones (vLLM #42125 keyed by name and served stale KV); an
unloaded version's blocks are never matched again and age out.

Blocks are reference counted; a block nobody holds goes back to the free queue. Blocks without a hash go to its
front and are handed out first; hashed ones to its back, in reverse order of their sequence (its last block is
evicted first), and stay findable until a fresh block is needed and they reach the front (LRU eviction). A cache
hit takes a block out of the queue wherever it is. Blocks are indexed only once a finished step has written them,
so a failed step never leaves a bad block findable, and a sequence never writes into a block it found.
"""
from __future__ import annotations

import hashlib
import itertools
import weakref
from array import array
from collections import OrderedDict

import torch

from loraplex.sequence import Sequence

# Block 0 is never handed out: padded tokens (CUDA-graph batches) write their K/V there.
NUM_RESERVED_BLOCKS = 1

_ROOT_HASH = bytes(16)
_version_ids = itertools.count(1)
# LoRAModel (eq=False, so hashed by identity) -> its process-unique id. Weak: a retired version is forgotten, and
# a new object never inherits an old id (id() may be reused, the counter is not).
_VERSION_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def version_id(lora_model) -> int:
    """The adapter version's process-unique id; 0 for the base model."""
    if lora_model is None:
        return 0
    vid = _VERSION_IDS.get(lora_model)
    if vid is None:
        vid = _VERSION_IDS[lora_model] = next(_version_ids)
    return vid


def mm_digest(mm_inputs: dict | None) -> bytes:
    """Digest of a request's multi-modal inputs (every tensor's dtype, shape and bytes; other values by repr).
    ``embeds`` (the tower's output, derived from the pixels and the adapter) is left out."""
    if mm_inputs is None:
        return b""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(k for k in mm_inputs if k != "embeds"):
        value = mm_inputs[key]
        h.update(repr(key).encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.digest()


def cache_key(lora_model, mm_inputs: dict | None, mm_hash: bytes | None = None, salt: str | None = None) -> bytes:
    """A sequence's cache key: what besides its tokens decides its K/V, and the request's cache salt (vLLM's
    ``cache_salt``: only requests with the same salt share blocks, so one tenant cannot time another's prompts)."""
    digest = mm_hash if mm_hash is not None else mm_digest(mm_inputs)
    salted = b"" if salt is None else b"salt" + salt.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(version_id(lora_model).to_bytes(8, "little") + digest + salted, digest_size=16).digest()


def block_hash(parent: bytes, token_ids: list[int], key: bytes) -> bytes:
    return hashlib.blake2b(parent + key + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks <= NUM_RESERVED_BLOCKS:
            raise ValueError(f"KV cache too small: {num_blocks} blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.is_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        # Free blocks, the next one to hand out first (see the module docstring).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(NUM_RESERVED_BLOCKS, num_blocks))
        # Prefix cache lookups, in tokens: queried (the sequence's tokens at admission) and found cached; in total
        # and by adapter name ("" for the base model).
        self.num_queries = 0
        self.num_hits = 0
        self.num_evictions = 0
        self.stats_by_model: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get: never used, or cached and held by nobody (evicted when taken)."""
        return len(self.free_blocks)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - NUM_RESERVED_BLOCKS

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    # ------------------------------------------------------------------ prefix cache
    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq's block hashes, extended to its first ``num_blocks`` full blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(block_hash(parent, seq.token_slice(i * bs, (i + 1) * bs), seq.cache_key))
        return hashes

    def reads_cache(self, seq: Sequence) -> bool:
        """Whether seq may start from cached blocks: not when its prompt logprobs are still to compute, which
        need every prompt position's hidden state (vLLM skips the cache for them too)."""
        slot = seq.prompt_logprobs
        return self.is_caching and (slot is None or slot.value is not None)

    def lookup(self, seq: Sequence) -> list[int]:
        """The blocks of seq's longest cached prefix of full blocks; never all of its tokens, since the last one
        must be computed for its logits. Changes nothing."""
        if not self.cached or seq.block_table or not self.reads_cache(seq):
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in self._hash_blocks(seq, max_blocks):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, seq: Sequence, num_hit_blocks: int) -> None:
        num_hits = num_hit_blocks * self.block_size
        self.num_queries += seq.num_tokens
        self.num_hits += num_hits
        stats = self.stats_by_model.setdefault(seq.lora_name or "", [0, 0])
        stats[0] += seq.num_tokens
        stats[1] += num_hits

    def register(self, seq: Sequence) -> None:
        """Index seq's full blocks whose K/V a finished step has written (num_computed_tokens), so that later
        sequences find them. A block whose hash another block already holds stays unindexed."""
        if not self.is_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._hash_blocks(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block, h = seq.block_table[i], hashes[i]
            if self.hash_of[block] is None and h not in self.cached:
                self.hash_of[block] = h
                self.cached[h] = block
        seq.num_registered_blocks = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block nobody holds (vLLM's reset_prefix_cache); False while any block is in use,
        as vLLM refuses then."""
        if len(self.free_blocks) != self.num_usable_blocks:
            return False
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks
        return True

    # ------------------------------------------------------------------ allocation
    def blocks_needed(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Blocks still to allocate so that ``num_tokens`` (default: all of seq's tokens) fit."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None, hits: list[int] = ()) -> bool:
        """Whether ``num_tokens`` of seq fit when it takes the cached blocks ``hits`` (from lookup) first."""
        needed = self.blocks_needed(seq, num_tokens) - len(hits)
        taken = sum(1 for b in hits if self.ref_counts[b] == 0)  # hits waiting in the free queue
        return needed <= self.num_free_blocks - taken

    def allocate(self, seq: Sequence, num_tokens: int | None = None, hits: list[int] = ()) -> None:
        """Blocks for ``num_tokens`` of seq: the cached ``hits`` first (their tokens then count as computed),
        then fresh ones."""
        if not self.can_allocate(seq, num_tokens, hits):
            raise RuntimeError("out of KV cache blocks; the scheduler should have preempted")
        if hits:
            for block in hits:
                if self.ref_counts[block] == 0:
                    del self.free_blocks[block]
                self.ref_counts[block] += 1
                seq.block_table.append(block)
            seq.num_computed_tokens = seq.num_registered_blocks = len(hits)
            seq.num_computed_tokens *= self.block_size
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            h = self.hash_of[block]
            if h is not None:  # evict: the least recently freed cached block
                self.hash_of[block] = None
                del self.cached[h]
                self.num_evictions += 1
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Give seq's blocks back; what it computed stays findable (register) until evicted."""
        self.register(seq)
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.hash_of[block] is None:
                    self.free_blocks.move_to_end(block, last=False)  # nothing to keep: hand it out first
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
