"""OpenAI response shapes (vLLM's fields) for completions and chat, whole and streamed.

The engine reports cumulative text and token ids per output; ``Choices`` remembers what each choice
already sent and turns every new RequestOutput into deltas.
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


def completion_logprobs(token_ids: list[int], entries: list[dict], k: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        text = _token_text(chosen, tid)
        tokens.append(text)
        token_lps.append(max(chosen.logprob, -9999.0))
        # vLLM lists the sampled token next to the top-k ones.
        top = {_token_text(lp, t): max(lp.logprob, -9999.0) for t, lp in _top(entry, k)}
        top.setdefault(text, token_lps[-1])
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


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

    def __init__(self, kind: str, model: str, ids: list[str], n: int, logprobs: bool, top_logprobs: int):
        self.kind, self.model, self.n = kind, model, n
        self.id, self.created = new_id(kind), int(time.time())
        self.prompt_index = {rid: i for i, rid in enumerate(ids)}
        self.logprobs, self.k = logprobs, top_logprobs
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def _logprobs(self, o, start: int, text_offset: int):
        if not self.logprobs or o.logprobs is None:
            return None
        ids, entries = o.token_ids[start:], o.logprobs[start:]
        if self.kind == "chat":
            return chat_logprobs(ids, entries, self.k)
        return completion_logprobs(ids, entries, self.k, text_offset)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---------------------------------------------------------------- whole response
    def response(self, outputs: list) -> dict:
        choices = []
        for out in outputs:
            for o in out.outputs:
                index = self.prompt_index[out.request_id] * self.n + o.index
                common = {"index": index, "logprobs": self._logprobs(o, 0, 0), "finish_reason": o.finish_reason,
                          "stop_reason": o.stop_reason}
                if self.kind == "chat":
                    choices.append({**common, "message": {"role": "assistant", "content": o.text,
                                                          "tool_calls": []}})
                else:
                    choices.append({**common, "text": o.text, "prompt_logprobs": None})
        choices.sort(key=lambda c: c["index"])
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": usage(outputs)}

    # ---------------------------------------------------------------- stream
    def first_events(self) -> list[str]:
        if self.kind != "chat":
            return []
        return [sse({**self._head("chat.completion.chunk"), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            for i in range(len(self.prompt_index) * self.n)]

    def events(self, out) -> list[str]:
        events = []
        for o in out.outputs:
            index = self.prompt_index[out.request_id] * self.n + o.index
            if index in self.finished:
                continue  # with n > 1, a finished sample reappears while its siblings run
            text_start, tok_start = self.sent_text.get(index, 0), self.sent_tokens.get(index, 0)
            delta = o.text[text_start:]
            if not delta and o.finish_reason is None and (not self.logprobs or len(o.token_ids) == tok_start):
                continue
            if o.finish_reason is not None:
                self.finished.add(index)
            # Text can lag tokens (held back while it might be a stop string's start); logprobs follow tokens.
            logprobs = self._logprobs(o, tok_start, text_start)
            self.sent_text[index], self.sent_tokens[index] = len(o.text), len(o.token_ids)
            choice = {"index": index, "logprobs": logprobs, "finish_reason": o.finish_reason,
                      "stop_reason": o.stop_reason}
            if self.kind == "chat":
                choice["delta"] = {"content": delta} if delta or o.finish_reason is None else {}
                events.append(sse({**self._head("chat.completion.chunk"), "choices": [choice]}))
            else:
                choice["text"] = delta
                events.append(sse({**self._head("text_completion"), "choices": [choice]}))
        return events

    def usage_event(self, outputs: list) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return sse({**self._head(obj), "choices": [], "usage": usage(outputs)})
