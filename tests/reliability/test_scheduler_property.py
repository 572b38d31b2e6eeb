"""Random workloads on the real engine (hypothesis): its limits are never exceeded and nothing leaks.

Arrivals, prompt and output lengths, adapters (more than the CPU cache and the batch slots hold), n > 1,
aborts and a KV cache small enough to preempt. After every step: the batch's tokens fit
max_num_batched_tokens, its sequences max_num_seqs, its distinct adapters max_loras, and the blocks in use
the cache; at the end every request has finished or been aborted, and every block and adapter slot is free.
"""
from __future__ import annotations

import pytest
from helpers import make_peft_adapter

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.lora.request import LoRARequest

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

MAX_NUM_SEQS, MAX_TOKENS_PER_STEP, MAX_LORAS = 6, 96, 2
_EXAMPLES = iter(range(10**9))


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory):
    loras = [LoRARequest(f"a{i}", i + 1, str(make_peft_adapter(tiny_llama, tmp_path_factory.mktemp(f"a{i}"),
                                                               rank=4 * (i % 2 + 1), seed=i + 1)))
             for i in range(4)]
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(tiny_llama), max_model_len=64, max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_TOKENS_PER_STEP, enable_lora=True, max_loras=MAX_LORAS, max_lora_rank=8,
        max_cpu_loras=3, num_gpu_blocks_override=10, block_size=8, lora_loader="thread"))
    engine.test_loras = loras
    return engine


request = st.fixed_dictionaries({
    "prompt_len": st.integers(1, 40), "max_tokens": st.integers(1, 20), "n": st.integers(1, 3),
    "adapter": st.none() | st.integers(0, 3), "arrive_at": st.integers(0, 12),
    "abort_at": st.none() | st.integers(0, 25),
})


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
@hypothesis.given(st.lists(request, min_size=1, max_size=10))
def test_random_workload_respects_every_limit(engine, workload):
    sched, bm = engine.scheduler, engine.scheduler.block_manager
    mgr = engine.lora_manager
    batches = []
    schedule = sched.schedule

    def recording_schedule():
        out = schedule()
        # Snapshot now: by the end of the step a finished sequence has given its adapter slot back.
        batches.append((list(out.num_scheduled_tokens), [(s.lora_model, s.lora_entry) for s in out.seqs]))
        return out

    sched.schedule = recording_schedule
    try:
        finished, ids, step = {}, [], 0
        tag = f"x{next(_EXAMPLES)}-"  # a failed example may leave requests behind: never reuse an id
        while step < 400:
            for i, r in enumerate(workload):
                if r["arrive_at"] == step:
                    rid = f"{tag}r{i}"
                    lora = None if r["adapter"] is None else engine.test_loras[r["adapter"]]
                    # Every prompt fits the model (prompt + max_tokens <= 64), so each one is legal.
                    prompt = {"prompt_token_ids": [(7 * i + j) % 250 for j in range(r["prompt_len"])]}
                    params = SamplingParams(max_tokens=r["max_tokens"], n=r["n"], temperature=0.8, seed=i,
                                            ignore_eos=True)
                    engine.add_request(rid, prompt, params, lora_request=lora)
                    ids.append(rid)
                if r["abort_at"] == step and f"{tag}r{i}" in ids:
                    engine.abort_request(f"{tag}r{i}")
            for out in engine.step():
                assert out.error is None, out.error
                if out.finished:
                    finished[out.request_id] = out
            for num_tokens, seqs in batches:
                assert sum(num_tokens) <= MAX_TOKENS_PER_STEP
                assert len(seqs) <= MAX_NUM_SEQS
                assert len({id(m) for m, _ in seqs if m is not None}) <= MAX_LORAS
                assert all(entry >= 0 for m, entry in seqs if m is not None)
            batches.clear()
            assert 0 <= bm.num_free_blocks <= bm.num_usable_blocks
            # Prefix caching shares full blocks between sequences: count each block once.
            assert len({b for s in sched.running for b in s.block_table}) == bm.num_usable_blocks - bm.num_free_blocks
            assert mgr.num_active <= MAX_LORAS
            step += 1
            if len(ids) == len(workload) and not engine.has_unfinished_requests():
                break
        assert not engine.has_unfinished_requests(), "the workload did not drain in 400 steps"
        assert set(finished) == set(ids)
        for i, r in enumerate(workload):
            out = finished[f"{tag}r{i}"]
            for o in out.outputs:
                assert o.finish_reason in ("length", "abort")
                if o.finish_reason == "length":
                    assert len(o.token_ids) == r["max_tokens"]
        assert bm.num_free_blocks == bm.num_usable_blocks
        assert mgr.num_active == 0 and all(m.num_refs == 0 for m in mgr.adapters.values())
        assert not engine.requests
    finally:
        sched.schedule = schedule


def test_the_workloads_reached_preemption_and_eviction(engine):
    """Runs after the property test on the same engine: its workloads did exercise the hard paths."""
    assert engine.scheduler.num_preemptions > 0
    assert engine.lora_manager.stats["num_loads"] > len(engine.test_loras)  # the CPU cache evicted and reloaded
