"""Many adapters through few device slots: loads off the engine thread, prefetch in queue order, adapter-aware
admission with its aging bound, failures that stay with their own requests, the rank-aware pool."""
from __future__ import annotations

import shutil
import threading

import pytest
import torch

from helpers import make_peft_adapter, make_tiny_model
from loraplex import LLM, EngineArgs, LLMEngine, SamplingParams
from loraplex.errors import LoRALoadError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl

GREEDY = SamplingParams(temperature=0, max_tokens=6)
PROMPTS = ["Hello, my name is", "abc", "The quick brown fox", "1 2 3 4"]


def _engine(model_dir, **kwargs) -> LLMEngine:
    kwargs.setdefault("max_model_len", 128)
    return LLMEngine.from_engine_args(EngineArgs(model=str(model_dir), enable_lora=True, **kwargs))


def _run_all(engine, jobs, params=GREEDY):
    """Add every (prompt, LoRARequest | None) at once, step to the end; request id -> final output."""
    for i, (prompt, lora) in enumerate(jobs):
        engine.add_request(str(i), prompt, params, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
    return done


@pytest.fixture(scope="module")
def four_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    return {f"a{i}": str(make_peft_adapter(tiny_llama, root / f"a{i}", rank=8, targets="all-linear", seed=10 + i,
                                           scale=0.1)) for i in range(4)}


@pytest.fixture(scope="module")
def alone(tiny_llama, four_adapters):
    """(prompt, adapter name or None) -> token ids, each request run by itself on a roomy engine."""
    llm = LLM(model=str(tiny_llama), enable_lora=True, max_loras=4, max_lora_rank=8, max_model_len=128)
    out = {}
    for i, name in enumerate([None, *four_adapters]):
        lora = LoRARequest(name, i, four_adapters[name]) if name else None
        for p in PROMPTS:
            out[(p, name)] = llm.generate(p, GREEDY, lora_request=lora)[0].outputs[0].token_ids
    return out


@pytest.mark.parametrize("loader", ["thread", "process"])
def test_alternating_adapters_through_two_slots_load_each_once(tiny_llama, four_adapters, alone, loader):
    """16 requests alternating 4 adapters, 2 device slots, a host cache of 2: resident adapters' requests run
    first while the others load, so each adapter is read from storage once (by loader threads or processes)."""
    engine = _engine(tiny_llama, max_loras=2, max_cpu_loras=2, max_lora_rank=8, lora_loader=loader)
    assert type(engine.lora_manager.loader).__name__ == {"thread": "AdapterLoader", "process": "ProcessLoader"}[loader]
    names = list(four_adapters)
    jobs = [(PROMPTS[i % 4], LoRARequest(names[i % 4], 1 + i % 4, four_adapters[names[i % 4]])) for i in range(16)]
    done = _run_all(engine, jobs)
    assert [done[i].outputs[0].token_ids for i in range(16)] == [alone[(p, r.lora_name)] for p, r in jobs]
    stats = engine.lora_manager.stats
    assert stats["num_loads"] == 4, stats
    assert stats["num_uploads"] == 4, stats


def test_add_request_never_loads_and_others_run(tiny_llama, four_adapters, alone):
    """A slow adapter (a loader plugin that blocks) holds only its own request: base requests and a resident
    adapter's run to the end meanwhile, on the engine thread that never waited."""
    from loraplex.lora.peft_loader import read_peft_dir
    from pathlib import Path

    gate, entered = threading.Event(), threading.Event()

    class SlowStore:
        @hookimpl
        def loraplex_load_adapter(self, lora_request):
            if lora_request.lora_name != "slow":
                return None
            entered.set()
            gate.wait(30)
            return read_peft_dir(Path(lora_request.lora_path), "slow")

    engine = _engine(tiny_llama, max_loras=2, max_lora_rank=8)
    engine.add_lora(LoRARequest("a0", 1, four_adapters["a0"]))
    pm = engine.plugin_manager
    pm.register(SlowStore(), name="slow-store")
    try:
        engine.add_request("slow", PROMPTS[0], GREEDY, lora_request=LoRARequest("slow", 9, four_adapters["a1"]))
        engine.add_request("base", PROMPTS[1], GREEDY)
        engine.add_request("a0", PROMPTS[2], GREEDY, lora_request=LoRARequest("a0", 1, four_adapters["a0"]))
        done = {}
        for _ in range(200):
            done.update({o.request_id: o for o in engine.step() if o.finished})
            if "base" in done and "a0" in done:
                break
        assert entered.wait(30) and "slow" not in done  # its load started, and is still held
        assert done["base"].outputs[0].token_ids == alone[(PROMPTS[1], None)]
        assert done["a0"].outputs[0].token_ids == alone[(PROMPTS[2], "a0")]
        gate.set()
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        assert done["slow"].outputs[0].token_ids == alone[(PROMPTS[0], "a1")]
        assert engine.lora_manager.adapters["slow"].path == four_adapters["a1"]
    finally:
        gate.set()
        pm.unregister(name="slow-store")


@pytest.mark.parametrize("loader", ["thread", "process"])
def test_failed_loads_fail_only_their_requests(tiny_llama, four_adapters, alone, tmp_path, loader):
    """A corrupt file and an adapter for another model each fail their own requests, with the error add_lora
    gives for them (from a loader process too); base and good adapter requests in the same batch run as if
    alone."""
    corrupt = tmp_path / "corrupt"
    shutil.copytree(four_adapters["a2"], corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    wide_model = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=128)
    wide = make_peft_adapter(wide_model, tmp_path / "wide-lora", rank=4)
    engine = _engine(tiny_llama, max_loras=2, max_lora_rank=8, lora_loader=loader)
    jobs = [(PROMPTS[0], LoRARequest("a0", 1, four_adapters["a0"])), (PROMPTS[1], LoRARequest("bad", 2, str(corrupt))),
            (PROMPTS[2], None), (PROMPTS[3], LoRARequest("wide", 3, str(wide))),
            (PROMPTS[1], LoRARequest("bad", 2, str(corrupt))), (PROMPTS[3], LoRARequest("a3", 4, four_adapters["a3"]))]
    done = _run_all(engine, jobs)
    for i in (1, 4):
        assert isinstance(done[i].error, LoRALoadError) and "cannot read weights" in str(done[i].error)
        assert done[i].outputs[0].finish_reason == "abort" and done[i].outputs[0].token_ids == []
    assert isinstance(done[3].error, LoRALoadError) and "do not fit the base model" in str(done[3].error)
    for i in (0, 2, 5):
        assert done[i].error is None
        assert done[i].outputs[0].token_ids == alone[(jobs[i][0], jobs[i][1] and jobs[i][1].lora_name)]
    with pytest.raises(LoRALoadError, match="cannot read weights"):  # the same error add_lora raises
        engine.add_lora(LoRARequest("bad", 2, str(corrupt)))
    assert set(engine.lora_manager.adapters) == {"a0", "a3"}  # failed names never register
    engine.lora_manager.close()
    if loader == "process":
        return
    # LLM.generate raises the typed error, as when add_request refuses a prompt.
    llm = LLM(model=str(tiny_llama), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128)
    with pytest.raises(LoRALoadError, match="cannot read weights"):
        llm.generate([PROMPTS[0], PROMPTS[1]], GREEDY,
                     lora_request=[None, LoRARequest("bad", 2, str(corrupt))])
    assert llm.generate(PROMPTS[2], GREEDY)[0].outputs[0].token_ids == alone[(PROMPTS[2], None)]


@pytest.mark.parametrize("max_bypass", [4, 1000])
def test_aging_bounds_how_long_a_loaded_adapter_waits(tiny_llama, four_adapters, max_bypass):
    """One slot, a hot adapter with a new request every step, one request for another adapter. Adapter-aware
    admission lets the hot adapter's requests pass it, but only for max_lora_bypass_steps steps; then the hot
    adapter drains and the other one runs. Bound: max_bypass + max_tokens + 2 steps after it arrives."""
    engine = _engine(tiny_llama, max_loras=1, max_cpu_loras=2, max_lora_rank=8, max_lora_bypass_steps=max_bypass)
    hot = LoRARequest("a0", 1, four_adapters["a0"])
    cold = LoRARequest("a1", 2, four_adapters["a1"])
    engine.add_lora(hot)
    engine.add_lora(cold)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    admitted_at = None
    for step in range(80):
        engine.add_request(f"hot-{step}", PROMPTS[step % 4], params, lora_request=hot)
        if step == 2:
            engine.add_request("cold", PROMPTS[0], params, lora_request=cold)
        engine.step()
        cold_seq = engine.requests.get("cold", [None])[0]
        if admitted_at is None and cold_seq is not None and cold_seq.lora_entry >= 0:
            admitted_at = step
            break
    if max_bypass == 4:
        assert admitted_at is not None and admitted_at - 2 <= max_bypass + 4 + 2, admitted_at
    else:
        assert admitted_at is None  # without the bound the hot adapter starves it for as long as it runs


def test_prefetch_eviction_order(tiny_llama, four_adapters):
    """A pool of two: prefetch evicts an adapter no waiting request wants while one exists, then the one wanted
    last, and never one in use."""
    engine = _engine(tiny_llama, max_loras=2, max_cpu_loras=4, max_lora_rank=8)
    mgr = engine.lora_manager
    m = {n: mgr.add_lora(LoRARequest(n, i + 1, p)) for i, (n, p) in enumerate(four_adapters.items())}

    def resident():
        return {v.name for v in mgr.pool.resident.values()}

    mgr.prefetch([m["a0"], m["a1"]])
    assert resident() == {"a0", "a1"}
    mgr.acquire(m["a0"])  # a running sequence uses a0
    mgr.prefetch([m["a2"]])  # a1 is wanted by nobody: it goes
    assert resident() == {"a0", "a2"}
    mgr.prefetch([m["a3"], m["a2"]])  # a2 is wanted, but after a3, and a0 is in use
    assert resident() == {"a0", "a3"}
    mgr.prefetch([m["a3"], m["a2"]])  # nothing can go for a2: a3 is wanted first
    assert resident() == {"a0", "a3"}
    mgr.release(m["a0"])
    mgr.prefetch([m["a3"], m["a2"], m["a1"]])  # a0 idle and unwanted: a2 takes its place, a1 must wait
    assert resident() == {"a3", "a2"}
    assert mgr.stats["num_loads"] == 4  # every upload came from the host cache


def test_rank_aware_pool_holds_more_low_rank_adapters(tiny_llama, tmp_path):
    """Pool sized for 2 adapters of rank 16 (32 rank rows) holds 8 of rank 4 at once, all in one batch."""
    adapters = {f"r4-{i}": str(make_peft_adapter(tiny_llama, tmp_path / f"r4-{i}", rank=4, seed=i, scale=0.1))
                for i in range(8)}
    engine = _engine(tiny_llama, max_loras=8, max_cpu_loras=8, max_lora_rank=16, max_gpu_loras=2)
    assert engine.lora_manager.pool.num_pages == 32
    jobs = [(PROMPTS[i % 4], LoRARequest(n, i + 1, p)) for i, (n, p) in enumerate(adapters.items())]
    for _, lora in jobs:  # in the host cache first, so that all arrive in the pool in the first step
        engine.add_lora(lora)
    running_max = 0
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)  # none may end on its first token
    for i, (prompt, lora) in enumerate(jobs):
        engine.add_request(str(i), prompt, params, lora_request=lora)
    while engine.has_unfinished_requests():
        engine.step()
        running_max = max(running_max, len({s.lora_name for s in engine.scheduler.running}))
    assert running_max == 8 and engine.lora_manager.stats["num_evictions"] == 0


def test_many_adapters_equal_each_alone(tiny_llama, tmp_path):
    """Up to 64 distinct adapters (in-memory tensors, different ranks) through a pool of 6, a host cache of 12
    and max_loras 4, with base requests mixed in: every output equals its request run alone."""
    import json

    from safetensors.torch import load_file

    specs = [(4, ["q_proj", "v_proj"]), (8, "all-linear"), (2, ["down_proj", "o_proj"])]
    sources = []
    for i, (rank, targets) in enumerate(specs):
        d = make_peft_adapter(tiny_llama, tmp_path / f"src{i}", rank=rank, targets=targets, seed=i, scale=0.15)
        config = json.loads((d / "adapter_config.json").read_text())
        sources.append((config, load_file(d / "adapter_model.safetensors")))
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(64):
        config, tensors = sources[i % 3]
        noisy = {k: v * (1 + 0.5 * torch.rand(v.shape, generator=gen)) for k, v in tensors.items()}
        adapters.append(LoRARequest(f"m{i}", i + 1, "", tensors=noisy, config=config))
    jobs = [(PROMPTS[i % 4], adapters[i % 64] if i % 5 else None) for i in range(80)]
    engine = _engine(tiny_llama, max_loras=4, max_cpu_loras=12, max_lora_rank=8, max_gpu_loras=6, max_num_seqs=16)
    done = _run_all(engine, jobs)
    ref = _engine(tiny_llama, max_loras=1, max_lora_rank=8)
    for i, (prompt, lora) in enumerate(jobs):
        want = _run_all(ref, [(prompt, lora)])[0].outputs[0].token_ids
        assert done[i].outputs[0].token_ids == want, i
    stats = engine.lora_manager.stats
    assert stats["num_loads"] >= len({lora.lora_name for _, lora in jobs if lora}) and stats["num_evictions"] > 0


@pytest.mark.parametrize("field, value", [("max_gpu_loras", 0), ("lora_memory_fraction", 1.5),
                                          ("lora_loader", "fork"), ("num_lora_loader_workers", 0),
                                          ("max_lora_bypass_steps", -1)])
def test_pool_and_loader_arguments_are_validated(tiny_llama, field, value):
    with pytest.raises(ValueError, match=f"EngineArgs.{field}"):
        EngineArgs(model=str(tiny_llama), enable_lora=True, **{field: value})


def test_cli_passes_pool_and_loader_flags():
    from loraplex.server.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--max-gpu-loras", "64", "--lora-memory-fraction", "0.3",
                                      "--lora-loader", "thread", "--num-lora-loader-workers", "2",
                                      "--max-lora-bypass-steps", "8"])
    assert (args.max_gpu_loras, args.lora_memory_fraction, args.lora_loader, args.num_lora_loader_workers,
            args.max_lora_bypass_steps) == (64, 0.3, "thread", 2, 8)
