"""LLMEngine: vLLM's offline engine API. step() = schedule, run, postprocess."""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import weakref
from typing import Any

import torch

from loraplex import envs
from loraplex.engine.engine_core import build_engine_parts
from loraplex.engine.multimodal import MultiModalPrompts
from loraplex.engine.output_processor import OutputProcessor
from loraplex.engine.stats_logger import StatsLogger
from loraplex.engine_args import EngineArgs
from loraplex.errors import (EngineStepError, InvalidRequestError, LoRADisabledError, PromptTooLongError,
                             UnsupportedArgumentError)
from loraplex.lora.request import LoRARequest
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import SamplingParams
from loraplex.sequence import Sequence

logger = logging.getLogger("loraplex.engine")


# Keys of a prompt dict (vLLM's TextPrompt / TokensPrompt). None: served; a string: why it is refused.
_PROMPT_KEYS = {"prompt": None, "prompt_token_ids": None,
                "multi_modal_data": "this model is text-only",
                "mm_processor_kwargs": "per-request processor arguments are not supported"}
_UNKNOWN_PROMPT_KEY = "a prompt dict takes 'prompt' or 'prompt_token_ids'"


def _sent_to_ranks(method):
    """A call that changes the engine: with ranks this engine started (engine/tp_ranks.py), recorded for them to
    replay before the next step, once it has succeeded here."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        if self._ranks is not None:
            self._ranks.record(method.__name__, *args, **kwargs)
        return result
    return call


class LLMEngine:
    def __init__(self, args: EngineArgs, progress: bool = False, _rank: tuple | None = None):
        self.args = args
        # Tensor parallelism without torchrun: this engine is rank 0 and starts the others (engine/tp_ranks.py);
        # _rank is how a started rank builds its own engine.
        self._ranks = None
        if args.tensor_parallel_size > 1 and _rank is None and envs.torch_distributed_env() is None:
            from loraplex.engine.tp_ranks import RankProcesses

            self._ranks = RankProcesses(args, args.tensor_parallel_size)
            _rank = (0, args.tensor_parallel_size, self._ranks.init_method)
        try:
            parts = build_engine_parts(args, progress=progress, spawned_rank=_rank)
        except BaseException:
            if self._ranks is not None:
                self._ranks.shutdown()
            raise
        self.__dict__.update(parts)  # tokenizer, model, runner, scheduler, lora_manager, plugin_manager...
        if self._ranks is not None:
            self._ranks.group, self._ranks.is_ready = self.tp_control_group, True
            weakref.finalize(self, self._ranks.shutdown)
        self.outputs = OutputProcessor(self.tokenizer)
        self.requests: dict[str, list[Sequence]] = {}
        self._aborted: set[str] = set()  # aborted requests whose final output is not yet returned
        self._pending = None  # a launched step whose tokens are not read back yet
        self._errors: dict[str, Exception] = {}  # request id -> why it failed (an adapter that did not load)
        # Set by new work (a loader finishing, a server command) so that an idle step stops waiting at once.
        self._wakeup = threading.Event()
        # How long an idle step waits for a loader. wake() cuts it short; a caller that cannot call wake() (the
        # engine process, whose commands arrive on a socket only its loop reads) sets it lower.
        self.max_idle_wait_s = 0.05
        if self.lora_manager is not None:
            self.lora_manager.loader.add_listener(self._wakeup.set)
        self.mm = None  # a multi-modal model's prompts (processor, checks, default_mm_loras)
        if self.model_config.is_multimodal:
            self.mm = MultiModalPrompts(self.model_config, self.processor,
                                        getattr(self.model, "tokens_per_image", None), args)
        is_async = args.async_scheduling if args.async_scheduling is not None else envs.async_scheduling()
        self.is_async_scheduling = is_async if is_async is not None else self.runner.graph_runner is not None
        self.stats = {"num_requests": 0, "num_prompt_tokens": 0, "num_generation_tokens": 0, "num_steps": 0,
                      "num_async_steps": 0, "num_prefix_cache_queries": 0, "num_prefix_cache_hits": 0,
                      "prefix_cache_by_model": {}}
        self.stats_logger = None if args.disable_log_stats else StatsLogger(self)
        if self.plugin_manager is not None:
            self.plugin_manager.hook.loraplex_engine_started(engine=self)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs) -> "LLMEngine":
        return cls(engine_args, **kwargs)

    def wake(self) -> None:
        """Thread-safe: cut short an idle step's wait for adapter loads (new work has arrived)."""
        self._wakeup.set()

    def get_tokenizer(self):
        return self.tokenizer

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt) -> list[int]:
        """Token ids of a prompt exactly as add_request would see them."""
        return self._tokenize(prompt)[1]

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        text, ids, _ = self._process(prompt)
        return text, ids

    def _process(self, prompt) -> tuple[str | None, list[int], dict | None]:
        """(prompt text, token ids, multi-modal inputs or None) of a prompt as add_request takes it."""
        if isinstance(prompt, dict) and prompt.get("multi_modal_data") is not None and self.mm is not None:
            return self.mm.process(prompt)
        if isinstance(prompt, dict):
            for key in prompt:
                why = _PROMPT_KEYS.get(key, _UNKNOWN_PROMPT_KEY)
                if key == "multi_modal_data" and prompt[key] is None:
                    continue
                if why is not None:
                    raise UnsupportedArgumentError(key, why)
            if "prompt_token_ids" in prompt:
                ids = list(prompt["prompt_token_ids"])
                if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in ids):
                    raise InvalidRequestError(f"prompt_token_ids must be ints in [0, {self.model_config.vocab_size})")
                return prompt.get("prompt"), ids, None
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return self._process({"prompt_token_ids": list(prompt)})
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt)}")
        if self.tokenizer is None:
            raise InvalidRequestError("the engine was built with skip_tokenizer_init=True: pass prompt_token_ids")
        return prompt, self.tokenizer.encode(prompt), None

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None, arrival_time: float | None = None,
                    priority: int = 0, mm_inputs: dict | None = None) -> None:
        """``mm_inputs``: a multi-modal prompt already through the model's processor (the server's front end ran
        it): ``{"pixel_values": tensor, "modalities": ("image",)}`` beside ``{"prompt_token_ids": expanded ids}``.
        Offline, pass ``{"prompt": ..., "multi_modal_data": ...}`` instead."""
        request_id = str(request_id)
        prompt_in, lora_in, mm_in = prompt, lora_request, mm_inputs  # as given: the other ranks replay the call
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        # vLLM's checks and messages.
        if params.logprobs is not None and params.logprobs > self.args.max_logprobs:
            raise InvalidRequestError(f"Requested sample logprobs of {params.logprobs}, which is greater than max "
                                      f"allowed: {self.args.max_logprobs}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.args.max_logprobs:
            raise InvalidRequestError(f"Requested prompt logprobs of {params.prompt_logprobs}, which is greater "
                                      f"than max allowed: {self.args.max_logprobs}")
        salt = None
        if isinstance(prompt, dict) and "cache_salt" in prompt:
            salt = prompt["cache_salt"]
            if not isinstance(salt, str) or not salt:
                raise InvalidRequestError("Parameter 'cache_salt' must be a non-empty string if provided.")
            prompt = {k: v for k, v in prompt.items() if k != "cache_salt"}
        if mm_inputs is not None:
            if self.mm is None:
                raise UnsupportedArgumentError("mm_inputs", "this model is text-only")
            text, ids, _ = self._process(prompt)
            self.mm.check(ids, mm_inputs)
        else:
            text, ids, mm_inputs = self._process(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        max_len = self.max_model_len
        if len(ids) >= max_len:
            raise PromptTooLongError(
                f"The prompt (length {len(ids)}) is longer than the maximum model length of {max_len - 1} "
                f"(max_model_len={max_len} must leave room for at least one generated token).")
        if lora_request is None and mm_inputs is not None:
            lora_request = self.mm.default_lora(mm_inputs)
        lora_model = None
        if lora_request is not None:
            if self.lora_manager is None:
                raise LoRADisabledError("LoRA is not enabled; construct the engine with enable_lora=True",
                                        lora_request.lora_name)
            # Registers only: an adapter that is not loaded yet is queued for the loader threads, and this
            # request waits for it while the others run.
            lora_model = self.lora_manager.get_for_request(lora_request)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = [Sequence(request_id, i, ids, params, lora_request, lora_model, arrival_time=arrival,
                         priority=priority, mm_inputs=mm_inputs) for i in range(params.n)]
        self.outputs.attach_prompt_logprobs(seqs)
        for seq in seqs:
            seq.cache_salt = salt
            self.outputs.attach(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.outputs.register(request_id, text, ids, lora_request)
        self.stats["num_requests"] += 1
        self.stats["num_prompt_tokens"] += len(ids)
        if self._ranks is not None:
            self._ranks.record("add_request", request_id, prompt_in, params, lora_request=lora_in,
                               arrival_time=arrival, priority=priority, mm_inputs=mm_in)

    @_sent_to_ranks
    def abort_request(self, request_id) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            for seq in self.requests.get(str(rid), []):
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish("abort")
                    self._aborted.add(str(rid))

    @_sent_to_ranks
    def stop_sample(self, request_id: str, index: int, stop_reason=None) -> None:
        """End one sample of a request now, as if it had hit a stop (the server's front end found a stop string
        in its text); the request's other samples go on."""
        for seq in self.requests.get(str(request_id), []):
            if seq.index == index and not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish("stop", stop_reason)
                self._aborted.add(str(request_id))  # reported in the next step's outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._pending is not None

    def has_pending_loras(self) -> bool:
        """Adapter loads or uploads in flight (step() finishes them even with no request)."""
        return self.lora_manager is not None and self.lora_manager.has_inflight()

    def get_num_unfinished_requests(self) -> int:
        return sum(1 for seqs in self.requests.values() if not all(s.is_finished for s in seqs))

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Schedule, run, postprocess one step and return its outputs. With async scheduling the next decode
        step is launched from this one's device-side tokens before they are read back (see _launch_ahead)."""
        if self._ranks is not None:
            self._ranks.send_step()  # the other ranks replay this engine's calls, then run the same step
        mgr = self.lora_manager
        if mgr is not None:
            # Finished loads and uploads in, failed loads out (their requests end with the error), then loads
            # and uploads for what the queue will want next.
            mgr.poll()
            self._fail_requests(mgr.take_failed())
            self.scheduler.prefetch()
        if self._pending is None:
            sched = self.scheduler.schedule()
            self._sync_cache_stats()
            if sched.is_empty:
                self.stats["num_steps"] += 1
                if mgr is not None and not self._aborted and mgr.has_inflight():
                    self._wait_idle()
                return self._make_outputs(set())
            self._pending = self._launch(sched.seqs, sched.num_scheduled_tokens)
            if self._pending is None:
                return self._make_outputs(set())
        pending, self._pending = self._pending, None
        if self.is_async_scheduling:
            self._pending = self._launch_ahead(pending)
        try:
            result = pending.result()
        except Exception as e:
            # The look-ahead step reads this one's tokens: its rows fail with it.
            self._fail_batch(pending.seqs + (self._pending.seqs if self._pending is not None else []), e)
            self._pending = None
            return self._make_outputs(set())
        touched = self._postprocess(pending, result)
        self.stats["num_steps"] += 1
        return self._make_outputs(touched)

    def _sync_cache_stats(self) -> None:
        """Prefix cache counters into stats; the per-adapter map is replaced, never changed in place, since a
        server thread may be reading the one it has."""
        bm = self.scheduler.block_manager
        if bm.num_queries != self.stats["num_prefix_cache_queries"]:
            self.stats["num_prefix_cache_queries"] = bm.num_queries
            self.stats["num_prefix_cache_hits"] = bm.num_hits
            self.stats["prefix_cache_by_model"] = {k: list(v) for k, v in bm.stats_by_model.items()}

    @_sent_to_ranks
    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's reset_prefix_cache); False, and nothing done, while requests run."""
        return self.scheduler.block_manager.reset_prefix_cache()

    def _wait_idle(self) -> None:
        """Nothing can run until an adapter arrives: wait for a loader (or new work) rather than spin."""
        mgr = self.lora_manager
        self._wakeup.clear()
        if mgr.loader.num_in_flight and not mgr.loader.has_results():
            self._wakeup.wait(self.max_idle_wait_s)
        elif not mgr.loader.num_in_flight:
            mgr.wait_for_progress(self.max_idle_wait_s)  # uploads only: they take milliseconds

    def _fail_requests(self, failed) -> None:
        """Waiting requests whose adapter failed to load end now with its error; nothing else is touched."""
        if not failed:
            return
        failed_ids = {id(m) for m in failed}
        for seq in [s for s in self.scheduler.waiting if id(s.lora_model) in failed_ids]:
            self.scheduler.finish(seq)
            seq.finish("abort")
            self._errors[seq.request_id] = seq.lora_model.error
            self._aborted.add(seq.request_id)

    def _launch(self, seqs: list[Sequence], num_new: list[int], input_ids=None):
        """The step's launch, or None when it failed (its requests then end with an EngineStepError)."""
        try:
            return self.runner.launch(seqs, num_new, input_ids)
        except Exception as e:
            self._fail_batch(seqs, e)
            return None

    def _fail_batch(self, seqs: list[Sequence], error: Exception) -> None:
        """The requests of a failed step end with an EngineStepError; every other request keeps running.

        Their blocks and adapter slots are freed like an abort's, so the engine stays consistent. All n
        sequences of a request end, since the request has one outcome."""
        logger.error("engine step failed for %d sequence(s)", len(seqs), exc_info=error)
        for rid in dict.fromkeys(seq.request_id for seq in seqs):
            failure = EngineStepError(f"The engine step that ran this request failed ({type(error).__name__})")
            failure.__cause__ = error
            self._errors.setdefault(rid, failure)
            for seq in self.requests.get(rid, []):
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish("abort")
            self._aborted.add(rid)

    def _launch_ahead(self, pending):
        """Launch the decode step after ``pending`` with its sampled tokens as inputs, still on the device.

        Only when nothing but those sequences could run next (no waiting request the scheduler would take now;
        one blocked on a LoRA slot or on KV blocks does not count) and the host needs no sampled token to set up
        the step (no penalties, min_tokens met). Sequences sure to stop at ``pending`` (max_tokens,
        max_model_len) are left out; one that stops on EOS or a stop string wastes its row, whose token is
        dropped. Its KV write may land in a block freed meanwhile: harmless, since the block's next
        owner writes it later on the same stream before reading it (a block it wrote past the sequence's computed
        tokens was never in the prefix cache's index, so no one finds it and reads it unwritten).
        Never while a prompt is being prefilled in chunks: its next chunk changes the batch."""
        sched = self.scheduler
        live = [(s, n) for s, n in zip(pending.seqs, pending.num_new) if not s.is_finished]
        if len(live) != len(sched.running) or any(n < s.num_uncomputed_tokens for s, n in live):
            return None
        if sched.waiting and sched.can_admit():
            return None
        rows, seqs = [], []
        for i, seq in enumerate(pending.seqs):
            if seq.is_finished:
                continue
            p, num_out = seq.params, len(seq.output_token_ids) + 1
            if p.has_penalties or len(seq.output_token_ids) < p.min_tokens:
                return None
            if (p.max_tokens is not None and num_out >= p.max_tokens) or seq.num_tokens + 1 >= self.max_model_len:
                continue
            rows.append(i)
            seqs.append(seq)
        bm = sched.block_manager
        if not seqs or sum(bm.blocks_needed(s, s.num_tokens + 1) for s in seqs) > bm.num_free_blocks:
            return None
        for seq in seqs:
            bm.allocate(seq, seq.num_tokens + 1)
        self.stats["num_async_steps"] += 1
        tokens = pending.tokens
        if len(rows) < len(pending.seqs):
            tokens = tokens[torch.tensor(rows).to(tokens.device, non_blocking=True)]
        return self._launch(seqs, [1] * len(seqs), tokens)

    def _postprocess(self, pending, result) -> set[str]:
        touched = set()
        for i, raw in result.prompt_logprobs.items():
            seq = pending.seqs[i]
            whole = seq.prompt_logprobs.add(raw, seq.num_prompt_tokens - 1)  # a chunk's part, or all of them
            if whole is not None:
                self.outputs.set_prompt_logprobs(seq, whole)
        for i, (seq, n) in enumerate(zip(pending.seqs, pending.num_new)):
            if seq.is_finished:
                continue  # a look-ahead row of a sequence that stopped (or was aborted) after launch
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk before the prompt's last: its row sampled nothing
            lp = result.logprobs[i] if result.logprobs is not None else None
            try:  # detokenizing and stop checks are per request: a failure ends only its own
                self.outputs.append_token(seq, result.token_ids[i], lp)
                self.outputs.check_stop(seq, self.eos_token_ids, self.max_model_len)
            except Exception as e:
                self._fail_batch([seq], e)
                continue
            self.stats["num_generation_tokens"] += 1
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched.add(seq.request_id)
        return touched

    def _make_outputs(self, touched: set[str]) -> list[RequestOutput]:
        if self.stats_logger is not None:
            self.stats_logger.maybe_log()
        touched.update(self._aborted)
        self._aborted.clear()
        outputs = []
        for rid in touched:
            seqs = self.requests.get(rid)
            if seqs is None:
                continue
            out = self.outputs.make_output(rid, seqs)
            if rid in self._errors:
                out.error = self._errors.pop(rid)
            outputs.append(out)
            if out.finished:
                del self.requests[rid]
                self.outputs.forget(rid)
        return outputs

    # ------------------------------------------------------------------ LoRA management
    def _require_lora(self):
        if self.lora_manager is None:
            raise LoRADisabledError("LoRA is not enabled; construct the engine with enable_lora=True")
        return self.lora_manager

    @_sent_to_ranks
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load (or reload in place) an adapter and wait for it; typed errors, the engine unchanged on failure."""
        self._require_lora().add_lora(lora_request)
        return True

    @_sent_to_ranks
    def add_lora_async(self, lora_request: LoRARequest) -> concurrent.futures.Future:
        """Queue a load in the loader threads and return at once; the future (done in a later step()) holds the
        result or the typed error. Running requests keep their pace meanwhile."""
        return self._require_lora().add_lora_async(lora_request)

    @_sent_to_ranks
    def remove_lora(self, lora_name_or_id) -> bool:
        mgr = self._require_lora()
        name = lora_name_or_id
        if isinstance(lora_name_or_id, int):
            name = mgr.registry.name_of(lora_name_or_id)
        return name is not None and mgr.remove_lora(name)

    def list_loras(self) -> list[LoRARequest]:
        return self._require_lora().list_loras()

    @_sent_to_ranks
    def pin_lora(self, lora_name_or_id) -> bool:
        mgr = self._require_lora()
        name = lora_name_or_id
        if isinstance(lora_name_or_id, int):
            name = mgr.registry.name_of(lora_name_or_id) or str(name)
        return mgr.pin_lora(name)
