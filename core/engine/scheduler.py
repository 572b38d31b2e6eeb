"""Continuous batching: every step runs all running decodes plus as many waiting prefills as fit.

Limits, in the order they bind: max_num_seqs, max_num_batched_tokens (the running decodes' tokens included),
free KV blocks, and max_loras distinct adapters. When a running sequence needs a KV block and none is free, the
most recently admitted sequence is preempted and later recomputed from its tokens.

Adapter-aware admission: waiting requests are walked in the policy's order; one whose adapter is not resident
(still loading, or waiting for room in the device pool or for one of the max_loras batch slots) is held and
later requests may pass it, so resident adapters keep the batch full while others load. Aging bounds this: a
request held although its adapter is loaded, and passed over by a later adapter request, counts that step; once
it has been passed over in ``max_lora_bypass_steps`` steps, no adapter request behind it is admitted until it
is, so the running adapters drain and it gets its turn. Base-model requests need no adapter and always may pass.
The limits above (sequences, tokens, KV blocks) stay first-come-first-served: a request that does not fit them
stops admission for every request behind it.

Chunked prefill (``enable_chunked_prefill``): every running decode gets its token first, then sequences still
prefilling (in admission order) and then waiting ones get chunks of what is left of max_num_batched_tokens, so a
long prompt is prefilled over several steps beside the decodes instead of holding them. A chunk's row samples
nothing (the engine drops its token) until the prompt's last chunk. Without it a prompt must fit one step.

Prefix caching: an admitted request starts after the longest cached prefix of its full blocks (see
block_manager); its queried and hit tokens are counted there.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loraplex.engine.block_manager import BlockManager, cache_key
from loraplex.engine.policy import FCFSPolicy, SchedulingPolicy
from loraplex.sequence import Sequence, SequenceStatus

DEFAULT_MAX_LORA_BYPASS_STEPS = 16


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
                 policy: SchedulingPolicy | None = None, lora_manager=None,
                 max_lora_bypass_steps: int = DEFAULT_MAX_LORA_BYPASS_STEPS, enable_chunked_prefill: bool = False):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.is_chunking = enable_chunked_prefill
        self.policy = policy or FCFSPolicy()
        self.lora_manager = lora_manager
        self.max_lora_bypass_steps = max_lora_bypass_steps
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._order: list[Sequence] | None = None  # policy order of `waiting`, until it changes
        self._waiting_epoch = 0  # bumped whenever `waiting` changes
        self._prefetched_at: tuple | None = None
        self._last_key: tuple | None = None  # (lora_model, mm_inputs, salt, key): a request's n sequences share one

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if self.block_manager.is_caching:
            last = self._last_key
            if (last is not None and last[0] is seq.lora_model and last[1] is seq.mm_inputs
                    and last[2] == seq.cache_salt):
                seq.cache_key = last[3]
            else:
                seq.cache_key = cache_key(seq.lora_model, seq.mm_inputs, salt=seq.cache_salt)
                self._last_key = (seq.lora_model, seq.mm_inputs, seq.cache_salt, seq.cache_key)
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._order = None
        self._waiting_epoch += 1
        if seq.lora_model is not None:
            seq.lora_model.num_waiting += 1

    def _dequeue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self._order = None
        self._waiting_epoch += 1
        if seq.lora_model is not None:
            self.lora_manager.remove_waiting(seq.lora_model)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def ordered_waiting(self) -> list[Sequence]:
        if self._order is None:
            self._order = list(self.policy.order(self.waiting))
        return self._order

    # ------------------------------------------------------------------ adapters ahead of time
    def prefetch(self) -> None:
        """Hand the LoRA manager the adapters of waiting requests, in the order admission will want them, so
        it loads and uploads them while the batch runs. Skipped when neither the queue nor the adapters moved."""
        lm = self.lora_manager
        if lm is None or not self.waiting:
            return
        if (self._waiting_epoch, lm.epoch) == self._prefetched_at:
            return
        seen, wanted = set(), []
        for seq in self.ordered_waiting():
            m = seq.lora_model
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                wanted.append(m)
        lm.prefetch(wanted)
        self._prefetched_at = (self._waiting_epoch, lm.epoch)

    # ------------------------------------------------------------------ step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        running = deque(self.running)
        self.running = []
        # Tokens kept for the decodes not reached yet: they come before any prefill chunk.
        num_reserved = sum(1 for s in running if s.num_uncomputed_tokens == 1)
        chunks: list[tuple[Sequence, int]] = []
        while running:
            seq = running.popleft()
            bm.register(seq)  # what its last step computed becomes findable
            num_new = seq.num_uncomputed_tokens
            if num_new == 1:
                num_reserved -= 1
            elif self.is_chunking:
                num_new = min(num_new, budget - num_reserved)
                if num_new <= 0:
                    self.running.append(seq)  # mid-prefill, no budget left this step: it keeps its blocks
                    continue
            while not bm.can_allocate(seq, seq.num_computed_tokens + num_new):
                victim = running.pop() if running else seq
                if victim is not seq and victim.num_uncomputed_tokens == 1:
                    num_reserved -= 1
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            bm.allocate(seq, seq.num_computed_tokens + num_new)
            if num_new == 1 and seq.num_uncomputed_tokens == 1:
                out.seqs.append(seq)
                out.num_scheduled_tokens.append(1)
            else:
                chunks.append((seq, num_new))
            budget -= num_new
            self.running.append(seq)
        for seq, num_new in chunks:  # decodes first
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(num_new)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def can_admit(self) -> bool:
        """Whether the next schedule() would take a waiting request, counting one token for each running
        sequence; changes nothing. Async scheduling launches ahead only when it would not."""
        return next(self._admissible(self.max_num_batched_tokens - len(self.running), None), None) is not None

    def _admissible(self, budget: int, passed_over: list | None):
        """(seq, num_new, cached blocks) of the waiting requests that fit, in policy order. Each check runs
        against the state when that request is reached, so a caller that admits each one before asking for the
        next sees the effect of its own admissions. ``passed_over`` (when given) collects the held requests
        that a later adapter request passed."""
        lm = self.lora_manager
        bm = self.block_manager
        held: list[Sequence] = []  # held for device room or a batch slot, adapter loaded
        is_barrier = False
        for seq in self.ordered_waiting():
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                return
            hits = bm.lookup(seq)
            num_computed = len(hits) * bm.block_size
            num_new = seq.num_tokens - num_computed
            if self.is_chunking:
                num_new = min(num_new, budget)
            if num_new > budget or not bm.can_allocate(seq, num_computed + num_new, hits):
                return  # FIFO: later requests must not overtake one that waits for room
            m = seq.lora_model
            if m is not None:
                if is_barrier:
                    continue
                is_ready = lm.is_ready(m)
                if not (is_ready and (m.num_refs > 0 or lm.num_active < lm.max_loras)):
                    if is_ready or (m.is_on_host and not m.is_on_device):
                        held.append(seq)
                        is_barrier = seq.num_lora_bypasses >= self.max_lora_bypass_steps
                    continue
                if passed_over is not None and held:
                    passed_over.extend(held)
                    held = []
            yield seq, num_new, hits
            budget -= num_new

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        passed_over: list[Sequence] = []
        bm = self.block_manager
        for seq, num_new, hits in self._admissible(budget, passed_over):
            if seq.lora_model is not None:
                seq.lora_entry = self.lora_manager.acquire(seq.lora_model)
            if bm.reads_cache(seq):
                bm.record_lookup(seq, len(hits))
            bm.allocate(seq, len(hits) * bm.block_size + num_new, hits)
            seq.num_cached_tokens = seq.num_computed_tokens
            self._dequeue(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(num_new)
        for seq in passed_over:
            seq.num_lora_bypasses += 1

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_model is not None and seq.lora_entry >= 0:
            seq.lora_entry = -1
            self.lora_manager.release(seq.lora_model)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks and adapter."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
            self._release_adapter(seq)
        elif seq in self.waiting:
            self._dequeue(seq)
