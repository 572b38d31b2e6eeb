"""vLLM's resolver API (``vllm.lora.resolver``): ``LoRAResolver`` and ``LoRAResolverRegistry``.

Code written for vLLM (a general plugin calling ``LoRAResolverRegistry.register_resolver``) works
unchanged. Registered resolvers take part in resolution through ``ResolverRegistryBridge``, a
built-in ``loraplex_resolve_lora`` implementation that the plugin manager always registers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
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


def run_coroutine_sync(coro):
    """Run ``coro`` to completion from synchronous code, even if this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run refuses to nest; a helper thread gets a loop of its own.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class ResolverRegistryBridge:
    """Built-in plugin: asks every registered ``LoRAResolver``, in registration order."""

    def __init__(self, registry: _LoRAResolverRegistry = LoRAResolverRegistry):
        self.registry = registry

    @hookimpl
    def loraplex_resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        first_error: BaseException | None = None
        for name, resolver in list(self.registry.resolvers.items()):
            try:
                result = run_coroutine_sync(resolver.resolve_lora(base_model_name, lora_name))
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
