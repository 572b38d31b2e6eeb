"""The issue's reproductions, and faults injected through test plugins (the hooks a third party would use)."""
from __future__ import annotations

import pytest
import torch
from helpers import make_peft_adapter

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.errors import EngineStepError, LoRALoadError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def loras(tiny_llama, tmp_path_factory):
    return [LoRARequest(f"r{i}", i + 1, str(make_peft_adapter(tiny_llama, tmp_path_factory.mktemp(f"r{i}"), rank=8,
                                                              seed=20 + i, targets="all-linear")))
            for i in range(3)]


def _engine(model_dir, **kwargs) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(model=str(model_dir), max_model_len=128, enable_lora=True,
                                                 max_lora_rank=8, lora_loader="thread", **kwargs))


def _run(engine, jobs) -> dict:
    for rid, (prompt, lora) in jobs.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, GREEDY, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


def test_token_budget_with_running_decodes(tiny_llama, loras):
    """The issue's CPU reproduction: 24 mixed requests of 32 tokens with max_num_batched_tokens 256 used to
    raise 'tokens exceed max_num_tokens' once prefills were admitted beside running decodes. Every request
    now finishes, each with its solo output."""
    jobs = {f"q{i}": ([(11 * i + j) % 250 for j in range(32)], None if i % 4 == 0 else loras[i % 3])
            for i in range(24)}
    engine = _engine(tiny_llama, max_loras=3, max_num_batched_tokens=256, max_num_seqs=24)
    done = _run(engine, jobs)
    assert all(o.error is None and len(o.outputs[0].token_ids) == 8 for o in done.values())
    solo = _engine(tiny_llama, max_loras=1)
    for rid in ("q0", "q1", "q2", "q23"):
        assert done[rid].outputs[0].token_ids == _run(solo, {rid: jobs[rid]})[rid].outputs[0].token_ids


def test_a_loader_plugin_that_raises_fails_only_its_adapter(tiny_llama, loras):
    class BrokenStore:
        @hookimpl(tryfirst=True)
        def loraplex_load_adapter(self, lora_request):
            if lora_request.lora_name == "r1":
                raise ConnectionError("store unreachable")
            return None

    engine = _engine(tiny_llama, max_loras=2)
    engine.plugin_manager.register(BrokenStore(), name="broken-store")
    try:
        jobs = {"a": ([5, 6, 7], loras[0]), "b": ([5, 6, 7], loras[1]), "c": ([8, 9], None), "d": ([1, 2], loras[1])}
        done = _run(engine, jobs)
    finally:
        engine.plugin_manager.unregister(name="broken-store")
    for rid in ("b", "d"):
        assert isinstance(done[rid].error, LoRALoadError) and "store unreachable" in str(done[rid].error)
    for rid in ("a", "c"):
        assert done[rid].error is None and len(done[rid].outputs[0].token_ids) == 8


MARKER = 251  # a token id that only the faulty request's prompt carries


def test_a_forward_hook_plugin_that_raises_fails_only_its_step(tiny_llama, loras):
    """A plugin installs a forward hook (through loraplex_engine_started) that raises on one request's input.
    That request's step fails alone (it arrives first, so its prefill runs in a step of its own); the others
    finish with their solo outputs and the engine serves on."""
    class FaultyLayer:
        @hookimpl
        def loraplex_engine_started(self, engine):
            def hook(module, args):
                if (args[0] == MARKER).any():
                    raise RuntimeError("injected fault")
            engine.model.embed_tokens.register_forward_pre_hook(hook)

    from loraplex.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.register(FaultyLayer(), name="faulty-layer")
    try:
        engine = _engine(tiny_llama, max_loras=2)
    finally:
        pm.unregister(name="faulty-layer")
    engine.add_request("faulty", {"prompt_token_ids": [1, MARKER, 3]}, GREEDY, lora_request=loras[0])
    first = _run(engine, {})  # its adapter loads, then its prefill fails
    assert isinstance(first["faulty"].error, EngineStepError) and first["faulty"].finished
    assert isinstance(first["faulty"].error.__cause__, RuntimeError)
    jobs = {"x": ([4, 5, 6], loras[0]), "y": ([7, 8], None), "z": ([9, 10, 11], loras[2])}
    done = _run(engine, jobs)
    clean = _engine(tiny_llama, max_loras=2)
    ref = _run(clean, jobs)
    for rid in jobs:
        assert done[rid].error is None and done[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks and engine.lora_manager.num_active == 0


def test_lora_dtype_other_than_auto_serves(tiny_llama, loras):
    """The issue's lora_dtype finding: any value but auto used to fail every LoRA request in the kernel."""
    for lora_dtype in ("bfloat16", "float16", "float32"):
        engine = _engine(tiny_llama, max_loras=2, lora_dtype=lora_dtype)
        done = _run(engine, {"a": ([5, 6, 7], loras[0]), "b": ([8, 9], None)})
        assert all(o.error is None and len(o.outputs[0].token_ids) == 8 for o in done.values()), lora_dtype
    assert torch.float32  # (lora_dtype parity with PEFT: tests/lora/test_lora_dtype.py)
