"""Paged KV cache bookkeeping: which cache blocks each sequence owns."""
from __future__ import annotations

from loraplex.sequence import Sequence

# Block 0 is never handed out: padded tokens (CUDA-graph batches) write their K/V there.
NUM_RESERVED_BLOCKS = 1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= NUM_RESERVED_BLOCKS:
            raise ValueError(f"KV cache too small: {num_blocks} blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, NUM_RESERVED_BLOCKS - 1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - NUM_RESERVED_BLOCKS

    def blocks_needed(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Blocks still to allocate so that ``num_tokens`` (default: all of seq's tokens) fit."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int | None = None) -> None:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError("out of KV cache blocks; the scheduler should have preempted")
        for _ in range(needed):
            seq.block_table.append(self.free_blocks.pop())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0
