"""CUDA graphs for decode: one graph per padded batch size, replayed with inputs in static buffers.

Everything a decode step reads (token ids, positions, KV slots, block tables, sequence lengths, the adapter pool
entry of each token) lives in these buffers, so a mixed-adapter decode step is a single graph replay. Padding
rows point at the reserved KV block 0, have seq_len 0 (attention skips them) and LoRA entry -1 (LoRA kernels
skip them).
"""
from __future__ import annotations

import logging

import torch

from loraplex.layers.attention import AttentionMetadata

logger = logging.getLogger("loraplex.engine")


_MAX_GRAPH_BATCH = 512  # larger decode batches run eagerly


def _graph_batch_sizes(max_num_seqs: int) -> list[int]:
    top = min(max_num_seqs, _MAX_GRAPH_BATCH)
    sizes = [1, 2, 4, 8] + list(range(16, _MAX_GRAPH_BATCH + 1, 16))
    return [s for s in sizes if s < top] + [top]


class CUDAGraphRunner:
    def __init__(self, runner, max_num_seqs: int):
        self.runner = runner
        self.batch_sizes = sorted(set(_graph_batch_sizes(max_num_seqs)))
        self.max_bs = self.batch_sizes[-1]
        dev = runner.device
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.lora_idx = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs and bool(self.graphs)

    def _forward(self, bs: int) -> torch.Tensor:
        r = self.runner
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1], max_query_len=1, max_seq_len=r.max_model_len)
        if r.lora_manager is not None:
            r.lora_manager.state.set_batch_tensor(self.lora_idx[:bs])
        hidden = r.model(self.input_ids[:bs], self.positions[:bs], meta)
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_all(self) -> None:
        r = self.runner
        # Captured with LoRA on (set_batch_tensor): rows without an adapter are skipped inside the kernels.
        for bs in reversed(self.batch_sizes):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside capture
                self._forward(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    def run(self, seqs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay for seqs; input_ids (device, [len(seqs)]) for a look-ahead step whose newest tokens the host
        has not seen yet: positions and lengths are then one further on (see ModelRunner._prepare)."""
        r = self.runner
        ahead = int(input_ids is not None)
        n = len(seqs)
        bs = next(b for b in self.batch_sizes if b >= n)
        block = r.block_size
        width = self.block_tables.shape[1]
        pad = bs - n
        # Built as Python lists and sent in two copies: per-element tensor writes cost more than the GPU step.
        positions = [s.num_tokens - 1 + ahead for s in seqs]
        rows = [
            ([0] * n if ahead else [s.last_token_id for s in seqs]) + [0] * pad,
            positions + [0] * pad,
            [s.block_table[p // block] * block + p % block for s, p in zip(seqs, positions)] + [0] * pad,
            [p + 1 for p in positions] + [0] * pad,
            [s.lm_lora_entry for s in seqs] + [-1] * pad,
        ]
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs] + [[0] * width] * pad
        host = torch.tensor(rows, dtype=torch.int64).pin_memory().to(r.device, non_blocking=True)
        host_tables = torch.tensor(tables, dtype=torch.int32).pin_memory().to(r.device, non_blocking=True)
        self.input_ids[:bs].copy_(host[0])
        self.positions[:bs].copy_(host[1])
        self.slot_mapping[:bs].copy_(host[2])
        self.seq_lens[:bs].copy_(host[3])
        self.lora_idx[:bs].copy_(host[4])
        self.block_tables[:bs].copy_(host_tables)
        if ahead:
            self.input_ids[:n].copy_(input_ids)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
