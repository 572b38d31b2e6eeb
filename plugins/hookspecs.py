"""Every hook a loraplex plugin can implement, in one module (the pluggy / pytest ``hookspec.py`` way).

A plugin is a module or object with functions named like these specs and marked ``@hookimpl``
(``from loraplex.plugins import hookimpl``). It may implement any subset, and may leave out
arguments it does not need. pluggy calls implementations last-registered first, so a third-party
plugin (loaded from an entry point) runs before the built-ins and overrides them on
``firstresult`` hooks. See docs/plugins.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraplex.plugins import hookspec

if TYPE_CHECKING:
    import torch

    from loraplex.engine.policy import SchedulingPolicy
    from loraplex.lora.request import LoRARequest


@hookspec(firstresult=True)
def loraplex_resolve_lora(base_model_name: str, lora_name: str) -> LoRARequest | None:
    """Find the adapter ``lora_name`` for the served ``base_model_name`` and return a LoRARequest
    whose ``lora_path`` is a local directory (or whatever ``loraplex_load_adapter`` understands).

    Return None when this plugin does not know the name, so the next plugin is asked. Raise
    ``loraplex.errors.LoRANotFoundError`` when the name is yours but cannot be served (bad name,
    unreachable store). Blocking is fine (downloads): the engine calls this from a worker thread,
    and concurrent requests for one name share a single call. The ``lora_int_id`` you return is a
    hint; the engine assigns its own ids.
    """


@hookspec(firstresult=True)
def loraplex_load_adapter(lora_request: LoRARequest) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Turn a resolved adapter into ``(adapter_config, state_dict)`` in PEFT's layout:
    ``adapter_config`` as in PEFT's adapter_config.json (``r``, ``lora_alpha``, ``target_modules``...)
    and tensors named as in PEFT's adapter_model.safetensors.

    Return None to leave the request to the next plugin; the built-in implementation
    (``loraplex.lora.peft_loader``) reads a PEFT directory or hub repo. Implement this to read
    another format or source. Called from the engine's loader threads (``num_lora_loader_workers``
    of them, concurrently for different adapters), never from the engine thread: blocking I/O is
    fine and stalls no other request, but the implementation must be thread-safe. An exception
    fails the requests waiting for this adapter only (a ``LoRAError`` keeps its message; anything
    else becomes a ``LoRALoadError`` naming the adapter).
    """


@hookspec(firstresult=True)
def loraplex_scheduling_policy(max_num_seqs: int, max_loras: int) -> SchedulingPolicy | None:
    """Return the policy that orders waiting requests (``loraplex.engine.policy.SchedulingPolicy``),
    or None to keep first-come-first-served. Called once when the engine is built. The scheduler
    still enforces every hard limit (token budget, KV blocks, ``max_loras`` distinct adapters).
    """


@hookspec
def loraplex_engine_started(engine: Any) -> None:
    """Called once an ``LLMEngine`` is built and ready for requests (e.g. to warm adapters or
    start a metrics exporter). Must not block for long: it runs during engine construction.
    """


@hookspec
def loraplex_adapter_loaded(lora_name: str, lora_path: str, tier: str, load_time_s: float) -> None:
    """Called after an adapter's weights entered the CPU cache (``tier`` is ``"cpu"``; read and
    packed by a loader thread in ``load_time_s`` seconds). Runs on the engine thread: return quickly.
    """


@hookspec
def loraplex_adapter_evicted(lora_name: str, tier: str) -> None:
    """Called when an adapter's weights left the ``"cpu"`` cache or the ``"gpu"`` pool to make
    room. Runs on the engine thread: return quickly.
    """
