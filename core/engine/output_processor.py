"""Detokenize, apply stop conditions, and build RequestOutputs.

What an output carries follows the request's ``SamplingParams.output_kind`` (see ``RequestOutputKind``):
CUMULATIVE copies everything so far into every output (O(T) per step, as ``LLM.generate`` expects); DELTA
gives only what is new since the request's previous output (O(new) per step: the server's streams);
FINAL_ONLY builds the cumulative output once, when the request finishes (the server's whole responses).
"""
from __future__ import annotations

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.outputs import CompletionOutput, Logprob, RequestOutput
from loraplex.sampling_params import RequestOutputKind
from loraplex.sequence import PromptLogprobsSlot, Sequence


class _Sent:
    """What the DELTA outputs of one request have carried so far, per sample."""

    __slots__ = ("tokens", "chars", "reported", "prompt_logprobs")

    def __init__(self, n: int):
        self.tokens = [0] * n  # token ids (and logprobs) given
        self.chars = [0] * n  # characters of the visible text given
        self.reported = [False] * n  # its finish given: the sample is left out from then on
        self.prompt_logprobs = False


def _visible_len(det, finished: bool) -> int:
    """len(det.visible_text(finished)) without building that string (IncrementalDetokenizer's rule)."""
    if finished or det.max_stop_len <= 1:
        return len(det.text)
    return max(0, len(det.text) - det.max_stop_len + 1)


def _metrics(seqs: list[Sequence]) -> dict:
    first = [s.first_token_time for s in seqs if s.first_token_time is not None]
    return {"first_token_time": min(first)} if first else {}


class OutputProcessor:
    """``raw_logprobs``: keep logprobs as the runner gives them, ``(chosen, rank, top_ids, top_lps)`` per token
    (``(chosen, ranks, top_ids, top_lps)`` lists for prompt logprobs), with no Logprob objects and no decoding:
    the engine-core process hands them on, and the server's front end builds vLLM's objects (ServingCore)."""

    def __init__(self, tokenizer, raw_logprobs: bool = False):
        self.tokenizer = tokenizer
        self.raw_logprobs = raw_logprobs
        self.meta: dict[str, tuple] = {}  # request_id -> (prompt text, prompt ids, lora_request)
        self.sent: dict[str, _Sent] = {}  # DELTA requests only

    def register(self, request_id: str, prompt: str | None, prompt_ids: list[int], lora_request) -> None:
        self.meta[request_id] = (prompt, prompt_ids, lora_request)

    def forget(self, request_id: str) -> None:
        self.meta.pop(request_id, None)
        self.sent.pop(request_id, None)

    def attach_prompt_logprobs(self, seqs: list[Sequence]) -> None:
        """One slot for a request's sequences (vLLM's prompt_logprobs), when its params ask for them."""
        k = seqs[0].params.prompt_logprobs
        if k is None:
            return
        slot = PromptLogprobsSlot(k)
        if seqs[0].num_prompt_tokens < 2:
            slot.value = [None]  # the first prompt token has no logprob: nothing to compute
        for seq in seqs:
            seq.prompt_logprobs = slot

    def set_prompt_logprobs(self, seq: Sequence, raw) -> None:
        """raw: (chosen, ranks, top_ids, top_lps) for prompt tokens 1.. of seq; the first entry stays None."""
        slot = seq.prompt_logprobs
        if slot.value is not None:
            return
        if self.raw_logprobs:
            slot.value = raw
            return
        entries: list = [None]
        for tid, chosen, rank, top_ids, top_lps in zip(seq.prompt_token_ids[1:], *raw):
            # vLLM's order: the prompt token itself, then the top-k by rank.
            entry = {tid: Logprob(chosen, rank, None)}
            for r, (t, lp) in enumerate(zip(top_ids, top_lps)):
                entry.setdefault(t, Logprob(lp, r + 1, None))
            if self.tokenizer is not None:
                for t, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([t])
            entries.append(entry)
        slot.value = entries

    def attach(self, seq: Sequence) -> None:
        p = seq.params
        if p.detokenize and self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, p.skip_special_tokens,
                                                     p.stop, p.include_stop_str_in_output)
        if p.logprobs is not None:
            seq.logprobs = []

    def append_token(self, seq: Sequence, token_id: int, logprob) -> None:
        seq.append_token(token_id)
        if logprob is not None and self.raw_logprobs:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[0]
        elif logprob is not None:
            chosen, rank, top_ids, top_lps = logprob
            entry = {tid: Logprob(lp, r + 1, None) for r, (tid, lp) in enumerate(zip(top_ids, top_lps))}
            entry[token_id] = Logprob(chosen, rank, None)
            if self.tokenizer is not None:
                for tid, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([tid])
            seq.logprobs.append(entry)
            seq.cumulative_logprob += chosen
        if seq.detokenizer is not None:
            hit = seq.detokenizer.add_token(token_id)
            if hit is not None:
                seq.finish("stop", hit)

    def check_stop(self, seq: Sequence, eos_ids: tuple[int, ...], max_model_len: int) -> None:
        if seq.is_finished:
            return
        p = seq.params
        token = seq.output_token_ids[-1]
        num_out = len(seq.output_token_ids)
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in eos_ids:
                seq.finish("stop", None)
                return
            if token in p.stop_token_ids:
                seq.finish("stop", token)
                return
        if (p.max_tokens is not None and num_out >= p.max_tokens) or seq.num_tokens >= max_model_len:
            seq.finish("length")

    def make_output(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        kind = seqs[0].params.output_kind
        if kind is RequestOutputKind.DELTA:
            return self._delta_output(request_id, seqs)
        prompt, prompt_ids, lora_request = self.meta[request_id]
        if kind is RequestOutputKind.FINAL_ONLY and not all(s.is_finished for s in seqs):
            # LLMEngine.step() reports every request it touched: a FINAL_ONLY one gets an empty placeholder.
            return RequestOutput(request_id, prompt, prompt_ids, [], False, lora_request, metrics=_metrics(seqs),
                                 num_cached_tokens=seqs[0].num_cached_tokens)
        outs = []
        for s in seqs:
            ids = list(s.output_token_ids)  # like vLLM, a final EOS stays in token_ids (never in the text)
            text = s.detokenizer.visible_text(s.is_finished) if s.detokenizer is not None else ""
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=ids,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason, lora_request=lora_request))
        finished = all(s.is_finished for s in seqs)
        slot = seqs[0].prompt_logprobs
        return RequestOutput(request_id, prompt, prompt_ids, outs, finished, lora_request,
                             prompt_logprobs=list(slot.value) if slot is not None and slot.value is not None else None,
                             metrics=_metrics(seqs), num_cached_tokens=seqs[0].num_cached_tokens)

    def _delta_output(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        """What is new since this request's previous output: per sample the new token ids, their logprobs and
        the text that became visible (text held back while it may start a stop string comes once it cannot,
        or at the finish; visible text never shrinks, so nothing given is taken back). Only samples with
        something new appear, a finished one once more with its finish reason. The engine hands over its
        logprob entries, so it keeps none of a DELTA request's. O(new) per step."""
        prompt, prompt_ids, lora_request = self.meta[request_id]
        sent = self.sent.get(request_id)
        if sent is None:
            sent = self.sent[request_id] = _Sent(len(seqs))
        outs = []
        for s in seqs:
            i = s.index
            if sent.reported[i]:
                continue
            start, ids = sent.tokens[i], s.output_token_ids
            new_ids = ids[start:]
            text, det = "", s.detokenizer
            if det is not None:
                end = _visible_len(det, s.is_finished)
                if end > sent.chars[i]:
                    text = det.text[sent.chars[i]:end]
                    sent.chars[i] = end
            if not new_ids and not text and not s.is_finished:
                continue
            logprobs = None
            if s.logprobs is not None:
                logprobs, s.logprobs = s.logprobs, []  # exactly the entries of new_ids
            sent.tokens[i], sent.reported[i] = len(ids), s.is_finished
            outs.append(CompletionOutput(
                index=i, text=text, token_ids=new_ids,
                cumulative_logprob=s.cumulative_logprob if logprobs is not None else None,
                logprobs=logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                lora_request=lora_request))
        prompt_logprobs = None
        slot = seqs[0].prompt_logprobs
        if not sent.prompt_logprobs and slot is not None and slot.value is not None:
            prompt_logprobs, sent.prompt_logprobs = slot.value, True
        return RequestOutput(request_id, prompt, prompt_ids, outs, all(s.is_finished for s in seqs), lora_request,
                             prompt_logprobs=prompt_logprobs, metrics=_metrics(seqs),
                             num_cached_tokens=seqs[0].num_cached_tokens)
