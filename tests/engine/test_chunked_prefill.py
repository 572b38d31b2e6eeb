"""Chunked prefill: a prompt longer than the step's token budget is prefilled over several steps beside the running
decodes, and nothing it produces differs from a prefill in one step.

A 4,000-token prompt under a 512-token budget against the same engine without chunking (base and adapter), in a
mixed batch whose decode streams must emit a token every step while it prefills; prompt logprobs computed chunk by
chunk; async scheduling (no look-ahead while a prompt is chunked) against sync; the GPU path (CUDA graphs for the
decodes, Triton attention over cached context) against an unchunked engine.
"""
from __future__ import annotations

import random

import pytest
import torch

from helpers import make_peft_adapter, make_tiny_model
from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.lora.request import LoRARequest

LONG = 4000
BUDGET = 512
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-8k"), "llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def loras(long_model, tmp_path_factory):
    return [LoRARequest(n, i + 1, str(make_peft_adapter(long_model, tmp_path_factory.mktemp(n), rank=8,
                                                         targets="all-linear", seed=i + 1, scale=0.1)))
            for i, n in enumerate(("a", "b"))]


def _engine(model, loras, **kw):
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model), max_model_len=LONG + 64, max_num_seqs=8, enable_lora=True, max_loras=2, max_lora_rank=8,
        lora_loader="thread", enable_prefix_caching=False, **kw))
    for lora in loras:
        engine.add_lora(lora)
    return engine


@pytest.fixture(scope="module")
def unchunked(long_model, loras):
    return _engine(long_model, loras, enable_chunked_prefill=False)


@pytest.fixture(scope="module")
def chunked(long_model, loras):
    engine = _engine(long_model, loras, max_num_batched_tokens=BUDGET)
    schedule = engine.scheduler.schedule
    engine.test_batches = []

    def recording():
        out = schedule()
        engine.test_batches.append(list(out.num_scheduled_tokens))
        return out

    engine.scheduler.schedule = recording
    return engine


def _prompt(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(250) for _ in range(n)]}


def _run(engine, jobs) -> dict:
    """jobs: [(request id, prompt, params, lora)] added at once; -> request id -> RequestOutput."""
    for rid, prompt, params, lora in jobs:
        engine.add_request(rid, prompt, params, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("adapter", [None, 0])
def test_long_prompt_equals_unchunked(unchunked, chunked, loras, adapter):
    lora = None if adapter is None else loras[adapter]
    job = [(f"long-{adapter}", _prompt(LONG, 1), GREEDY, lora)]
    want = _run(unchunked, job)[job[0][0]].outputs[0].token_ids
    chunked.test_batches.clear()
    got = _run(chunked, job)[job[0][0]].outputs[0].token_ids
    assert got == want
    # Eight chunks of at most the budget, then the decodes.
    assert all(sum(b) <= BUDGET for b in chunked.test_batches)
    assert [b for b in chunked.test_batches[:8]] == [[BUDGET]] * 7 + [[LONG - 7 * BUDGET]]
    bm = chunked.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_mixed_batch_decodes_keep_emitting(unchunked, chunked, loras):
    """Three streams (base, a, b) decode; a long prompt of adapter a arrives and is prefilled in chunks beside
    them: each stream gets a token every step meanwhile, and every output equals the unchunked engine's."""
    short = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    streams = [(f"s{i}", _prompt(20 + 7 * i, 10 + i), short, lora) for i, lora in enumerate([None, *loras])]
    long_job = ("long", _prompt(LONG, 2), GREEDY, loras[0])
    want = {job[0]: _run(unchunked, [job])[job[0]].outputs[0].token_ids for job in [*streams, long_job]}

    for rid, prompt, params, lora in streams:
        chunked.add_request(rid, prompt, params, lora_request=lora)
    for _ in range(2):
        chunked.step()
    chunked.add_request(long_job[0], long_job[1], long_job[2], lora_request=long_job[3])
    chunked.test_batches.clear()
    long_seq = chunked.requests["long"][0]
    done, num_chunk_steps = {}, 0
    while chunked.has_unfinished_requests():
        before = {rid: len(chunked.requests[rid][0].output_token_ids) for rid, *_ in streams if rid in chunked.requests}
        was_prefilling = not long_seq.output_token_ids
        outs = chunked.step()
        for out in outs:
            if out.finished:
                done[out.request_id] = out
        if was_prefilling:
            num_chunk_steps += 1
            for rid, n in before.items():
                assert len(chunked.requests[rid][0].output_token_ids) == n + 1, (rid, num_chunk_steps)
            # No token before the prompt's last chunk.
            assert bool(long_seq.output_token_ids) == (num_chunk_steps == 8)
    assert num_chunk_steps == 8  # 3 decodes + 509 prefill tokens a step
    assert all(sum(b) <= BUDGET for b in chunked.test_batches)
    assert {rid: out.outputs[0].token_ids for rid, out in done.items()} == want


def test_prompt_logprobs_over_chunks(unchunked, chunked):
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3, ignore_eos=True)
    job = [("plp", _prompt(1300, 3), params, None)]
    want = _run(unchunked, job)["plp"]
    got = _run(chunked, job)["plp"]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == 1300
    assert got.prompt_logprobs[0] is None
    for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys()
        assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) and a[t].rank == b[t].rank for t in a)


def _async_workload(model_dir, adapters, **kw):
    """Staggered requests whose prompts exceed a 24-token budget: chunks beside decodes, n=2, seeded sampling."""
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), max_model_len=128, max_num_seqs=4, enable_lora=True, max_loras=2, max_lora_rank=8,
        lora_loader="thread", seed=0, **kw))
    loras = [None, *adapters]
    for lora in adapters:
        engine.add_lora(lora)
    kinds = [dict(temperature=0, max_tokens=9), dict(temperature=1.0, seed=5, max_tokens=7),
             dict(temperature=1.0, n=2, seed=3, max_tokens=6), dict(temperature=0, max_tokens=11, logprobs=2)]
    pending = [(str(i), _prompt(5 + 13 * i % 60, 20 + i), SamplingParams(ignore_eos=True, **kinds[i % 4]),
                loras[i % 3]) for i in range(9)]
    done, step = {}, 0
    while pending or engine.has_unfinished_requests():
        if step % 3 == 0 and pending:
            rid, prompt, params, lora = pending.pop(0)
            engine.add_request(rid, prompt, params, lora_request=lora)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(o.token_ids, o.logprobs) for o in out.outputs]
        step += 1
    return done, engine.stats


def test_async_scheduling_with_chunks_equals_sync(tiny_llama, tmp_path):
    adapters = [LoRARequest(n, i + 1, str(make_peft_adapter(tiny_llama, tmp_path / n, rank=8, targets="all-linear",
                                                            seed=i + 1, scale=0.1))) for i, n in enumerate("ab")]
    want, _ = _async_workload(tiny_llama, adapters, enable_chunked_prefill=False, async_scheduling=False)
    got, stats = _async_workload(tiny_llama, adapters, max_num_batched_tokens=24, async_scheduling=True)
    assert stats["num_async_steps"] > 0
    assert got.keys() == want.keys()
    for rid in want:
        for (ta, la), (tb, lb) in zip(got[rid], want[rid], strict=True):
            assert ta == tb, rid
            for ea, eb in zip(la or [], lb or [], strict=True):
                assert ea.keys() == eb.keys()


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_chunked_equals_unchunked(long_model, loras, enforce_eager):
    """CUDA: Triton attention of chunks over cached context; decodes beside them replay CUDA graphs (fp32, so
    greedy tokens are comparable exactly)."""
    def engine(**kw):
        e = LLMEngine.from_engine_args(EngineArgs(
            model=str(long_model), device="cuda", dtype="float32", max_model_len=LONG + 64, max_num_seqs=8,
            enable_lora=True, max_loras=2, max_lora_rank=8, enforce_eager=enforce_eager, **kw))
        for lora in loras:
            e.add_lora(lora)
        return e

    short = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    jobs = [(f"s{i}", _prompt(30 + i, 40 + i), short, lora) for i, lora in enumerate([None, *loras])]
    jobs.append(("long", _prompt(LONG, 4), GREEDY, loras[1]))
    want = _run(engine(enable_chunked_prefill=False, enable_prefix_caching=False), jobs)
    got = _run(engine(max_num_batched_tokens=BUDGET), jobs)
    assert {r: o.outputs[0].token_ids for r, o in got.items()} == {r: o.outputs[0].token_ids for r, o in want.items()}
    del got, want
    torch.cuda.empty_cache()


def test_prompt_logprobs_survive_preemption_mid_prefill(tiny_llama):
    """A prompt-logprobs request preempted between its chunks is prefilled anew and still gets every position's
    logprobs, equal to a roomy unchunked engine's; the decodes around it are unchanged too."""
    def run(**kw):
        engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=128, block_size=8,
                                                       max_num_seqs=4, **kw))
        streams = SamplingParams(temperature=0, max_tokens=56, ignore_eos=True)
        for i in range(2):
            engine.add_request(f"s{i}", _prompt(40, 60 + i), streams)
        done, step = {}, 0
        while engine.has_unfinished_requests() or step < 4:
            if step == 3:
                engine.add_request("x", _prompt(60, 62), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))
                engine.test_x = engine.requests["x"][0]
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            step += 1
        return done, engine

    want, _ = run(enable_chunked_prefill=False, enable_prefix_caching=False)
    got, engine = run(num_gpu_blocks_override=17, max_num_batched_tokens=16)
    assert engine.test_x.num_preemptions > 1  # preempted between chunks, prefilled anew in other chunks
    assert {r: o.outputs[0].token_ids for r, o in got.items()} == {r: o.outputs[0].token_ids for r, o in want.items()}
    assert len(got["x"].prompt_logprobs) == 60
    for a, b in zip(got["x"].prompt_logprobs[1:], want["x"].prompt_logprobs[1:], strict=True):
        assert a.keys() == b.keys() and all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)
