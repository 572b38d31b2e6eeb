"""LLM: vLLM's offline batch API over LLMEngine."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine_args import EngineArgs
from loraplex.errors import InvalidRequestError, UnsupportedArgumentError
from loraplex.lora.request import LoRARequest
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import RequestOutputKind, SamplingParams


def _final_only(params):
    """generate() returns whole outputs: as vLLM, it asks the engine for the final output only (which also
    spares the cumulative copies per step), whatever output_kind the caller set."""
    if not isinstance(params, SamplingParams) or params.output_kind is RequestOutputKind.FINAL_ONLY:
        return params
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        progress = kwargs.pop("progress", False)
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs.from_kwargs(model, **kwargs), progress=progress)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def _per_prompt(self, value, num: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != num:
                raise InvalidRequestError(f"{name} has {len(value)} entries for {num} prompts")
            return list(value)
        return [value] * num

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 use_tqdm: bool = False, priority: list[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        params = [_final_only(p) for p in self._per_prompt(sampling_params or SamplingParams(), len(prompts),
                                                             "sampling_params")]
        loras = self._per_prompt(lora_request, len(prompts), "lora_request")
        prios = self._per_prompt(priority or 0, len(prompts), "priority")
        ids = []
        engine = self.llm_engine
        try:
            for prompt, p, lora, prio in zip(prompts, params, loras, prios):
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, p, lora_request=lora, priority=prio)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            self._drain()
            raise
        return self._run(ids, use_tqdm)

    def _drain(self) -> None:
        while self.llm_engine.has_unfinished_requests():
            self.llm_engine.step()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts")
        while self.llm_engine.has_unfinished_requests():
            for out in self.llm_engine.step():
                if out.error is not None:
                    # As when add_request refuses a prompt: the call fails with the request's typed error.
                    self.llm_engine.abort_request([i for i in ids if i not in done])
                    if bar is not None:
                        bar.close()
                    self._drain()
                    raise out.error
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = False, lora_request=None,
             chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools: list | None = None,
             chat_template_kwargs: dict | None = None, mm_processor_kwargs: dict | None = None
             ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate.

        vLLM's signature. ``tools`` and ``chat_template_kwargs`` reach the template; the model's output is
        not parsed for tool calls. ``mm_processor_kwargs`` is refused: the model is text-only.
        """
        if mm_processor_kwargs:
            raise UnsupportedArgumentError("mm_processor_kwargs", "this model is text-only")
        if chat_template_content_format not in ("auto", "string"):
            raise UnsupportedArgumentError("chat_template_content_format",
                                           "only 'auto' and 'string' (message content is text)")
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError("continue_final_message and add_generation_prompt cannot both be True")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        template_kwargs = dict(chat_template_kwargs or {})
        if tools is not None:
            template_kwargs["tools"] = tools
        if continue_final_message:
            template_kwargs["continue_final_message"] = True
        prompts = []
        for conv in conversations:
            ids = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt, **template_kwargs)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, lora_request=lora_request, use_tqdm=use_tqdm)

    # LoRA management, mirrored from the engine
    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_name_or_id) -> bool:
        return self.llm_engine.remove_lora(lora_name_or_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.llm_engine.list_loras()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's ``LLM.reset_prefix_cache``); False while requests run."""
        return self.llm_engine.reset_prefix_cache()

    def pin_lora(self, lora_name_or_id) -> bool:
        return self.llm_engine.pin_lora(lora_name_or_id)
