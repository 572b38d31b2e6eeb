"""Example loraplex plugin: resolve adapter NAME to $EXAMPLE_RESOLVER_DIR/NAME.

Installed plugins are default-on; set ``LORAPLEX_DEFAULT_ON = False`` here to make users name it
in ``LORAPLEX_PLUGINS`` before it loads.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

from loraplex.errors import LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl


@hookimpl
def loraplex_resolve_lora(base_model_name: str, lora_name: str) -> LoRARequest | None:
    root = os.environ.get("EXAMPLE_RESOLVER_DIR")
    if not root:
        return None  # not configured: let other resolvers answer
    if lora_name.startswith("/") or ".." in lora_name.split("/"):
        raise LoRANotFoundError(f"example resolver refuses adapter name '{lora_name}'", lora_name)
    path = Path(root) / lora_name
    if not (path / "adapter_config.json").is_file():
        return None
    # Any positive id will do: the engine assigns its own.
    return LoRARequest(lora_name=lora_name, lora_int_id=zlib.crc32(lora_name.encode()) + 1, lora_path=str(path),
                       base_model_name=base_model_name)
