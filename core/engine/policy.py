"""Scheduling policies: the order in which waiting requests are admitted.

A plugin may supply its own through the ``loraplex_scheduling_policy`` hook. The scheduler still enforces every
hard limit (token budget, KV blocks, max_loras distinct adapters); the policy only orders the candidates.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class SchedulableRequest(Protocol):
    request_id: str
    arrival_time: float
    priority: int

    @property
    def lora_name(self) -> str | None: ...

    @property
    def num_prompt_tokens(self) -> int: ...


@runtime_checkable
class SchedulingPolicy(Protocol):
    name: str

    def order(self, waiting: Sequence[SchedulableRequest]) -> list[SchedulableRequest]:
        """Return the waiting requests in the order the scheduler should try to admit them."""
        ...


class FCFSPolicy:
    """First come, first served; preempted requests keep their arrival time so they go back to the front."""

    name = "fcfs"

    def order(self, waiting: Sequence[SchedulableRequest]) -> list[SchedulableRequest]:
        return sorted(waiting, key=lambda r: (r.priority, r.arrival_time))
