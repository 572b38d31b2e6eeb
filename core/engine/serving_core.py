"""ServingCore: the engine side of the server, as named commands over one LLMEngine and compact step records.

Both server transports drive it: the in-process one from its engine thread (``loraplex.server.async_engine``),
the engine-core process from its busy loop (``loraplex.engine.core_proc``), with the same arguments sent as
msgpack (``loraplex.engine.wire``). So adapter management and generation mean the same thing either way.

Generation here is detokenize-free: the core samples tokens, applies EOS, stop token ids and lengths, and hands
on token ids and raw logprobs. The server's front end detokenizes, applies stop strings and asks the core to
stop a sample whose text hit one (``stop_samples``), as vLLM's front end does; so the per-token text work runs
beside the engine, not in it.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time

from loraplex.engine.output_processor import OutputProcessor
from loraplex.engine.stats_logger import ITL_BUCKETS, StepHistogram
from loraplex.engine.wire import error_to_wire
from loraplex.errors import (EngineDeadError, EngineStepError, LoRAAlreadyLoadedError, LoRADisabledError,
                             LoRANotFoundError)
from loraplex.lora.request import LoRARequest
from loraplex.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("loraplex.engine")

# After this many failed steps in a row (failures outside any one request's work: a failed batch ends only its
# own requests inside LLMEngine.step) the requests in flight end with a 500 and the engine reports unhealthy.
MAX_STEP_FAILURES = 3


def core_params(params: SamplingParams) -> SamplingParams:
    """What the core runs for a request: no text (the front end makes it and applies ``stop``), DELTA outputs."""
    return dataclasses.replace(params, detokenize=False, stop=None, include_stop_str_in_output=False,
                               output_kind=RequestOutputKind.DELTA)


def _adapter_names(seqs) -> list[str]:
    return sorted({s.lora_request.lora_name for s in seqs if s.lora_request is not None})


class ServingCore:
    def __init__(self, engine):
        self.engine = engine
        engine.outputs = OutputProcessor(engine.tokenizer, raw_logprobs=True)
        self._ids = itertools.count(1)  # adapter ids of the server's loads
        self._adapters_epoch = None
        self.num_step_failures = 0
        self.on_registry_change = None  # called when a load registers a name, before its future completes
        # vLLM's inter-token latency, timed here where the steps run: per sample, each step's new tokens since its
        # previous ones (request id -> sample index -> monotonic time of its last tokens).
        self.itl = StepHistogram(ITL_BUCKETS)
        self._last_token_at: dict[str, dict[int, float]] = {}
        mgr = engine.lora_manager
        if mgr is not None:
            mgr.on_registry_change = self._registry_changed

    def _registry_changed(self) -> None:
        if self.on_registry_change is not None:
            self.on_registry_change()

    def info(self) -> dict:
        """What the front end needs to know of the engine (sent once, at start)."""
        e = self.engine
        return {"model": e.args.model, "served_model_name": e.args.served_model_name, "tokenizer": e.args.tokenizer,
                "model_path": str(e.model_path), "skip_tokenizer_init": e.args.skip_tokenizer_init,
                "max_model_len": e.max_model_len, "max_logprobs": e.args.max_logprobs,
                "is_lora_enabled": e.lora_manager is not None, "eos_token_ids": list(e.eos_token_ids),
                "device": str(e.device), "modalities": list(e.model_config.modalities),
                "image_placeholder": getattr(e.processor, "image_token", None) if e.processor is not None else None,
                "audio_placeholder": getattr(e.processor, "audio_token", None) if e.processor is not None else None,
                "limit_mm_per_prompt": dict(e.args.limit_mm_per_prompt or {}), "max_loras": e.args.max_loras}

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests() or self.engine.has_pending_loras()

    # ------------------------------------------------------------------ requests
    def lora_request(self, name: str | None) -> LoRARequest | None:
        """The current version of adapter ``name``; LoRANotFoundError if it is not loaded (unloaded meanwhile)."""
        if name is None:
            return None
        mgr = self.engine.lora_manager
        current = mgr.adapters.get(name) if mgr is not None else None
        if current is None:
            raise LoRANotFoundError(f"The model `{name}` does not exist.", name)
        # The stored request may carry load_inplace=True; a generation must never trigger a reload.
        return dataclasses.replace(current.request, load_inplace=False)

    def add(self, requests: list) -> None:
        """Add ``[(request_id, prompt_token_ids, params, lora_name, mm_inputs or None, cache_salt or None), ...]``,
        all or nothing."""
        engine, added = self.engine, []
        try:
            for rid, ids, params, lora_name, mm, salt in requests:
                prompt = {"prompt_token_ids": ids} if salt is None else {"prompt_token_ids": ids, "cache_salt": salt}
                engine.add_request(rid, prompt, core_params(params),
                                   lora_request=self.lora_request(lora_name), mm_inputs=mm)
                added.append(rid)
        except BaseException:
            engine.abort_request(added)
            raise

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(list(request_ids))
        for rid in request_ids:
            self._last_token_at.pop(rid, None)

    def stop_samples(self, samples: list) -> None:
        """``[(request_id, index), ...]``: samples whose text hit a stop string in the front end."""
        for rid, index in samples:
            self.engine.stop_sample(rid, index)

    def step(self) -> list[list]:
        """One engine step's news as records (``loraplex.engine.wire``)."""
        try:
            outputs = self.engine.step()
        except EngineDeadError:
            raise  # no step can run again (a tensor-parallel rank is gone): the engine process ends, health 503
        except Exception as e:
            return self._step_failed(e)
        self.num_step_failures = 0
        self._time_tokens(outputs)
        records = []
        for out in outputs:
            samples = [[o.index, o.token_ids, o.logprobs, o.finish_reason, o.stop_reason] for o in out.outputs]
            error = error_to_wire(out.error) if out.error is not None else None
            records.append([out.request_id, out.finished, samples, out.prompt_logprobs,
                            out.metrics.get("first_token_time"), error])
        return records

    def _time_tokens(self, outputs: list) -> None:
        now = time.monotonic()
        for out in outputs:
            last = self._last_token_at.setdefault(out.request_id, {})
            for o in out.outputs:
                if o.token_ids:
                    if o.index in last:
                        self.itl.observe(now - last[o.index])
                    last[o.index] = now
            if out.finished:
                del self._last_token_at[out.request_id]

    def _step_failed(self, error: Exception) -> list[list]:
        """Retry; only when steps keep failing do the requests in flight end, with a 500."""
        self.num_step_failures += 1
        logger.error("engine step failed (%d in a row)", self.num_step_failures, exc_info=error)
        records = []
        if self.num_step_failures >= MAX_STEP_FAILURES:
            failure = error_to_wire(EngineStepError(f"The engine failed {self.num_step_failures} steps in a row "
                                                    f"({type(error).__name__}); see the server log"))
            ids = list(self.engine.requests)
            try:
                self.engine.abort_request(ids)
            except Exception:
                logger.exception("aborting after a failed step failed too")
            records = [[rid, True, [], None, None, failure] for rid in ids]
        time.sleep(min(0.05 * self.num_step_failures, 1.0))  # no hot loop if the engine stays broken
        return records

    # ------------------------------------------------------------------ adapters
    def _manager(self):
        mgr = self.engine.lora_manager
        if mgr is None:
            raise LoRADisabledError("LoRA is not enabled on this server; start it with --enable-lora")
        return mgr

    def preload(self, name: str, path: str, base_model_name: str | None = None) -> None:
        """Before serving: load a --lora-modules entry and wait for it."""
        self.engine.add_lora(LoRARequest(name, next(self._ids), path, base_model_name=base_model_name))
        logger.info("loaded LoRA adapter %r from %s", name, path)

    def load_adapter(self, name: str, path: str, load_inplace: bool, allowed_paths: list | None):
        """Queue a runtime load (or an in-place reload); returns the loader's future. Running requests keep their
        pace meanwhile."""
        current = self._manager().adapters.get(name)
        if current is not None and not load_inplace:
            raise LoRAAlreadyLoadedError(f"The lora adapter '{name}' has already been loaded. If you want to load "
                                         "the adapter in place, set 'load_inplace' to True.", name)
        lora_id = current.lora_int_id if current is not None else next(self._ids)
        return self.engine.add_lora_async(LoRARequest(
            name, lora_id, path, load_inplace=load_inplace,
            allowed_paths=tuple(allowed_paths) if allowed_paths else None))

    def add_resolved(self, req: LoRARequest):
        """Queue a load of what a resolver found (a concurrent request may have queued or added it already)."""
        self._manager()
        return self.engine.add_lora_async(dataclasses.replace(req, load_inplace=False))

    def unload_adapter(self, name: str) -> None:
        mgr = self.engine.lora_manager
        if mgr is None or name not in mgr.adapters:
            raise LoRANotFoundError(f"The lora adapter '{name}' cannot be found.", name)
        self.engine.remove_lora(name)

    # ------------------------------------------------------------------ state
    def state(self, force_adapters: bool = False) -> dict:
        """Queue lengths, adapter counters and, when they changed (or when forced), the loaded adapters."""
        engine, mgr = self.engine, self.engine.lora_manager
        scheduler, bm = engine.scheduler, engine.scheduler.block_manager
        state = {
            "num_running": scheduler.num_running,
            "num_waiting": scheduler.num_waiting,
            "kv_cache_usage": 1.0 - bm.num_free_blocks / max(bm.num_usable_blocks, 1),
            # vLLM's vllm:lora_requests_info labels: the adapters of the sequences running and waiting now.
            "running_lora_adapters": _adapter_names(scheduler.running),
            "waiting_lora_adapters": _adapter_names(scheduler.waiting),
            "itl": self.itl.snapshot(),
            "num_gpu_loras": mgr.num_gpu_loras if mgr is not None else 0,
            "num_cpu_loras": mgr.num_cpu_loras if mgr is not None else 0,
            "num_loras": len(mgr.adapters) if mgr is not None else 0,
            "lora_stats": dict(mgr.stats) if mgr is not None else {},
            "engine_stats": dict(engine.stats),
            "num_step_failures": self.num_step_failures,
        }
        epoch = mgr.registry.epoch if mgr is not None else None
        if force_adapters or epoch != self._adapters_epoch:
            self._adapters_epoch = epoch
            state["adapters"] = [] if mgr is None else [
                [m.request.lora_name, m.request.lora_int_id, m.request.lora_path, m.request.base_model_name]
                for m in mgr.adapters.values()]
        return state

    def adapters_changed(self) -> bool:
        mgr = self.engine.lora_manager
        return mgr is not None and mgr.registry.epoch != self._adapters_epoch
