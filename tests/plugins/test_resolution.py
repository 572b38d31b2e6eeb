"""LoRAResolution (single flight, thread pool, error wording) and vLLM's LoRAResolver / registry API."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from loraplex.errors import LoRALoadError, LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.lora.resolution import LoRAResolution
from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry, run_coroutine_sync
from loraplex.plugins import hookimpl
from loraplex.plugins.manager import new_plugin_manager


class Counting:
    """A resolver plugin that takes ``delay`` seconds, or waits for ``gate`` when the name is gated."""

    def __init__(self, delay=0.0, fail_times=0, gated=()):
        self.calls: dict[str, int] = {}
        self.delay, self.fail_times, self.gated = delay, fail_times, set(gated)
        self.gate = threading.Event()
        self.lock = threading.Lock()

    @hookimpl
    def loraplex_resolve_lora(self, base_model_name, lora_name):
        with self.lock:
            n = self.calls[lora_name] = self.calls.get(lora_name, 0) + 1
        if lora_name in self.gated:
            assert self.gate.wait(30)
        time.sleep(self.delay)
        if n <= self.fail_times:
            raise ConnectionError(f"store hiccup #{n}")
        if lora_name == "unknown":
            return None
        return LoRARequest(lora_name, n, f"/adapters/{base_model_name}/{lora_name}")


def _service(plugin):
    pm = new_plugin_manager()
    pm.register(plugin)
    return LoRAResolution(pm)


def test_concurrent_resolves_of_one_name_share_one_call():
    plugin = Counting(delay=0.3)
    res = _service(plugin)

    async def main():
        return await asyncio.gather(*(res.resolve("base", "a") for _ in range(16)))

    sync_results = []
    t = threading.Thread(target=lambda: sync_results.append(res.resolve_sync("base", "a")))
    t.start()
    results = asyncio.run(main())
    t.join()
    assert plugin.calls == {"a": 1}
    assert len({id(r) for r in results + sync_results}) == 1
    assert results[0].lora_path == "/adapters/base/a"
    # Once finished nothing is remembered: the engine owns resolved adapters.
    res.resolve_sync("base", "a")
    assert plugin.calls == {"a": 2}
    res.shutdown()


def test_slow_name_blocks_neither_the_loop_nor_other_names():
    plugin = Counting(gated={"slow"})
    res = _service(plugin)

    async def main():
        slow = asyncio.ensure_future(res.resolve("base", "slow"))
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0.01)
            ticks += 1
        fast = await asyncio.wait_for(res.resolve("base", "fast"), 10)
        assert not slow.done()
        plugin.gate.set()
        return ticks, fast, await asyncio.wait_for(slow, 10)

    ticks, fast, slow = asyncio.run(main())
    assert ticks == 5 and fast.lora_name == "fast" and slow.lora_name == "slow"
    res.shutdown()


def test_failure_is_wrapped_and_not_cached():
    plugin = Counting(fail_times=1)
    res = _service(plugin)
    with pytest.raises(LoRANotFoundError) as err:
        res.resolve_sync("base", "flaky")
    assert "'flaky'" in str(err.value) and "store hiccup #1" in str(err.value) and err.value.lora_name == "flaky"
    assert res.resolve_sync("base", "flaky").lora_int_id == 2


def test_not_found_names_the_adapter_and_base():
    res = _service(Counting())
    with pytest.raises(LoRANotFoundError, match="'unknown'.*'base'"):
        asyncio.run(res.resolve("base", "unknown"))


def test_typed_errors_pass_through_and_bad_results_are_refused():
    class Plugin:
        @hookimpl
        def loraplex_resolve_lora(self, lora_name):
            if lora_name == "typed":
                raise LoRALoadError("adapter 'typed' is corrupt", lora_name)
            return {"lora_path": "/x"}

    res = _service(Plugin())
    with pytest.raises(LoRALoadError, match="corrupt"):
        res.resolve_sync("base", "typed")
    with pytest.raises(LoRANotFoundError, match="returned dict, not a LoRARequest"):
        res.resolve_sync("base", "other")


def test_one_cancelled_waiter_does_not_cancel_the_others():
    plugin = Counting(gated={"a"})
    res = _service(plugin)

    async def main():
        first = asyncio.ensure_future(res.resolve("base", "a"))
        second = asyncio.ensure_future(res.resolve("base", "a"))
        await asyncio.sleep(0.05)
        first.cancel()
        plugin.gate.set()
        return await asyncio.wait_for(second, 10), first

    got, first = asyncio.run(main())
    assert got.lora_name == "a" and first.cancelled() and plugin.calls == {"a": 1}


# --- vLLM's resolver API ---------------------------------------------------------------------

class DirResolver(LoRAResolver):
    def __init__(self, known, fail=False):
        self.known, self.fail = known, fail

    async def resolve_lora(self, base_model_name, lora_name):
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("registry resolver broke")
        if lora_name in self.known:
            return LoRARequest(lora_name, 3, f"/{base_model_name}/{lora_name}")
        return None


@pytest.fixture
def registry():
    before = dict(LoRAResolverRegistry.resolvers)
    yield LoRAResolverRegistry
    for name in list(LoRAResolverRegistry.resolvers):
        if name not in before:
            LoRAResolverRegistry.unregister_resolver(name)


def test_registry_api_matches_vllm(registry, caplog):
    r = DirResolver({"x"})
    registry.register_resolver("dir", r)
    assert registry.get_resolver("dir") is r and "dir" in registry.get_supported_resolvers()
    with caplog.at_level(logging.WARNING, logger="loraplex.plugins"):
        registry.register_resolver("dir", DirResolver({"y"}))
    assert "overwritten" in caplog.text and registry.get_resolver("dir") is not r
    with pytest.raises(KeyError, match="not found"):
        registry.get_resolver("nope")
    with pytest.raises(TypeError):
        registry.register_resolver("bad", object())


def test_registered_resolvers_take_part_through_the_bridge(registry):
    res = LoRAResolution(new_plugin_manager())
    registry.register_resolver("broken", DirResolver(set(), fail=True))
    with pytest.raises(LoRANotFoundError, match="registry resolver broke"):
        res.resolve_sync("base", "x")
    registry.register_resolver("dir", DirResolver({"x"}))
    req = asyncio.run(res.resolve("base", "x"))
    assert req.lora_path == "/base/x" and req.lora_int_id == 3


def test_coroutines_run_from_inside_an_event_loop_too():
    async def inner():
        return run_coroutine_sync(DirResolver({"x"}).resolve_lora("b", "x"))

    assert asyncio.run(inner()).lora_path == "/b/x"
