"""RequestGroup: the engine requests of one HTTP request, and the bounded queue their outputs wait in.

Streams ask DELTA outputs (O(new tokens) per step); a stream whose client stops reading is aborted once
``MAX_UNDELIVERED_TOKENS`` wait in its queue (docs/server.md).
"""
from __future__ import annotations

import asyncio
import logging
import time

from loraplex.server.errors import APIError

logger = logging.getLogger("loraplex.server")

# A stream's outputs (DELTA: O(new tokens) each) wait in its group's queue until the response takes them. Past
# this many generated tokens waiting there, in outputs of unfinished requests, the client is taken as not
# reading: the group's requests are aborted (KV blocks and adapter slots freed), what waited is dropped, and the
# stream ends with a 408 error event. The response takes every waiting output each event-loop turn whenever
# the client's socket accepts data, so a client that reads stays far below; with logprobs=20 the bound keeps
# about 40 MB per stream at most (a request of fewer tokens holds at most its own output). A request of many
# sequences (prompts x n) may fall MIN_UNDELIVERED_STEPS steps behind all the same. docs/server.md.
MAX_UNDELIVERED_TOKENS = 8192
MIN_UNDELIVERED_STEPS = 128


class RequestGroup:
    """The engine requests one HTTP request made (one per prompt); iterate it for their outputs."""

    def __init__(self, aengine, loop: asyncio.AbstractEventLoop):
        self._aengine = aengine
        self.loop = loop
        self.ids: list[str] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.final: dict[str, object] = {}
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._closed = False
        self.num_seqs = 1  # sequences of the group (prompts x n), set by the server: they scale the bound
        self._undelivered = 0  # generated tokens waiting in the queue, in unfinished outputs
        self._overflowed = False
        self.finish_reasons: list[str] = []  # one per sequence that finished, as its output reported it (metrics)
        self.is_counted = False  # its sequences counted in vllm:request_success

    @property
    def max_undelivered(self) -> int:
        return max(MAX_UNDELIVERED_TOKENS, MIN_UNDELIVERED_STEPS * self.num_seqs)

    def _feed(self, item) -> None:
        if self._overflowed:
            return  # aborted for a client that stopped reading: nothing more is kept for it
        if item is not None and not isinstance(item, BaseException):
            # DELTA outputs report a finished sample once, FINAL_ONLY ones only at the end: each counted once.
            self.finish_reasons += [o.finish_reason for o in item.outputs if o.finish_reason is not None]
            if self.first_token_at is None:
                first = (getattr(item, "metrics", None) or {}).get("first_token_time")
                if first is not None:  # the engine's clock: FINAL_ONLY outputs show no tokens before the end
                    self.first_token_at = first
                elif any(o.token_ids for o in item.outputs):
                    self.first_token_at = time.monotonic()
            if not item.finished:
                if not item.outputs:
                    return  # a FINAL_ONLY request's progress: nothing to deliver
                self._undelivered += sum(len(o.token_ids) for o in item.outputs)
                if self._undelivered > self.max_undelivered:
                    self._overflow()
                    return
        self.queue.put_nowait(item)

    def _overflow(self) -> None:
        """The client stopped reading: free what waits for it and what the engine holds for it."""
        self._overflowed = True
        dropped = self.queue.qsize()
        while not self.queue.empty():
            self.queue.get_nowait()
        self._undelivered = 0
        logger.warning("a stream's client stopped reading: %d outputs waited undelivered; request(s) %s aborted",
                       dropped, ", ".join(self.ids))
        self.queue.put_nowait(APIError(
            408, f"The client stopped reading the stream: more than {self.max_undelivered} generated tokens "
                 "waited undelivered, so the request was aborted"))
        self.abort()

    @property
    def done(self) -> bool:
        return len(self.final) == len(self.ids)

    async def __aiter__(self):
        async for items in self.batches():
            for item in items:
                yield item

    async def batches(self):
        """The group's outputs, in lists of all that waited together: a stream that fell behind catches up with
        one write for several steps instead of one write per step."""
        while not self.done:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            ready = []
            for item in items:
                if isinstance(item, BaseException):
                    if ready:
                        yield ready
                    # The rest of the group cannot be answered any more: stop it (a no-op after a failed step).
                    pending = [rid for rid in self.ids if rid not in self.final]
                    if pending and not self._closed:
                        self._aengine.abort(pending)
                    self._closed = True
                    raise item
                if item.finished:
                    self.final[item.request_id] = item
                    if self.done:
                        self.finished_at = time.monotonic()
                else:
                    self._undelivered -= sum(len(o.token_ids) for o in item.outputs)
                ready.append(item)
                if self.done:
                    break
            yield ready

    async def collect(self) -> list:
        """Final outputs, one per prompt, in prompt order (whole ones for FINAL_ONLY or CUMULATIVE requests)."""
        async for _ in self:
            pass
        return [self.final[rid] for rid in self.ids]

    def abort(self) -> None:
        """Abort what is still running (a client went away); idempotent and safe from any state."""
        if self._closed:
            return
        self._closed = True
        pending = [rid for rid in self.ids if rid not in self.final]
        if pending:
            self._aengine.abort(pending)
