"""OutputAssembler: the front end's half of output processing, RequestOutputs from the core's step records.

The core sends new token ids and raw logprobs (``loraplex.engine.serving_core``); here each request has shadow
``Sequence`` objects run through the engine's own ``OutputProcessor``, so text, stop strings, logprob objects and
the DELTA / FINAL_ONLY shapes are exactly what ``LLM.generate`` produces. A stop string found here ends its
sample at once (later tokens the core made meanwhile are dropped); the caller tells the core to stop it.
"""
from __future__ import annotations

from loraplex.engine.output_processor import OutputProcessor
from loraplex.engine.wire import error_from_wire
from loraplex.outputs import RequestOutput
from loraplex.sequence import Sequence


class OutputAssembler:
    def __init__(self, tokenizer):
        self.proc = OutputProcessor(tokenizer)
        self.requests: dict[str, list[Sequence]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params, lora_request) -> None:
        seqs = [Sequence(request_id, i, prompt_ids, params, lora_request) for i in range(params.n)]
        self.proc.attach_prompt_logprobs(seqs)
        for seq in seqs:
            self.proc.attach(seq)
        self.requests[request_id] = seqs
        self.proc.register(request_id, prompt, prompt_ids, lora_request)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.proc.forget(request_id)

    def apply(self, record: list) -> tuple[RequestOutput | BaseException | None, list, bool]:
        """One step record -> (what the request's group gets, samples to stop in the core, whether the core
        still runs the request although it is over here). None when the request is not known (any more)."""
        rid, is_core_finished, samples, prompt_logprobs, first_token_time, error = record
        seqs = self.requests.get(rid)
        if seqs is None:
            return None, [], False
        if error is not None:
            self.forget(rid)
            return error_from_wire(error), [], False
        if prompt_logprobs is not None and seqs[0].prompt_logprobs is not None \
                and seqs[0].prompt_logprobs.value is None:
            self.proc.set_prompt_logprobs(seqs[0], prompt_logprobs)
        stops = []
        for index, token_ids, logprobs, finish_reason, stop_reason in samples:
            seq = seqs[index]
            if seq.is_finished:
                continue  # stopped here on a stop string: what the core made after it is dropped
            if seq.first_token_time is None and first_token_time is not None:
                seq.first_token_time = first_token_time  # the core's clock (CLOCK_MONOTONIC, shared by processes)
            for j, token_id in enumerate(token_ids):
                self.proc.append_token(seq, token_id, logprobs[j] if logprobs is not None else None)
                if seq.is_finished:  # its text hit a stop string
                    if finish_reason is None:
                        stops.append((rid, index))
                    break
            if not seq.is_finished and finish_reason is not None:
                seq.finish(finish_reason, stop_reason)
        if is_core_finished:
            for seq in seqs:  # an abort ends every sample, reported or not
                if not seq.is_finished:
                    seq.finish("abort")
        out = self.proc.make_output(rid, seqs)
        is_done = out.finished
        if is_done:
            self.forget(rid)
        return out, ([] if is_done else stops), is_done and not is_core_finished
