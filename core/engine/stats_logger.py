"""StatsLogger: vLLM's periodic stats line, on when ``disable_log_stats=False``."""
from __future__ import annotations

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
