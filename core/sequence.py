"""A Sequence is one stream of tokens being generated; a request with n > 1 owns n of them."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from loraplex.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


class PromptLogprobsSlot:
    """A request's prompt logprobs, shared by its n sequences. The first prefill of any of them fills it; no
    later one computes it again (a sibling's prefill, or a preempted sequence prefilled anew). A chunked prefill
    fills it chunk by chunk: a chunk extends it when it starts where the positions computed so far end."""

    __slots__ = ("num_logprobs", "value", "num_computed", "_parts")

    def __init__(self, num_logprobs: int):
        self.num_logprobs = num_logprobs  # top-k asked for (0: only each prompt token's own logprob)
        self.value: list | None = None  # RequestOutput.prompt_logprobs once computed
        self.num_computed = 0  # prompt positions whose raw logprobs are in _parts
        self._parts: list[tuple] = []  # raw (chosen, ranks, top_ids, top_lps) of each chunk so far

    def add(self, raw: tuple, num_positions: int) -> tuple | None:
        """Add a chunk's raw logprobs; returns the whole prompt's once all ``num_positions`` are in."""
        self._parts.append(raw)
        self.num_computed += len(raw[0])
        if self.num_computed < num_positions:
            return None
        parts, self._parts = self._parts, []
        if len(parts) == 1:
            return parts[0]
        return tuple([x for part in parts for x in part[j]] for j in range(4))


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n outputs
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: Any = None  # the user's LoRARequest
    lora_model: Any = None  # the adapter version this sequence runs with (fixed when it is added)
    lora_entry: int = -1  # its pool entry while running (kept, not looked up per step); -1 = none
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list | None = None
    prompt_logprobs: PromptLogprobsSlot | None = None  # shared by the request's sequences; None: not asked for
    cumulative_logprob: float = 0.0
    generator: Any = None  # per-request torch.Generator when params.seed is set
    detokenizer: Any = None
    num_preemptions: int = 0
    num_lora_bypasses: int = 0  # steps in which a later adapter request was admitted past it (scheduler aging)
    first_token_time: float | None = None
    # Multi-modal inputs of the request, shared by its n sequences: the processor's tensors ("pixel_values") and,
    # once the tower has run, "embeds" [num placeholder tokens, hidden] (kept for a prefill after preemption).
    mm_inputs: dict | None = None
    # Prefix caching. What besides its tokens decides the KV of its blocks (adapter version, multi-modal inputs),
    # as a digest; the hashes of its full blocks so far; how many of its blocks are in the cache's index; and
    # how many prompt tokens its last admission found cached.
    cache_key: bytes = b""
    cache_salt: str | None = None  # the request's salt (vLLM's cache_salt), part of cache_key
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0

    @property
    def lm_lora_entry(self) -> int:
        """The pool entry the decoder's LoRA kernels use: -1 (none) for an adapter of the vision tower alone,
        whose pool entry holds only a zero page."""
        m = self.lora_model
        return self.lora_entry if m is None or m.has_lm else -1

    @property
    def lora_name(self) -> str | None:
        return self.lora_request.lora_name if self.lora_request is not None else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (a chunk of a long prompt)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True until every token but the newest is in the KV cache (first step, or after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not in the cache yet: 1 when decoding, more while (chunked) prefilling."""
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
