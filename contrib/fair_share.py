"""Contrib scheduling policy: fair share across adapters.

First-come-first-served lets one hot adapter with a deep queue delay every other adapter's
requests behind it. ``FairSharePolicy`` admits waiting requests round-robin across adapters (the
base model counts as one more "adapter"): the oldest request of each adapter, adapters ordered by
the arrival of that request, then every adapter's second-oldest, and so on. Within an adapter,
order stays first-come-first-served; a lower ``priority`` value still goes first overall.

Not default-on: enable it with ``LORAPLEX_PLUGINS=...,fair_share_scheduler`` (the entry point
loraplex declares for this module) or register this module on the plugin manager yourself.
"""
from __future__ import annotations

from collections.abc import Sequence

from loraplex.engine.policy import SchedulableRequest
from loraplex.plugins import hookimpl

LORAPLEX_DEFAULT_ON = False


class FairSharePolicy:
    name = "fair_share"

    def order(self, waiting: Sequence[SchedulableRequest]) -> list[SchedulableRequest]:
        fcfs = sorted(waiting, key=lambda r: (r.priority, r.arrival_time))
        turn: dict[tuple[int, str | None], int] = {}
        keyed = []
        for r in fcfs:
            group = (r.priority, r.lora_name)
            n = turn.get(group, 0)
            turn[group] = n + 1
            # (priority, round, arrival): round k holds each adapter's k-th oldest request.
            keyed.append(((r.priority, n, r.arrival_time), r))
        keyed.sort(key=lambda kr: kr[0])
        return [r for _, r in keyed]


@hookimpl
def loraplex_scheduling_policy(max_num_seqs: int, max_loras: int) -> FairSharePolicy:
    return FairSharePolicy()
