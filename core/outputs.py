"""RequestOutput / CompletionOutput: vLLM's result objects."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request's result after a step. With the default ``RequestOutputKind.CUMULATIVE`` each output holds
    everything so far; with DELTA, ``outputs`` holds only the samples with something new, each with only the new
    text, token ids and logprobs (``prompt_logprobs`` once); with FINAL_ONLY, outputs are empty until the
    final, cumulative one. ``metrics["first_token_time"]``: time.monotonic() of the first generated token.
    ``num_cached_tokens``: prompt tokens its first sequence found in the prefix cache when it was admitted."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: Any = None
    prompt_logprobs: Any = None
    metrics: dict = field(default_factory=dict)
    # Why the request ended early, when it did not run at all (an adapter that failed to load); the server
    # answers it with this error's status. None for every request that ran.
    error: Exception | None = None
    # Prompt tokens found in the prefix cache when the request was admitted (vLLM's num_cached_tokens).
    num_cached_tokens: int | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
