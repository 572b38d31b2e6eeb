"""Incremental detokenization with stop strings.

Decodes a sliding window of tokens (prefix/read offsets, as HF's TextStreamer and vLLM do), so multi-byte
characters split across tokens are only emitted once complete, and SentencePiece leading spaces survive.
"""
from __future__ import annotations

# Prompt tokens kept as context so the first generated token decodes with its leading space.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        # decode() of a list of ints is _decode() after a to_py_obj pass that costs more than the decode itself;
        # this runs twice per token per sequence, so call _decode directly where the tokenizer has it.
        self._decode_ids = getattr(tokenizer, "_decode", None) or tokenizer.decode
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string hit, if any (text is then truncated at it)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        else:
            return None
        if not self.stop:
            self.text += new
            return None
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += new
        hits = [(self.text.find(s, search_from), s) for s in self.stop]
        hits = [(at, s) for at, s in hits if at != -1]
        if not hits:
            return None
        at, s = min(hits)
        self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
        return s

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, hold back what could be the start of a stop string."""
        if finished or self.max_stop_len <= 1:
            return self.text
        return self.text[: max(0, len(self.text) - self.max_stop_len + 1)]
