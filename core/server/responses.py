"""OpenAI response shapes (vLLM's fields) for completions and chat, whole and streamed.

Whole responses read each request's final output (``RequestOutputKind.FINAL_ONLY``). Streams read DELTA
outputs (only the new text, token ids and logprobs of a step); ``Choices`` turns each into events and counts
the tokens for usage, since no output holds them all.
"""
from __future__ import annotations

import json
import time
import uuid

from starlette.responses import StreamingResponse


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """SSE response that runs ``on_close`` however it ends: completed, failed or client gone."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def usage(outputs: list) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(lp, token_id: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def _top(entry: dict, k: int) -> list:
    ranked = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                    key=lambda kv: kv[1].rank)
    return ranked[:k]


def _with_token_first(entry: dict, tid: int, k: int) -> list:
    """vLLM's top_logprobs of one position: the token itself, then the others by rank; k + 1 at most."""
    others = sorted(((t, lp) for t, lp in entry.items() if t != tid and lp.rank is not None),
                    key=lambda kv: kv[1].rank)
    return [(tid, entry[tid])] + others[:k]


def completion_logprobs(token_ids: list[int], entries: list, k: int, offset: int,
                        unscored_text: str | None = None) -> dict:
    """Legacy completions logprobs. An entry is None for the first prompt token of an echo (it has no
    logprob); unscored_text is that token's text."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        if entry is None:
            text = unscored_text if unscored_text is not None else f"token_id:{tid}"
            tokens.append(text)
            token_lps.append(None)
            tops.append(None)
        else:
            text = _token_text(entry[tid], tid)
            tokens.append(text)
            token_lps.append(max(entry[tid].logprob, -9999.0))
            tops.append({_token_text(lp, t): max(lp.logprob, -9999.0) for t, lp in _with_token_first(entry, tid, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(prompt_logprobs: list | None) -> list | None:
    """RequestOutput.prompt_logprobs as vLLM serialises it: per prompt token None (the first) or
    {token_id: {"logprob", "rank", "decoded_token"}}, -inf clamped to -9999.0."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else {
        tid: {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for tid, lp in entry.items()} for entry in prompt_logprobs]


def chat_logprobs(token_ids: list[int], entries: list[dict], k: int) -> dict:
    def item(t, lp):
        text = _token_text(lp, t)
        return {"token": text, "logprob": max(lp.logprob, -9999.0), "bytes": list(text.encode())}

    content = []
    for tid, entry in zip(token_ids, entries):
        content.append({**item(tid, entry[tid]), "top_logprobs": [item(t, lp) for t, lp in _top(entry, k)]})
    return {"content": content}


class Choices:
    """Turns engine outputs of one HTTP request into OpenAI choices (index = prompt * n + sample)."""

    def __init__(self, kind: str, model: str, ids: list[str], n: int, logprobs: bool, top_logprobs: int,
                 echo: list | None = None, echo_only: bool = False):
        self.kind, self.model, self.n = kind, model, n
        self.id, self.created = new_id(kind), int(time.time())
        self.prompt_index = {rid: i for i, rid in enumerate(ids)}
        self.logprobs, self.k = logprobs, top_logprobs
        # Completions' echo: per prompt (its text, its first token's text), filled when the request is built.
        self.echo, self.echo_only = echo, echo_only
        # Streams only: completion characters each choice sent (its logprobs' text_offset), the prompt text
        # it echoed, the choices that finished; per request its prompt length and prompt logprobs (a DELTA
        # output carries them once); completion tokens, for usage.
        self.sent_text: dict[int, int] = {}
        self.echoed: dict[int, int] = {}
        self.finished: set[int] = set()
        self.prompt_tokens: dict[str, int] = {}
        self.prompt_lps: dict[str, list] = {}
        self.completion_tokens = 0
        self._prefix: str | None = None  # a stream event's JSON up to its choice (``_plain_event``)

    def _logprobs(self, ids: list[int], entries: list | None, text_offset: int):
        if not self.logprobs or entries is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(ids, entries, self.k)
        return completion_logprobs(ids, entries, self.k, text_offset)

    def _echoed(self, rid: str, prompt_ids: list[int], prompt_lps: list | None, ids: list[int],
                entries: list | None, text: str) -> tuple[str, dict | None]:
        """A completion choice's text and logprobs with the prompt before them (vLLM's echo); the completion
        part (ids, entries, text) as given; none of it with echo_only."""
        prompt_text, first_text = self.echo[self.prompt_index[rid]]
        completion_ids, ids = ids, list(prompt_ids)
        completion_entries, entries = entries, list(prompt_lps) if prompt_lps is not None else [None] * len(ids)
        if not self.echo_only:
            ids += completion_ids
            entries += completion_entries or []
        text = prompt_text + ("" if self.echo_only else text)
        if not self.logprobs:
            return text, None
        return text, completion_logprobs(ids, entries, self.k, 0, first_text)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---------------------------------------------------------------- whole response
    def response(self, outputs: list) -> dict:
        choices = []
        for out in outputs:
            prompt_lps = prompt_logprobs_json(out.prompt_logprobs)
            for o in out.outputs:
                index = self.prompt_index[out.request_id] * self.n + o.index
                text, logprobs = o.text, self._logprobs(o.token_ids, o.logprobs, 0)
                if self.echo is not None:
                    text, logprobs = self._echoed(out.request_id, out.prompt_token_ids, out.prompt_logprobs,
                                                  o.token_ids, o.logprobs, o.text)
                common = {"index": index, "logprobs": logprobs, "finish_reason": o.finish_reason,
                          "stop_reason": o.stop_reason}
                if self.kind == "chat":
                    choices.append({**common, "message": {"role": "assistant", "content": o.text,
                                                          "tool_calls": []}})
                else:
                    choices.append({**common, "text": text, "prompt_logprobs": prompt_lps})
        choices.sort(key=lambda c: c["index"])
        if self.kind == "chat":
            # vLLM puts a chat request's prompt logprobs at the top level, not in a choice.
            prompt_lps = prompt_logprobs_json(outputs[0].prompt_logprobs) if outputs else None
            return {**self._head("chat.completion"), "choices": choices, "usage": usage(outputs),
                    "prompt_logprobs": prompt_lps}
        return {**self._head("text_completion"), "choices": choices, "usage": usage(outputs)}

    # ---------------------------------------------------------------- stream
    def first_events(self) -> list[str]:
        if self.kind != "chat":
            return []
        return [sse({**self._head("chat.completion.chunk"), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            for i in range(len(self.prompt_index) * self.n)]

    def events(self, out) -> list[str]:
        """The events of one DELTA output (``RequestOutputKind.DELTA``)."""
        rid = out.request_id
        self.prompt_tokens[rid] = len(out.prompt_token_ids)
        if out.prompt_logprobs is not None:
            self.prompt_lps[rid] = out.prompt_logprobs
        events = []
        for o in out.outputs:
            index = self.prompt_index[rid] * self.n + o.index
            self.completion_tokens += len(o.token_ids)
            if index in self.finished:
                continue  # a DELTA output never repeats a finished sample; this guards the events anyway
            text_start = self.sent_text.get(index, 0)
            delta, ids, entries = o.text, o.token_ids, o.logprobs
            must_echo = self.echo is not None and index not in self.echoed
            if self.echo_only and not must_echo:
                delta, ids, entries = "", [], []  # the prompt was the whole answer
            if not delta and o.finish_reason is None and not must_echo and (not self.logprobs or not ids):
                continue  # nothing to show: without logprobs, tokens whose text is held back are not shown
            if o.finish_reason is not None:
                self.finished.add(index)
            # Text can lag tokens (held back while it might be a stop string's start); logprobs follow tokens.
            if must_echo:
                delta, logprobs = self._echoed(rid, out.prompt_token_ids, self.prompt_lps.get(rid), ids, entries,
                                               delta)
                self.echoed[index] = len(self.echo[self.prompt_index[rid]][0])
            else:
                logprobs = self._logprobs(ids, entries, text_start + self.echoed.get(index, 0))
            self.sent_text[index] = text_start + len(o.text)
            if logprobs is None:  # the common event, formatted straight from its parts (per token: keep it cheap)
                events.append(self._plain_event(index, delta, o.finish_reason, o.stop_reason))
                continue
            choice = {"index": index, "logprobs": logprobs, "finish_reason": o.finish_reason,
                      "stop_reason": o.stop_reason}
            if self.kind == "chat":
                choice["delta"] = {"content": delta} if delta or o.finish_reason is None else {}
                events.append(sse({**self._head("chat.completion.chunk"), "choices": [choice]}))
            else:
                choice["text"] = delta
                events.append(sse({**self._head("text_completion"), "choices": [choice]}))
        return events

    def _plain_event(self, index: int, delta: str, finish_reason, stop_reason) -> str:
        """``sse()`` of a choice without logprobs, the same JSON text, without building and encoding dicts."""
        if self._prefix is None:
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            head = json.dumps(self._head(obj), ensure_ascii=False)
            self._prefix = f'data: {head[:-1]}, "choices": [{{"index": '
        tail = (f'{index}, "logprobs": null, "finish_reason": {json.dumps(finish_reason)}, '
                f'"stop_reason": {json.dumps(stop_reason, ensure_ascii=False)}, ')
        if self.kind == "chat":
            content = f'{{"content": {json.dumps(delta, ensure_ascii=False)}}}' if delta or finish_reason is None \
                else "{}"
            return f'{self._prefix}{tail}"delta": {content}}}]}}\n\n'
        return f'{self._prefix}{tail}"text": {json.dumps(delta, ensure_ascii=False)}}}]}}\n\n'

    def stream_usage(self) -> dict:
        """A stream's usage, from the DELTA outputs it showed."""
        prompt = sum(self.prompt_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def usage_event(self, usage: dict) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return sse({**self._head(obj), "choices": [], "usage": usage})
