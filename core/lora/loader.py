"""Adapter loaders: read, validate and pack adapters off the engine thread, which never touches storage.

A job runs the ``loraplex_load_adapter`` hook (any resolver's format), validates every tensor against the model
and packs the adapter into one host buffer of the pool's page layout. Finished jobs wait in a queue that the
engine thread drains between steps (``LoRAManager.poll``); listeners are told when one finishes, so an idle
engine loop can wake up. ``AdapterLoader`` runs jobs in threads of the engine process (the CPU default: no
process start, plugins registered by hand are seen); ``ProcessLoader`` in worker processes (the CUDA default:
their Python does not compete with the engine thread for the GIL).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import weakref

import torch
from typing import Callable

logger = logging.getLogger("loraplex.lora")


class LoadResult:
    __slots__ = ("version", "buf", "rank", "num_bytes", "error", "seconds", "tower", "has_lm")

    def __init__(self, version, buf=None, rank=0, num_bytes=0, error=None, seconds=0.0, tower=None, has_lm=True):
        self.version = version
        self.has_lm = has_lm  # the adapter has decoder pieces (not the tower alone)
        self.tower = tower or {}  # tower / projector LoRA: path -> (A, B), CPU fp32
        self.buf = buf
        self.rank = rank
        self.num_bytes = num_bytes
        self.error = error
        self.seconds = seconds


class _Loader:
    """What both loaders share: finished loads queued for the engine thread (``drain``), and listeners told of
    each (from the thread that finished it)."""

    def __init__(self):
        self._done: collections.deque[LoadResult] = collections.deque()
        self._cv = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self.num_in_flight = 0  # engine thread only

    def add_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` is called from a loader's thread after each job; it must be quick and thread-safe."""
        self._listeners.append(fn)

    def _finish(self, result: LoadResult) -> None:
        with self._cv:
            self._done.append(result)
            self._cv.notify_all()
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # a listener must not kill the loader
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


class AdapterLoader(_Loader):
    """Loader threads. :param num_workers: loads that run at once. :param job: ``job(version) -> (buf, rank,
    num_bytes)``, run in a worker; an exception fails that load only. :param sink: where results go (default:
    this loader's queue)."""

    def __init__(self, num_workers: int, job: Callable, sink: Callable | None = None):
        super().__init__()
        self._job = job
        self._sink = sink or self._finish
        # No torch.set_num_threads here: it also sets MKL's thread count, for the whole process, and the engine's
        # CPU matmuls would change their summation order (and greedy outputs on a near-tie) mid-run.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_workers,
                                                           thread_name_prefix="loraplex-lora-loader")

    def submit(self, version) -> None:
        self.num_in_flight += 1
        self._pool.submit(self._run, version)

    def _run(self, version) -> None:
        start = time.perf_counter()
        try:
            buf, rank, num_bytes, tower, has_lm = self._job(version)
            result = LoadResult(version, buf, rank, num_bytes, tower=tower, has_lm=has_lm)
        except BaseException as e:  # the job's failure belongs to its requests, never to the worker
            result = LoadResult(version, error=e)
        result.seconds = time.perf_counter() - start
        self._sink(result)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class InlineLoader(_Loader):
    """Loads in the calling (engine) thread at submit, finished by the next ``drain``: each load completes at a step
    fixed by the requests alone, which ranks of a tensor-parallel engine that schedule on their own need (they
    must make the same decisions at the same step). Same interface as AdapterLoader."""

    def __init__(self, job: Callable):
        super().__init__()
        self._job = job

    def submit(self, version) -> None:
        self.num_in_flight += 1
        start = time.perf_counter()
        try:
            buf, rank, num_bytes, tower, has_lm = self._job(version)
            result = LoadResult(version, buf, rank, num_bytes, tower=tower, has_lm=has_lm)
        except BaseException as e:  # the load's failure belongs to its requests
            result = LoadResult(version, error=e)
        result.seconds = time.perf_counter() - start
        self._finish(result)

    def shutdown(self) -> None:
        pass


class ProcessLoader(_Loader):
    """Loader processes (``loraplex.lora.loader_worker``): read, validate and pack in interpreters of their own.

    Threads share the engine's GIL: on an H200 host a load every 100 ms cost 128 running streams 62% of their
    throughput, and a load took 0.6 s instead of 28 ms while the engine ran. Each worker process packs into a
    shared-memory host buffer from ``buffers`` (pinned here, in the engine process), so the engine side of a load
    is a few messages. One driver thread per worker feeds it jobs and relays its answers; adapters handed over
    as tensors (``LoRARequest.tensors``) are packed in a thread here instead, since nothing would be read.

    Same interface as AdapterLoader. A worker that cannot start or dies fails its job with a LoRALoadError and
    hands its later jobs to the in-process threads.
    """

    def __init__(self, num_workers: int, job: Callable, layout, max_rank: int, buffers, num_threads: int = 2):
        import os
        import queue
        import secrets
        import subprocess
        import sys
        import tempfile
        from multiprocessing.connection import Listener

        super().__init__()
        self._threads = AdapterLoader(num_workers, job, sink=self._finish)  # in-memory adapters, fallback
        self._buffers = buffers
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        authkey = secrets.token_bytes(16)
        self._dir = tempfile.mkdtemp(prefix="loraplex-loader-")
        self._listener = Listener(os.path.join(self._dir, "sock"), family="AF_UNIX", authkey=authkey)
        env = {**os.environ, "LORAPLEX_LOADER_AUTHKEY": authkey.hex(),
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._procs = [subprocess.Popen([sys.executable, "-m", "loraplex.lora.loader_worker", self._listener.address],
                                        env=env, stdin=subprocess.DEVNULL) for _ in range(num_workers)]
        self._init = ("init", layout, max_rank, str(buffers.dtype).replace("torch.", ""), num_threads)
        self._closed = False
        # Driver threads hold a weak reference only: an engine that is dropped takes its workers down with it.
        self._finalizer = weakref.finalize(self, _stop_workers, self._jobs, self._procs, self._listener, self._dir)
        ref = weakref.ref(self)
        for i in range(num_workers):
            threading.Thread(target=_drive, args=(ref, self._jobs), name=f"loraplex-lora-loader-{i}",
                             daemon=True).start()

    def submit(self, version) -> None:
        self.num_in_flight += 1
        if version.request.tensors is not None:
            self._threads._pool.submit(self._threads._run, version)
        else:
            self._jobs.put(version)

    def shutdown(self) -> None:
        self._closed = True
        self._finalizer()
        self._threads.shutdown()


def _drive(ref, jobs) -> None:
    """A driver thread of ProcessLoader: connect to one worker, then feed it jobs and relay its answers."""
    from loraplex import errors

    loader = ref()
    try:
        # A worker that cannot start (broken environment) must not hold its jobs forever: after a minute
        # they load in-process.
        loader._listener._listener._socket.settimeout(60)
        conn = loader._listener.accept()
        conn.send(loader._init)
    except Exception as e:
        logger.warning("a LoRA loader process did not start (%s: %s); loading in the engine process instead",
                       type(e).__name__, e)
        conn = None
    loader = None
    while True:
        version = jobs.get()
        loader = ref()
        if version is None or loader is None:
            break
        if conn is None:  # no worker process: load it here
            loader._threads._run(version)
            loader = None
            continue
        req = version.request
        start = time.perf_counter()
        buf = None
        try:
            conn.send(("load", id(version), {"lora_name": req.lora_name, "lora_int_id": req.lora_int_id,
                                             "lora_path": req.lora_path, "base_model_name": req.base_model_name,
                                             "load_inplace": req.load_inplace,
                                             "allowed_paths": req.allowed_paths}))
            while True:
                msg = conn.recv()
                if msg[0] == "rank":
                    try:
                        buf = loader._buffers.get(msg[2])
                    except Exception as e:  # no shared memory left: this job fails, the worker goes on
                        conn.send(("nobuffer", msg[1]))
                        loader._finish(LoadResult(version, error=errors.LoRALoadError(
                            f"adapter '{req.lora_name}': no host memory for it ({e})", req.lora_name)))
                        break
                    conn.send(("buffer", msg[1], loader._buffers.name_of(buf)))
                elif msg[0] == "done":
                    tower = {path: (torch.from_numpy(a), torch.from_numpy(b)) for path, (a, b) in msg[4].items()}
                    loader._finish(LoadResult(version, buf, buf.shape[0], msg[2], seconds=msg[3], tower=tower,
                                              has_lm=msg[5]))
                    break
                else:
                    _, _, type_name, message, name = msg
                    cls = getattr(errors, type_name, None)
                    error = cls(message, name) if isinstance(cls, type) and issubclass(cls, errors.LoRAError) \
                        else errors.LoRALoadError(f"adapter '{req.lora_name}': loading failed: {type_name}: "
                                                  f"{message}", req.lora_name)
                    if buf is not None:
                        loader._buffers.put(buf)
                    loader._finish(LoadResult(version, error=error, seconds=time.perf_counter() - start))
                    break
        except (EOFError, OSError) as e:  # the worker died: this job fails, later ones load in-process
            if buf is not None:
                loader._buffers.put(buf)
            loader._finish(LoadResult(version, error=errors.LoRALoadError(
                f"adapter '{req.lora_name}': the loader process died ({type(e).__name__}: {e})", req.lora_name)))
            conn = None
        loader = version = None
    if conn is not None:
        try:
            conn.send(("stop",))
        except Exception:
            pass


def _stop_workers(jobs, procs, listener, directory) -> None:
    import shutil

    for _ in procs:
        jobs.put(None)
    for p in procs:
        try:
            p.wait(timeout=5)
        except Exception:
            p.kill()
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)
