"""OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions. Thin: parse, delegate, shape."""
from __future__ import annotations

from starlette.responses import JSONResponse, Response

from loraplex.server import serving
from loraplex.server.generation_config import apply_defaults, cap_max_tokens
from loraplex.server.protocol import parse_chat, parse_completion, read_json


async def list_models(request) -> Response:
    return JSONResponse(request.state.server.models.list_models())


async def completions(request) -> Response:
    return await _generate(request, "completion")


async def chat_completions(request) -> Response:
    return await _generate(request, "chat")


async def _generate(request, kind: str) -> Response:
    state = request.state.server
    body = await read_json(request, state.max_body_bytes)
    # Known before the body is checked, so a 400 on a served model is counted under its name.
    request.state.model_label = state.models.known_label(body.get("model"))
    body = apply_defaults(body, state.sampling_defaults)
    if kind == "chat":
        req = parse_chat(body, state.max_logprobs, state.limits, state.models.max_model_len, state.media)
    else:
        req = parse_completion(body, state.max_logprobs, state.limits, state.models.max_model_len)
    cap_max_tokens(req.params, state.sampling_defaults)
    result = await serving.generate(request, req, kind, state)
    return result if isinstance(result, Response) else JSONResponse(result)
