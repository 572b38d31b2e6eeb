"""Continuous batching: every step runs all running decodes plus as many waiting prefills as fit.

Limits, in the order they bind: max_num_seqs, max_num_batched_tokens, free KV blocks, and max_loras distinct
adapters (GPU slots). When a running sequence needs a KV block and none is free, the most recently admitted
sequence is preempted and later recomputed from its tokens.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.policy import FCFSPolicy, SchedulingPolicy
from loraplex.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)  # this step's batch, decodes first
    num_scheduled_tokens: list[int] = field(default_factory=list)  # per seq in `seqs`
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: SchedulingPolicy | None = None, lora_manager=None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy or FCFSPolicy()
        self.lora_manager = lora_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        running = deque(self.running)
        self.running = []
        while running:
            seq = running.popleft()
            while not self.block_manager.can_allocate(seq):
                victim = running.pop() if running else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq)
            num_new = seq.num_tokens - seq.num_computed_tokens
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(num_new)
            self.running.append(seq)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def can_admit(self) -> bool:
        """Whether the next schedule() would take a waiting request, counting one token for each running
        sequence; changes nothing. Async scheduling launches ahead only when it would not."""
        return next(self._admissible(self.max_num_batched_tokens - len(self.running)), None) is not None

    def _admissible(self, budget: int):
        """(seq, num_new) of the waiting requests that fit, in policy order. Each check runs against the state
        when that request is reached, so a caller that admits each one before asking for the next sees the
        effect of its own admissions."""
        lora_blocked = False
        for seq in self.policy.order(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                return
            num_new = seq.num_tokens - seq.num_computed_tokens
            if num_new > budget or not self.block_manager.can_allocate(seq):
                return  # FIFO: later requests must not overtake one that waits for room
            if seq.lora_model is not None and (lora_blocked or not self.lora_manager.can_acquire(seq.lora_model)):
                # Once an adapter request waits for a slot, later adapter requests wait too, so the running
                # adapters drain and no adapter starves; base-model requests need no slot and may pass.
                lora_blocked = True
                continue
            yield seq, num_new
            budget -= num_new

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        for seq, num_new in self._admissible(budget):
            if seq.lora_model is not None:
                self.lora_manager.acquire(seq.lora_model)
            self.block_manager.allocate(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(num_new)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.lora_model is not None:
            self.lora_manager.release(seq.lora_model)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks and adapter slot."""
        was_running = seq in self.running
        if was_running:
            self.running.remove(seq)
            self.block_manager.free(seq)
            if seq.lora_model is not None:
                self.lora_manager.release(seq.lora_model)
        elif seq in self.waiting:
            self.waiting.remove(seq)
