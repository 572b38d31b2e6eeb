"""vLLM's runtime adapter management, mounted only when runtime LoRA updating is allowed.

Success bodies are plain text, exactly as vLLM answers them.
"""
from __future__ import annotations

from starlette.responses import PlainTextResponse, Response

from loraplex.server.protocol import parse_load_lora, parse_unload_lora, read_json


async def load_lora_adapter(request) -> Response:
    state = request.state.server
    name, path, inplace = parse_load_lora(await read_json(request, state.max_body_bytes))
    await state.models.load(name, path, inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request) -> Response:
    state = request.state.server
    name = parse_unload_lora(await read_json(request, state.max_body_bytes))
    await state.models.unload(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
