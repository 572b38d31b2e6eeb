"""Request bodies: read (with a size cap), type-check and turn into SamplingParams.

Every failure is an ``APIError`` (400, or 413 for a body too large) naming the field in ``param``,
so a malformed request never reaches the engine.
"""
from __future__ import annotations


import json
import math
from dataclasses import dataclass, field

from loraplex.sampling_params import SamplingParams
from loraplex.server.errors import APIError
from loraplex.server.limits import RequestLimits
from loraplex.server.media import MEDIA_PARTS, PART_MODALITY, SERVED_PARTS, MediaRef, MediaSpec, media_ref

DEFAULT_LIMITS = RequestLimits()

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
    except RecursionError:
        raise APIError(400, "Invalid JSON body: nested too deeply") from None
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
        # json.loads reads NaN and Infinity: no sampling knob means anything at either.
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
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


# The fields each endpoint reads. Any other is refused by name (vLLM logs and ignores it): a client that sends
# guided_json must learn that its output will not be constrained.
_SAMPLING_FIELDS = frozenset({
    "model", "stream", "stream_options", "n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed",
    "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "stop",
    "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "logit_bias", "tools", "response_format",
    "user",  # the OpenAI API's end-user id: informational only, in vLLM too
    "cache_salt",  # vLLM's: only requests with the same salt share prefix-cache blocks
})
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "max_tokens", "logprobs", "echo", "suffix", "prompt_logprobs"}
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                                  "chat_template_kwargs", "chat_template", "add_generation_prompt", "tool_choice",
                                  "prompt_logprobs"}
_WHY_UNSUPPORTED = {
    "guided_": "structured outputs (guided decoding) are not implemented",
    "structured_outputs": "structured outputs (guided decoding) are not implemented",
    "tool": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    # vLLM's HTTP CompletionRequest has no multi_modal_data (it would log and drop it): media go in chat content
    # parts. Dropping it would answer about a prompt without its media.
    "multi_modal_data": "media are sent as /v1/chat/completions content parts (image_url, input_audio, audio_url); "
                        "vLLM's HTTP API takes no multi_modal_data either",
}


def _known_fields(body: dict, known: frozenset) -> None:
    for name in body:
        if name not in known:
            why = next((w for prefix, w in _WHY_UNSUPPORTED.items() if name.startswith(prefix)), "unknown field")
            raise APIError(400, f"'{name}' is not supported by loraplex ({why})", param=name)


def _text(value: str, param: str) -> str:
    """A JSON string may hold a lone surrogate (\\ud800), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' is not valid Unicode (it holds a lone surrogate)", param=param) from None
    return value


def _precheck(body: dict, limits: RequestLimits) -> None:
    """The count caps, on the raw body, before any per-element work: 10,000 stop strings must cost one len()."""
    stop, n, prompt = body.get("stop"), body.get("n"), body.get("prompt")
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings, got {len(stop)}", param="stop")
    if isinstance(n, int) and not isinstance(n, bool) and n > limits.max_n:
        raise APIError(400, f"'n' must be at most {limits.max_n}, got {n}", param="n")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(prompt)}", param="prompt")


def _check_limits(req: "GenerateRequest", limits: RequestLimits, max_model_len: int | None) -> None:
    """The per-request caps (docs/security.md): all before tokenizing, so a huge request costs nothing."""
    p = req.params
    if p.n > limits.max_n:
        raise APIError(400, f"'n' must be at most {limits.max_n}, got {p.n}", param="n")
    if len(req.prompts) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(req.prompts)}",
                       param="prompt")
    if len(p.stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings, got {len(p.stop)}", param="stop")
    if any(len(s) > limits.max_stop_chars for s in p.stop):
        raise APIError(400, f"a stop string may have at most {limits.max_stop_chars} characters", param="stop")
    for s in p.stop:
        _text(s, "stop")
    if max_model_len is None:
        return
    max_chars = limits.prompt_chars(max_model_len)
    if req.messages is not None:
        size = sum(len(m["content"]) for m in req.messages)
        if size > max_chars:
            raise APIError(400, f"the messages hold {size} characters; at most {max_chars} are accepted "
                           f"(max_model_len {max_model_len})", param="messages")
    for i, prompt in enumerate(req.prompts):
        if isinstance(prompt, str) and len(prompt) > max_chars:
            raise APIError(400, f"prompt {i} has {len(prompt)} characters; at most {max_chars} are accepted "
                           f"(max_model_len {max_model_len})", param="prompt")
    num_prompts = max(len(req.prompts), 1)
    work = num_prompts * p.n * (p.max_tokens or max_model_len)
    if work > limits.request_tokens(max_model_len):
        raise APIError(400, f"this request may generate {work} tokens (prompts x n x max_tokens); at most "
                       f"{limits.request_tokens(max_model_len)} are accepted", param="max_tokens")


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
    echo: bool = False       # completions: the prompt (and, with logprobs, its logprobs) before the completion
    echo_only: bool = False  # echo with max_tokens 0: the prompt alone (one token is generated and not shown)
    media: list = field(default_factory=list)  # chat: a MediaRef per media part, in order (read later)
    cache_salt: str | None = None


def _validation_error(message: str, param: str, value=None) -> APIError:
    """vLLM's VLLMValidationError body: the message names the parameter (and the value)."""
    extras = f"parameter={param}" + (f", value={value}" if value is not None else "")
    return APIError(400, f"{message} ({extras})", param=param)


def _check_logprobs(value, kind: str, param: str, max_logprobs: int) -> None:
    """vLLM's bounds on a logprobs count; kind is "sample" or "prompt". -1 (the whole vocabulary) is over
    the limit unless max_logprobs covers the vocabulary, which loraplex does not offer."""
    if value is None:
        return
    if value < 0 and value != -1:
        raise _validation_error(f"`{param}` must be a positive value or -1.", param, value)
    if value == -1 or value > max_logprobs:
        shown = "-1 (the whole vocabulary)" if value == -1 else value
        raise _validation_error(f"Requested {kind} logprobs of {shown}, which is greater than max allowed: "
                                f"{max_logprobs}", param, value)


def _cache_salt(body: dict) -> str | None:
    value = _get(body, "cache_salt", "str")
    if value is not None and not value:
        raise _validation_error("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    return None if value is None else _text(value, "cache_salt")


def _prompt_logprobs(body: dict, stream: bool, max_logprobs: int) -> int | None:
    value = _get(body, "prompt_logprobs", "int")
    if value is not None and stream and (value > 0 or value == -1):
        raise _validation_error("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
    _check_logprobs(value, "prompt", "prompt_logprobs", max_logprobs)
    return value


def _sampling(body: dict, max_tokens, logprobs, max_logprobs: int, prompt_logprobs: int | None = None
              ) -> SamplingParams:
    _check_logprobs(logprobs, "sample", "logprobs", max_logprobs)
    _check_logprobs(prompt_logprobs, "prompt", "prompt_logprobs", max_logprobs)
    n = _get(body, "n", "int", 1)
    best_of = _get(body, "best_of", "int")
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' different from 'n' is not supported by loraplex", param="best_of")
    kwargs = dict(
        n=n, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, stop=_stop(body),
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
                 tools=lambda v: not v, response_format=lambda v: isinstance(v, dict) and v.get("type") == "text",
                 tool_choice=lambda v: v == "none")
    model = _get(body, "model", "str")
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "dict", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("stream_options.include_usage", "a boolean", include_usage)
    if options and not stream:
        raise APIError(400, "'stream_options' needs 'stream': true", param="stream_options")
    return model or None, stream, include_usage


def parse_completion(body: dict, max_logprobs: int, limits: RequestLimits = DEFAULT_LIMITS,
                     max_model_len: int | None = None) -> GenerateRequest:
    _known_fields(body, COMPLETION_FIELDS)
    _precheck(body, limits)
    echo = _get(body, "echo", "bool", False)
    model, stream, include_usage = _common({k: v for k, v in body.items() if k != "echo"})
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        prompts = [_text(prompt, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                                     for t in p)) for p in prompt):
        prompts = [_text(p, "prompt") if isinstance(p, str) else p for p in prompt]
    else:
        raise _bad("prompt", "a string, an array of strings, an array of token ids or an array of those", prompt)
    logprobs = _get(body, "logprobs", "int")
    _check_logprobs(logprobs, "sample", "logprobs", max_logprobs)
    prompt_logprobs = _prompt_logprobs(body, stream, max_logprobs)
    if prompt_logprobs is None and echo:
        prompt_logprobs = logprobs  # as vLLM: echo with logprobs shows the prompt tokens' logprobs
    max_tokens = _get(body, "max_tokens", "int", 16)
    # vLLM: echo with max_tokens 0 scores the prompt; it runs one step and answers the prompt alone.
    echo_only = echo and max_tokens == 0
    params = _sampling(body, 1 if echo_only else max_tokens, logprobs, max_logprobs, prompt_logprobs)
    req = GenerateRequest(model, params, stream, include_usage, prompts=prompts,
                          logprobs=logprobs is not None, top_logprobs=logprobs or 0, echo=echo, echo_only=echo_only,
                          cache_salt=_cache_salt(body))
    _check_limits(req, limits, max_model_len)
    return req


def _media_part(where: str, kind: str, part: dict, spec: MediaSpec, refs: list) -> str:
    """A media part's MediaRef (appended to ``refs``) and the placeholder text that stands where it was."""
    modality = PART_MODALITY[kind]
    if modality not in spec.modalities:
        takes = f"takes {', '.join(spec.modalities)} only" if spec.modalities else "is text-only"
        raise APIError(400, f"'{where}' is a '{kind}' part, but the served model {takes}", param=where)
    if kind not in SERVED_PARTS:
        raise APIError(400, f"'{where}': '{kind}' parts are not supported; send images as 'image_url' parts and "
                       "audio as 'input_audio' or 'audio_url' parts", param=where)
    placeholder = spec.placeholder(modality)
    if placeholder is None:  # the model takes the modality but its processor names no placeholder text
        raise APIError(400, f"'{where}': the served model's processor names no {modality} placeholder, so "
                       f"{modality} parts cannot be placed in a chat prompt", param=where)
    refs.append(media_ref(part, kind, where))
    return placeholder  # where the part was: the processor expands it


def _message(i: int, m, spec: MediaSpec, refs: list) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise _bad(f"messages[{i}]", "an object with a string 'role'", m)
    content = m.get("content")
    if isinstance(content, list):  # OpenAI content parts: text, and media for a model that takes them
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PARTS:
                texts.append(_media_part(f"messages[{i}].content[{j}]", kind, part, spec, refs))
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "a string or an array of text parts", part)
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise _bad(f"messages[{i}].content", "a string or an array of text parts", content)
    return {**m, "content": _text(content, f"messages[{i}].content") if content is not None else ""}


def parse_chat(body: dict, max_logprobs: int, limits: RequestLimits = DEFAULT_LIMITS,
               max_model_len: int | None = None, media: MediaSpec = MediaSpec()) -> GenerateRequest:
    _known_fields(body, CHAT_FIELDS)
    _precheck(body, limits)
    model, stream, include_usage = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty array of messages", messages)
    refs: list[MediaRef] = []
    messages = [_message(i, m, media, refs) for i, m in enumerate(messages)]
    max_tokens = _get(body, "max_completion_tokens", "int", _get(body, "max_tokens", "int"))
    want_logprobs = _get(body, "logprobs", "bool", False)
    top = _get(body, "top_logprobs", "int")
    if top is not None and top < 0 and top != -1:
        raise _validation_error("`top_logprobs` must be a positive value or -1.", "top_logprobs", top)
    if top is not None and top != 0 and not want_logprobs:
        raise _validation_error("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    params = _sampling(body, max_tokens, (top or 0) if want_logprobs else None, max_logprobs,
                       _prompt_logprobs(body, stream, max_logprobs))
    kwargs = dict(_get(body, "chat_template_kwargs", "dict", {}))
    template = _get(body, "chat_template", "str")
    if template is not None:
        kwargs["chat_template"] = template
    if "chat_template" in kwargs:
        param = "chat_template" if template is not None else "chat_template_kwargs"
        if not limits.trust_request_chat_template:
            # vLLM's default too (GHSA-6fvq-23cw-5628): a template is code, and it would run on the server.
            raise APIError(400, "Chat template is passed with request, but --trust-request-chat-template is not "
                           "set. Refused request with untrusted chat template.", param=param)
        if not isinstance(kwargs["chat_template"], str):
            raise _bad(param, "a string", kwargs["chat_template"])
    kwargs["add_generation_prompt"] = _get(body, "add_generation_prompt", "bool", True)
    req = GenerateRequest(model, params, stream, include_usage, messages=messages, chat_kwargs=kwargs,
                          media=refs, logprobs=want_logprobs, top_logprobs=top or 0, cache_salt=_cache_salt(body))
    _check_limits(req, limits, max_model_len)
    return req


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
