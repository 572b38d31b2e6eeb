"""Request bodies: read (with a size cap), type-check and turn into SamplingParams.

Every failure is an ``APIError`` (400, or 413 for a body too large) naming the field in ``param``,
so a malformed request never reaches the engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from loraplex.sampling_params import SamplingParams
from loraplex.server.errors import APIError

DEFAULT_MAX_BODY_BYTES = 10 * 2**20
_MISSING = object()


async def read_json(request, max_bytes: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(len(body), max_bytes)
    try:
        data = json.loads(body)
    except ValueError as e:  # also UnicodeDecodeError
        raise APIError(400, f"Invalid JSON body: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}")
    return data


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"Request body too large: {size} bytes exceeds the limit of {limit} bytes")


# ---------------------------------------------------------------------------- field checks
def _bad(name: str, what: str, value) -> APIError:
    return APIError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)


def _get(body: dict, name: str, kind: str, default=None):
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        raise _bad(name, {"str": "a string", "bool": "a boolean", "int": "an integer", "number": "a number",
                          "dict": "an object", "list": "an array"}[kind], value)
    return value


def _stop(body: dict):
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return stop
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise _bad("stop", "a string or an array of strings", stop)


def _int_list(body: dict, name: str) -> list[int] | None:
    value = _get(body, name, "list")
    if value is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _bad(name, "an array of integers", value)
    return value


def _unsupported(body: dict, **checks) -> None:
    for name, is_default in checks.items():
        if name in body and body[name] is not None and not is_default(body[name]):
            raise APIError(400, f"'{name}' is not supported by loraplex", param=name)


@dataclass
class GenerateRequest:
    model: str | None
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    prompts: list = field(default_factory=list)   # completions: str or list[int] each
    messages: list | None = None                  # chat
    chat_kwargs: dict = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0


def _sampling(body: dict, max_tokens, logprobs, max_logprobs: int) -> SamplingParams:
    if logprobs is not None and not 0 <= logprobs <= max_logprobs:
        raise APIError(400, f"'logprobs' must be in [0, {max_logprobs}], got {logprobs}", param="logprobs")
    n = _get(body, "n", "int", 1)
    best_of = _get(body, "best_of", "int")
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' different from 'n' is not supported by loraplex", param="best_of")
    kwargs = dict(
        n=n, max_tokens=max_tokens, logprobs=logprobs, stop=_stop(body),
        temperature=_get(body, "temperature", "number", 1.0), top_p=_get(body, "top_p", "number", 1.0),
        top_k=_get(body, "top_k", "int", 0), min_p=_get(body, "min_p", "number", 0.0),
        seed=_get(body, "seed", "int"), min_tokens=_get(body, "min_tokens", "int", 0),
        presence_penalty=_get(body, "presence_penalty", "number", 0.0),
        frequency_penalty=_get(body, "frequency_penalty", "number", 0.0),
        repetition_penalty=_get(body, "repetition_penalty", "number", 1.0),
        ignore_eos=_get(body, "ignore_eos", "bool", False), stop_token_ids=_int_list(body, "stop_token_ids"),
        skip_special_tokens=_get(body, "skip_special_tokens", "bool", True),
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", "bool", False),
    )
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        # "SamplingParams.top_p must be ..." -> param "top_p"
        param = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e).removeprefix("SamplingParams."), param=param if param in kwargs else None) from None


def _common(body: dict) -> tuple[str | None, bool, bool]:
    _unsupported(body, logit_bias=lambda v: not v, suffix=lambda v: not v, echo=lambda v: v is False,
                 tools=lambda v: not v, response_format=lambda v: isinstance(v, dict) and v.get("type") == "text")
    model = _get(body, "model", "str")
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "dict", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("stream_options.include_usage", "a boolean", include_usage)
    if options and not stream:
        raise APIError(400, "'stream_options' needs 'stream': true", param="stream_options")
    return model or None, stream, include_usage


def parse_completion(body: dict, max_logprobs: int) -> GenerateRequest:
    model, stream, include_usage = _common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                                     for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise _bad("prompt", "a string, an array of strings, an array of token ids or an array of those", prompt)
    params = _sampling(body, _get(body, "max_tokens", "int", 16), _get(body, "logprobs", "int"), max_logprobs)
    return GenerateRequest(model, params, stream, include_usage, prompts=prompts,
                           logprobs=params.logprobs is not None)


def _message(i: int, m) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _bad(f"messages[{i}]", "an object with a string 'role'", m)
    content = m.get("content")
    if isinstance(content, list):  # OpenAI content parts: only text is served here
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "a string or an array of text parts", part)
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise _bad(f"messages[{i}].content", "a string or an array of text parts", content)
    return {**m, "content": content if content is not None else ""}


def parse_chat(body: dict, max_logprobs: int) -> GenerateRequest:
    model, stream, include_usage = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty array of messages", messages)
    messages = [_message(i, m) for i, m in enumerate(messages)]
    max_tokens = _get(body, "max_completion_tokens", "int", _get(body, "max_tokens", "int"))
    want_logprobs = _get(body, "logprobs", "bool", False)
    top = _get(body, "top_logprobs", "int")
    if top is not None and not want_logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params = _sampling(body, max_tokens, (top or 0) if want_logprobs else None, max_logprobs)
    kwargs = dict(_get(body, "chat_template_kwargs", "dict", {}))
    kwargs["add_generation_prompt"] = _get(body, "add_generation_prompt", "bool", True)
    return GenerateRequest(model, params, stream, include_usage, messages=messages, chat_kwargs=kwargs,
                           logprobs=want_logprobs, top_logprobs=top or 0)


def parse_load_lora(body: dict) -> tuple[str, str, bool]:
    for name in ("lora_name", "lora_path"):
        if name not in body:
            raise APIError(400, f"Field required: '{name}'", param=name)
    name, path = _get(body, "lora_name", "str", ""), _get(body, "lora_path", "str", "")
    if not name or not path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
    return name, path, _get(body, "load_inplace", "bool", False)


def parse_unload_lora(body: dict) -> str:
    name = _get(body, "lora_name", "str", "")
    if not name:
        raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
    return name
