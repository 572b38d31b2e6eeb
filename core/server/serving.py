"""Generation: tokenize (off the engine thread), add the engine requests, then answer whole or streamed.

Tokenizing and chat templating run in the frontend's threads (``loraplex.server.frontend``), with copies
of the engine's tokenizer (its own, loaded the same way, when the engine runs in another process), so a prompt is tokenized exactly as ``LLM.generate`` / ``LLM.chat`` tokenize
it, and a long prompt or template costs its own request time, not every tenant's.
"""
from __future__ import annotations

import asyncio
import contextlib

from loraplex.errors import LoRANotFoundError, PromptTooLongError
from loraplex.sampling_params import RequestOutputKind
from loraplex.server.errors import APIError, sse_error
from loraplex.server.protocol import GenerateRequest
from loraplex.server.responses import DONE, Choices, EventStream, usage


def _check_length(limit: int, ids: list[int], max_tokens: int | None) -> None:
    if max_tokens is not None and len(ids) + max_tokens > limit:
        raise PromptTooLongError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.")


async def prepare_prompts(req: GenerateRequest, state) -> tuple[list[dict], list]:
    """The engine prompts of ``req`` (token ids, and the text where there is one) and, with ``req.echo``,
    (prompt text, first prompt token's text) per prompt; computed in a frontend thread."""
    frontend, max_model_len = state.frontend, state.models.max_model_len
    # Files and remote URLs first, in the fetch threads; base64 and decoding then in the tokenizing thread.
    fetched = await frontend.fetch_media(req.media) if req.media else {}

    def work(tok):
        if req.messages is not None and req.media:
            images, audios = frontend.decode_media(req.media, fetched)
            prompts = [frontend.chat_multimodal(tok, req.messages, req.chat_kwargs, images, audios)]
        elif req.messages is not None:
            prompts = [{"prompt_token_ids": frontend.chat_ids(tok, req.messages, req.chat_kwargs)}]
        else:
            prompts = []
            for p in req.prompts:
                if isinstance(p, str):
                    if tok is None:
                        raise APIError(400, "This server has no tokenizer: send token ids", param="prompt")
                    prompts.append({"prompt": p, "prompt_token_ids": tok.encode(p)})
                else:
                    prompts.append({"prompt_token_ids": list(p)})
        for p in prompts:
            _check_length(max_model_len, p["prompt_token_ids"], req.params.max_tokens)
            p["cache_salt"] = req.cache_salt
        echo = []
        if req.echo:
            if tok is None:
                raise APIError(400, "This server has no tokenizer: 'echo' needs one", param="echo")
            echo = [(p["prompt"] if p.get("prompt") is not None else tok.decode(p["prompt_token_ids"]),
                     tok.decode(p["prompt_token_ids"][:1])) for p in prompts]
        return prompts, echo

    return await frontend.run(work)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def generate(request, req: GenerateRequest, kind: str, state):
    """Run a validated request; returns a JSON-able dict, or an EventStream when streaming."""
    lora_name = await state.models.lora_for(req.model)
    model_label = req.model or state.models.base_name
    request.state.model_label = model_label  # only now: a name known to exist
    # A stream shows each step's news: DELTA outputs, O(new tokens) each. A whole response needs only the end.
    req.params.output_kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    prompts, echo = await prepare_prompts(req, state)
    try:
        group = await state.aengine.generate(prompts, req.params, lora_name)
    except LoRANotFoundError:  # unloaded since lora_for() saw it
        raise state.models.not_found(lora_name) from None
    group.num_seqs = len(group.ids) * req.params.n  # scales the bound on what a stalled stream may hold
    choices = Choices(kind, req.model or state.models.base_name, group.ids, req.params.n, req.logprobs,
                      req.top_logprobs, echo if req.echo else None, req.echo_only)
    if req.stream:
        return EventStream(_stream(group, choices, req, model_label, state), on_close=lambda: _close(group, state))
    # The body is read: the next receive() returns only when the client disconnects.
    watcher = asyncio.create_task(_wait_disconnect(request.receive))
    watcher.add_done_callback(lambda _: group.abort())
    try:
        outputs = await group.collect()
    except BaseException:
        _close(group, state)
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    state.metrics.observe(model_label, group, usage(outputs))
    return choices.response(outputs)


def _close(group, state) -> None:
    """However a request ends: what still runs is aborted and counted as aborted (a no-op once answered)."""
    if not group.done:
        state.metrics.observe_aborted(group)
    group.abort()


async def _stream(group, choices: Choices, req: GenerateRequest, model_label: str, state):
    for event in choices.first_events():
        yield event
    try:
        async for outs in group.batches():
            events = [event for out in outs for event in choices.events(out)]
            if events:
                yield "".join(events)
        counts = choices.stream_usage()
        state.metrics.observe(model_label, group, counts)
        if req.include_usage:
            yield choices.usage_event(counts)
    except Exception as exc:  # the status line is gone already: report in-band, as vLLM does
        yield sse_error(exc)
    yield DONE
