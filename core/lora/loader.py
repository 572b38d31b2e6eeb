"""AdapterLoader: worker threads that read, validate and pack adapters, so the engine thread never touches storage.

A job runs the ``loraplex_load_adapter`` hook (any resolver's format), validates every tensor against the model
and packs the adapter into one host buffer of the pool's page layout. Finished jobs wait in a queue that the
engine thread drains between steps (``LoRAManager.poll``); listeners are told when one finishes, so an idle
engine loop can wake up. Torch's CPU kernels release the GIL, so the copies overlap the engine thread.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Callable


class LoadResult:
    __slots__ = ("version", "buf", "rank", "num_bytes", "error", "seconds")

    def __init__(self, version, buf=None, rank=0, num_bytes=0, error=None, seconds=0.0):
        self.version = version
        self.buf = buf
        self.rank = rank
        self.num_bytes = num_bytes
        self.error = error
        self.seconds = seconds


class AdapterLoader:
    """:param num_workers: loads that run at once. :param job: ``job(version) -> (buf, rank, num_bytes)``, run in
    a worker; an exception fails that load only."""

    def __init__(self, num_workers: int, job: Callable):
        self._job = job
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers,
                                                           thread_name_prefix="loraplex-lora-loader")
        self._done: collections.deque[LoadResult] = collections.deque()
        self._cv = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self.num_in_flight = 0  # engine thread only

    def add_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` is called from a worker thread after each job; it must be quick and thread-safe."""
        self._listeners.append(fn)

    def submit(self, version) -> None:
        self.num_in_flight += 1
        self._pool.submit(self._run, version)

    def _run(self, version) -> None:
        start = time.perf_counter()
        try:
            buf, rank, num_bytes = self._job(version)
            result = LoadResult(version, buf, rank, num_bytes)
        except BaseException as e:  # the job's failure belongs to its requests, never to the worker
            result = LoadResult(version, error=e)
        result.seconds = time.perf_counter() - start
        with self._cv:
            self._done.append(result)
            self._cv.notify_all()
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # a listener must not kill the worker
                pass

    def drain(self) -> list[LoadResult]:
        out = []
        while self._done:
            out.append(self._done.popleft())
        self.num_in_flight -= len(out)
        return out

    def has_results(self) -> bool:
        return bool(self._done)

    def wait(self, timeout: float) -> bool:
        """Block until a finished job is queued (True) or timeout seconds pass."""
        with self._cv:
            return self._cv.wait_for(lambda: bool(self._done), timeout)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
