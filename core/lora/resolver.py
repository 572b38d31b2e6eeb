"""vLLM's resolver API (``vllm.lora.resolver``): ``LoRAResolver`` and ``LoRAResolverRegistry``.

Code written for vLLM (a general plugin calling ``LoRAResolverRegistry.register_resolver``) works
unchanged. Registered resolvers take part in resolution through ``ResolverRegistryBridge``, a
built-in ``loraplex_resolve_lora`` implementation that the plugin manager always registers.

Every ``resolve_lora`` coroutine runs on one long-lived event loop (a daemon thread, one per process),
as vLLM awaits them on one loop: async clients such as s3fs/aiobotocore bind their HTTP session to the
loop of their first call, and a loop per call would leave them holding a closed one.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Set

from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl

logger = logging.getLogger("loraplex.plugins")


class LoRAResolver(ABC):
    """Finds (and, if needed, downloads) an adapter by name; vLLM's interface."""

    @abstractmethod
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """Return a LoRARequest for ``lora_name`` served on ``base_model_name``, or None if unknown."""


class _LoRAResolverRegistry:
    def __init__(self) -> None:
        self.resolvers: dict[str, LoRAResolver] = {}
        self._lock = threading.Lock()

    def get_supported_resolvers(self) -> Set[str]:
        return self.resolvers.keys()

    def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
        """Register (or, with a warning, replace) a resolver under ``resolver_name``."""
        if not isinstance(resolver, LoRAResolver):
            raise TypeError(f"resolver {resolver_name!r} must be a LoRAResolver, got {type(resolver).__name__}")
        with self._lock:
            if resolver_name in self.resolvers:
                logger.warning("LoRA resolver %r is already registered and will be overwritten", resolver_name)
            # Copy-on-write so the bridge can iterate a snapshot without holding the lock.
            self.resolvers = {**self.resolvers, resolver_name: resolver}

    def get_resolver(self, resolver_name: str) -> LoRAResolver:
        try:
            return self.resolvers[resolver_name]
        except KeyError:
            raise KeyError(f"LoRA resolver '{resolver_name}' not found. "
                           f"Available resolvers: {list(self.resolvers)}") from None

    def unregister_resolver(self, resolver_name: str) -> bool:
        with self._lock:
            if resolver_name not in self.resolvers:
                return False
            self.resolvers = {k: v for k, v in self.resolvers.items() if k != resolver_name}
            return True


LoRAResolverRegistry = _LoRAResolverRegistry()


# A hung resolver would otherwise hold a resolution worker, and every request for its name, forever;
# an hour leaves room for multi-gigabyte downloads.
DEFAULT_RESOLVE_TIMEOUT = 3600.0

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def _reset_after_fork() -> None:
    # The lock may have been held by a parent thread at fork time; the loop's thread did not survive.
    global _loop_lock, _loop, _loop_pid
    _loop_lock, _loop, _loop_pid = threading.Lock(), None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def resolver_loop() -> asyncio.AbstractEventLoop:
    """The process's resolver event loop, started on first use (and afresh in a forked child)."""
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid():
            loop = asyncio.new_event_loop()
            # Daemon: a resolver stuck in a download must not keep the process from exiting.
            threading.Thread(target=loop.run_forever, name="loraplex-resolver-loop", daemon=True).start()
            _loop, _loop_pid = loop, os.getpid()
        return _loop


def run_coroutine_sync(coro, timeout: float | None = None):
    """Run ``coro`` on the resolver loop and wait for it from this (non-loop) thread.

    Blocks the calling thread, so call it from a worker thread (resolution's pool), never from a
    server's event loop. If the wait ends early (timeout, interrupt), the coroutine is cancelled.
    """
    loop = resolver_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("run_coroutine_sync called from the resolver loop itself; await the coroutine instead")
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        # cancel() fails once the coroutine is done: it finished just now, or raised TimeoutError itself.
        if not fut.cancel():
            return fut.result()
        raise TimeoutError(f"coroutine did not finish within {timeout} s") from None
    except BaseException:
        fut.cancel()  # no-op if it already finished
        raise


class ResolverRegistryBridge:
    """Built-in plugin: asks every registered ``LoRAResolver``, in registration order."""

    def __init__(self, registry: _LoRAResolverRegistry = LoRAResolverRegistry,
                 timeout: float | None = DEFAULT_RESOLVE_TIMEOUT):
        """``timeout``: seconds one resolver may take (None: no limit); past it, it is cancelled."""
        self.registry = registry
        self.timeout = timeout

    @hookimpl
    def loraplex_resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        first_error: BaseException | None = None
        for name, resolver in list(self.registry.resolvers.items()):
            try:
                result = run_coroutine_sync(resolver.resolve_lora(base_model_name, lora_name),
                                            self.timeout)
            except Exception as e:  # one broken resolver must not hide the others
                logger.warning("LoRA resolver %r failed on %r: %s", name, lora_name, e)
                first_error = first_error or e
                continue
            if result is not None:
                logger.info("LoRA resolver %r resolved %r to %s", name, lora_name, result.lora_path)
                return result
        if first_error is not None:
            raise first_error
        return None
