"""A vLLM general plugin: a function run once that registers a LoRAResolver."""
from __future__ import annotations

import os
from pathlib import Path

from loraplex.lora.request import LoRARequest
from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry


class PrefixResolver(LoRAResolver):
    """Serves ``vllm-style/NAME`` from ``$VLLM_STYLE_RESOLVER_DIR/NAME``."""

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        root = os.environ.get("VLLM_STYLE_RESOLVER_DIR")
        if not root or not lora_name.startswith("vllm-style/"):
            return None
        path = Path(root) / lora_name.split("/", 1)[1]
        if not (path / "adapter_config.json").is_file():
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=7, lora_path=str(path))


def register() -> None:
    LoRAResolverRegistry.register_resolver("vllm_style_prefix", PrefixResolver())
