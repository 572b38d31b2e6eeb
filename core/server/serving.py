"""Generation: build engine requests (in the engine thread), then answer whole or streamed.

Tokenization and chat templating run in the engine thread with the engine's own tokenizer, both
because the tokenizer is not safe to share across threads and so that a prompt is tokenized
exactly as ``LLM.generate`` / ``LLM.chat`` tokenize it.
"""
from __future__ import annotations

import asyncio
import contextlib

from loraplex.errors import PromptTooLongError
from loraplex.server.errors import APIError, sse_error
from loraplex.server.protocol import GenerateRequest
from loraplex.server.responses import DONE, Choices, EventStream


def _check_length(engine, ids: list[int], max_tokens: int | None) -> None:
    limit = engine.max_model_len
    if max_tokens is not None and len(ids) + max_tokens > limit:
        raise PromptTooLongError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.")


def _chat_ids(engine, req: GenerateRequest) -> list[int]:
    tok = engine.tokenizer
    if tok is None:
        raise APIError(400, "This server was started without a tokenizer; chat needs one")
    try:
        ids = tok.apply_chat_template(req.messages, tokenize=True, **req.chat_kwargs)
    except Exception as e:  # jinja errors, a tokenizer without a chat template, bad template kwargs
        raise APIError(400, f"Cannot apply the chat template: {type(e).__name__}: {e}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def request_builder(req: GenerateRequest, lora_name: str | None, models, echo: list | None = None):
    """``build(engine)`` for ``AsyncEngine.generate``: one engine request per prompt. With ``req.echo``, ``echo``
    receives (prompt text, first prompt token's text) per prompt, decoded here, in the engine thread."""

    def build(engine):
        lora = models.lora_request(engine, lora_name)
        if req.messages is not None:
            prompts = [{"prompt_token_ids": _chat_ids(engine, req)}]
        else:
            prompts = []
            for p in req.prompts:
                if isinstance(p, str):
                    if engine.tokenizer is None:
                        raise APIError(400, "This server has no tokenizer: send token ids", param="prompt")
                    prompts.append({"prompt": p, "prompt_token_ids": engine.tokenizer.encode(p)})
                else:
                    prompts.append({"prompt_token_ids": list(p)})
        for p in prompts:
            _check_length(engine, p["prompt_token_ids"], req.params.max_tokens)
        if req.echo:
            tok = engine.tokenizer
            if tok is None:
                raise APIError(400, "This server has no tokenizer: 'echo' needs one", param="echo")
            echo[:] = [(p["prompt"] if p.get("prompt") is not None else tok.decode(p["prompt_token_ids"]),
                        tok.decode(p["prompt_token_ids"][:1])) for p in prompts]
        return [(p, req.params, lora) for p in prompts]

    return build


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def generate(request, req: GenerateRequest, kind: str, state):
    """Run a validated request; returns a JSON-able dict, or an EventStream when streaming."""
    lora_name = await state.models.lora_for(req.model)
    model_label = req.model or state.models.base_name
    request.state.model_label = model_label  # only now: a name known to exist
    echo: list = []
    group = await state.aengine.generate(request_builder(req, lora_name, state.models, echo))
    choices = Choices(kind, req.model or state.models.base_name, group.ids, req.params.n, req.logprobs,
                      req.top_logprobs, echo if req.echo else None, req.echo_only)
    if req.stream:
        return EventStream(_stream(group, choices, req, model_label, state), on_close=group.abort)
    # The body is read: the next receive() returns only when the client disconnects.
    watcher = asyncio.create_task(_wait_disconnect(request.receive))
    watcher.add_done_callback(lambda _: group.abort())
    try:
        outputs = await group.collect()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    state.metrics.observe(model_label, group, outputs)
    return choices.response(outputs)


async def _stream(group, choices: Choices, req: GenerateRequest, model_label: str, state):
    for event in choices.first_events():
        yield event
    try:
        async for out in group:
            for event in choices.events(out):
                yield event
        outputs = [group.final[rid] for rid in group.ids]
        state.metrics.observe(model_label, group, outputs)
        if req.include_usage:
            yield choices.usage_event(outputs)
    except Exception as exc:  # the status line is gone already: report in-band, as vLLM does
        yield sse_error(exc)
    yield DONE
