"""LoRA runtime behaviour: CPU cache eviction, slot limits, in-place reload, pinning, add/remove/list."""
from __future__ import annotations

from loraplex import LLM, EngineArgs, LLMEngine, SamplingParams
from loraplex.lora.request import LoRARequest

PROMPTS = ["Hello, my name is", "abc", "The quick brown fox", "1 2 3 4"]
GREEDY = SamplingParams(temperature=0, max_tokens=10)


def _reference(model_dir, adapters):
    """Each (prompt, adapter) run alone on a roomy engine."""
    llm = LLM(model=str(model_dir), enable_lora=True, max_loras=4, max_lora_rank=32, max_model_len=128)
    return {(p, n): llm.generate(p, GREEDY, lora_request=LoRARequest(n, i + 1, adapters[n]) if n else None)[0]
            .outputs[0].token_ids for p in PROMPTS for i, n in enumerate([None, *adapters])}


def _adapters(adapter_factory):
    return {f"r{r}": str(adapter_factory("llama", r)) for r in (4, 8, 16, 32)}


def test_cpu_eviction_and_reload_give_same_outputs(tiny_llama, adapter_factory):
    adapters = _adapters(adapter_factory)
    expected = _reference(tiny_llama, adapters)
    llm = LLM(model=str(tiny_llama), enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=32,
              max_model_len=128)
    names = [None, *adapters]
    for _ in range(2):  # the second round must reload evicted adapters from disk
        jobs = [(p, n) for n in names for p in PROMPTS[:2]]
        loras = [LoRARequest(n, names.index(n), adapters[n]) if n else None for _, n in jobs]
        outs = llm.generate([p for p, _ in jobs], GREEDY, lora_request=loras)
        for (p, n), out in zip(jobs, outs):
            assert out.outputs[0].token_ids == expected[(p, n)], (p, n)
    mgr = llm.llm_engine.lora_manager
    assert mgr.stats["cpu_misses"] > 0
    # The device pool holds max_loras adapters of max_lora_rank (32 rank rows), so lower ranks share it.
    assert mgr.num_cpu_loras <= 2
    assert sum(m.rank for m in mgr.pool.resident.values()) <= 32 == mgr.pool.num_pages


def test_max_loras_one_runs_mixed_workload_sequentially(tiny_llama, adapter_factory):
    adapters = _adapters(adapter_factory)
    expected = _reference(tiny_llama, adapters)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), enable_lora=True, max_loras=1,
                                                   max_cpu_loras=4, max_lora_rank=32, max_model_len=128))
    jobs = [(p, n) for p in PROMPTS for n in [None, *adapters]]
    for i, (p, n) in enumerate(jobs):
        engine.add_request(str(i), p, GREEDY, lora_request=LoRARequest(n, 1 + list(adapters).index(n),
                                                                      adapters[n]) if n else None)
    done = {}
    while engine.has_unfinished_requests():
        running = {s.lora_name for s in engine.scheduler.running if s.lora_name}
        assert len(running) <= 1
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    assert [done[i] for i in range(len(jobs))] == [expected[j] for j in jobs]


def test_inplace_reload_keeps_running_requests_on_old_version(tiny_llama, adapter_factory):
    v1, v2 = str(adapter_factory("llama", 8, seed=1)), str(adapter_factory("llama", 8, seed=2))
    long = SamplingParams(temperature=0, max_tokens=20)
    ref = LLM(model=str(tiny_llama), enable_lora=True, max_loras=2, max_lora_rank=32, max_model_len=128)
    want_v1 = ref.generate(PROMPTS[0], long, lora_request=LoRARequest("a", 1, v1))[0].outputs[0].token_ids
    want_v2 = ref.generate(PROMPTS[0], long, lora_request=LoRARequest("b", 2, v2))[0].outputs[0].token_ids
    assert want_v1 != want_v2
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), enable_lora=True, max_loras=2,
                                                   max_lora_rank=32, max_model_len=128))
    engine.add_request("old", PROMPTS[0], long, lora_request=LoRARequest("a", 1, v1))
    for _ in range(3):
        engine.step()
    engine.add_lora(LoRARequest("a", 1, v2, load_inplace=True))
    engine.add_request("new", PROMPTS[0], long, lora_request=LoRARequest("a", 1, v2))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done["old"] == want_v1
    assert done["new"] == want_v2
    mgr = engine.lora_manager
    # The old version's pages are freed once its last request ended.
    assert [m.version for m in mgr.pool.resident.values()] == [mgr.adapters["a"].version]


def test_add_remove_list_pin(tiny_llama, adapter_factory):
    llm = LLM(model=str(tiny_llama), enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=32,
              max_model_len=128)
    a4, a8, a16 = (str(adapter_factory("llama", r)) for r in (4, 8, 16))
    assert llm.add_lora(LoRARequest("a4", 1, a4))
    assert llm.add_lora(LoRARequest("a8", 2, a8))
    assert {r.lora_name for r in llm.list_loras()} == {"a4", "a8"}
    assert llm.pin_lora("a4")
    llm.add_lora(LoRARequest("a16", 3, a16))  # CPU cache of 2: evicts a8, never the pinned a4
    mgr = llm.llm_engine.lora_manager
    assert mgr.adapters["a4"].is_materialized and not mgr.adapters["a8"].is_materialized
    assert llm.remove_lora("a8") and not llm.remove_lora("a8")
    assert {r.lora_name for r in llm.list_loras()} == {"a4", "a16"}
    out = llm.generate("abc", GREEDY, lora_request=LoRARequest("a16", 3, a16))
    assert out[0].finished
