"""LoRAResolution: turn an unknown adapter name into a LoRARequest through the resolver plugins.

The ``loraplex_resolve_lora`` hook may block for a long time (downloads), so it always runs in a
thread pool: the event loop stays free and a slow remote holds up only the names it serves.
Concurrent calls for the same (base model, name) share one hook call ("single flight"), whether
they come from coroutines or threads. Nothing is remembered once a call ends: a failure is retried
by the next request, and a success is the engine's to keep (it registers the adapter by name).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

from loraplex.errors import LoRAError, LoRANotFoundError
from loraplex.lora.request import LoRARequest

logger = logging.getLogger("loraplex.lora")

DEFAULT_MAX_WORKERS = 8


class LoRAResolution:
    def __init__(self, plugin_manager=None, max_workers: int = DEFAULT_MAX_WORKERS,
                 executor: concurrent.futures.Executor | None = None):
        """``plugin_manager`` defaults to the process's (``loraplex.plugins.get_plugin_manager()``)."""
        self._pm = plugin_manager
        self._executor = executor
        self._own_executor = executor is None
        self._max_workers = max_workers
        # Reentrant: a call that finishes before add_done_callback runs its callback in this thread.
        self._lock = threading.RLock()
        self._inflight: dict[tuple[str, str], concurrent.futures.Future] = {}

    @property
    def plugin_manager(self):
        if self._pm is not None:
            return self._pm
        from loraplex.plugins.manager import get_plugin_manager

        return get_plugin_manager()  # not kept: reset_plugin_manager() must take effect

    def _pool(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix="loraplex-resolve")
            return self._executor

    def _future(self, base_model_name: str, lora_name: str) -> concurrent.futures.Future:
        key = (base_model_name, lora_name)
        pool = self._pool()
        with self._lock:
            fut = self._inflight.get(key)
            if fut is None:
                fut = pool.submit(self._call_hook, base_model_name, lora_name)
                self._inflight[key] = fut
                # Registered under the lock, so a finished call is forgotten before anyone else looks.
                fut.add_done_callback(lambda f, key=key: self._forget(key, f))
            return fut

    def _forget(self, key: tuple[str, str], fut: concurrent.futures.Future) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def _call_hook(self, base_model_name: str, lora_name: str) -> LoRARequest:
        try:
            result = self.plugin_manager.hook.loraplex_resolve_lora(base_model_name=base_model_name,
                                                                    lora_name=lora_name)
        except LoRAError:
            raise  # already typed and worded for the user
        except Exception as e:
            logger.warning("resolving LoRA adapter %r failed: %s: %s", lora_name, type(e).__name__, e)
            raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: a resolver failed "
                                    f"({type(e).__name__}: {e})", lora_name) from e
        if result is None:
            raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: no resolver plugin "
                                    f"knows it for base model '{base_model_name}'", lora_name)
        if not isinstance(result, LoRARequest):
            raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: a resolver returned "
                                    f"{type(result).__name__}, not a LoRARequest", lora_name)
        return result

    async def resolve(self, base_model_name: str, lora_name: str) -> LoRARequest:
        """Resolve ``lora_name``; raises ``LoRANotFoundError`` (or another LoRAError) on failure."""
        fut = self._future(base_model_name, lora_name)
        # shield: one cancelled waiter must not cancel the call the others are waiting on.
        return await asyncio.shield(asyncio.wrap_future(fut))

    def resolve_sync(self, base_model_name: str, lora_name: str, timeout: float | None = None) -> LoRARequest:
        """Blocking form of ``resolve`` for threads and scripts."""
        return self._future(base_model_name, lora_name).result(timeout)

    def shutdown(self, wait: bool = False) -> None:
        if not self._own_executor:
            return  # the caller's pool is the caller's to shut down
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)
