"""StatsLogger: vLLM's periodic stats line, on when ``disable_log_stats=False``."""
from __future__ import annotations

import bisect
import logging
import time

logger = logging.getLogger("loraplex.engine")

LOG_INTERVAL_S = 10.0  # vLLM's VLLM_LOG_STATS_INTERVAL default


class StatsLogger:
    def __init__(self, engine, interval_s: float = LOG_INTERVAL_S):
        self.engine = engine
        self.interval_s = interval_s
        self._last_time = time.monotonic()
        self._last = dict(engine.stats)

    def maybe_log(self) -> None:
        now = time.monotonic()
        elapsed = now - self._last_time
        if elapsed < self.interval_s:
            return
        stats, last = self.engine.stats, self._last
        bm = self.engine.scheduler.block_manager
        usage = 1.0 - bm.num_free_blocks / max(bm.num_usable_blocks, 1)
        # vLLM's hit rate: over the lookups of this interval.
        queries = stats["num_prefix_cache_queries"] - last["num_prefix_cache_queries"]
        hits = stats["num_prefix_cache_hits"] - last["num_prefix_cache_hits"]
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                    "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    (stats["num_prompt_tokens"] - last["num_prompt_tokens"]) / elapsed,
                    (stats["num_generation_tokens"] - last["num_generation_tokens"]) / elapsed,
                    self.engine.scheduler.num_running, self.engine.scheduler.num_waiting, 100 * usage,
                    100 * hits / queries if queries else 0.0)
        self._last_time, self._last = now, dict(stats)


# vLLM's buckets for vllm:inter_token_latency_seconds (the server's /metrics), in seconds.
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)


class StepHistogram:
    """A histogram kept on the engine side, where each step's timing is seen, and published whole in the serving
    state (per-bucket counts, the last one past every bound, and the sum): the server's /metrics renders it."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def snapshot(self) -> list:
        return [list(self.counts), self.sum]
