"""Prefix caching keyed by adapter version: reuse never changes an output, and never crosses adapters, versions
or images.

- hit counts on a crafted workload (shared prefixes, base and adapter, the last token always computed, prompt
  logprobs skipping the cache) and the per-adapter counters;
- LRU eviction only when a fresh block is needed;
- in-place reload with a request in flight: the new version finds nothing of the old one, its output equals a
  cold run; an unload and load again likewise;
- multi-modal prompts: the same text with another image finds nothing, with the same image it does;
- a property test: random workloads with shared prefixes, several adapters and the base model, aborts,
  preemption and chunked prefill; every greedy output equals the caching-off engine's.
"""
from __future__ import annotations

import pytest
import torch

from helpers import make_peft_adapter
from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.engine.block_manager import cache_key, mm_digest, version_id
from loraplex.lora.request import LoRARequest

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    return {n: str(make_peft_adapter(tiny_llama, tmp_path_factory.mktemp(n), rank=8, targets="all-linear",
                                     seed=s, scale=0.1)) for n, s in (("a", 1), ("b", 2), ("c", 3))}


def _engine(model, caching: bool = True, **kw):
    return LLMEngine.from_engine_args(EngineArgs(
        model=str(model), max_model_len=256, block_size=BS, max_num_seqs=8, enable_lora=True, max_loras=2,
        max_lora_rank=8, lora_loader="thread", enable_prefix_caching=caching, **kw))


def _run(engine, rid, ids, params=GREEDY, lora=None):
    """One request to the end -> (output, its first sequence: num_cached_tokens)."""
    engine.add_request(rid, {"prompt_token_ids": ids}, params, lora_request=lora)
    seq = engine.requests[rid][0]
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished and o.request_id == rid:
                out = o
    return out, seq


def _ids(n, seed):
    return [(seed * 31 + 7 * j) % 250 for j in range(n)]


def _check_consistent(engine):
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks and not any(bm.ref_counts)
    assert all(bm.hash_of[b] == h for h, b in bm.cached.items())
    assert sum(h is not None for h in bm.hash_of) == len(bm.cached)


def test_hit_counts_on_a_crafted_workload(tiny_llama, adapters):
    engine, cold = _engine(tiny_llama), _engine(tiny_llama, caching=False)
    a = LoRARequest("a", 1, adapters["a"])
    base = _ids(100, 1)
    # (request, prompt, adapter, tokens expected from the cache)
    jobs = [
        ("A", base, None, 0),
        ("B", base[:80] + _ids(30, 2), None, 80),  # 5 shared full blocks
        ("C", base, a, 0),  # the same tokens under an adapter: nothing of the base model's
        ("D", base, a, 96),  # 6 full blocks; C wrote 103 tokens' K/V (its last output is never computed)
        ("E", base[:96], None, 80),  # a 6-block prompt: its last block is recomputed for the logits
        ("F", base[:96] + base[:5], None, 96),
        ("G", _ids(10, 3), None, 0),  # shorter than a block
    ]
    for rid, ids, lora, want in jobs:
        out, seq = _run(engine, rid, ids, lora=lora)
        assert seq.num_cached_tokens == want, rid
        assert out.outputs[0].token_ids == _run(cold, rid, ids, lora=lora)[0].outputs[0].token_ids, rid
    # Prompt logprobs need every position: no cache read, nothing counted; equal to the cold engine's.
    plp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    out, seq = _run(engine, "P", base, plp)
    assert seq.num_cached_tokens == 0
    want = _run(cold, "P", base, plp)[0]
    assert [e and sorted(e) for e in out.prompt_logprobs] == [e and sorted(e) for e in want.prompt_logprobs]
    stats = engine.stats
    queries = {"": 100 + 110 + 96 + 101 + 10, "a": 200}
    hits = {"": 80 + 80 + 96, "a": 96}
    assert stats["prefix_cache_by_model"] == {k: [queries[k], hits[k]] for k in queries}
    assert stats["num_prefix_cache_queries"] == sum(queries.values())
    assert stats["num_prefix_cache_hits"] == sum(hits.values())
    assert cold.stats["num_prefix_cache_queries"] == 0
    _check_consistent(engine)


def test_n_samples_and_a_second_turn_share_blocks(tiny_llama):
    """A request's n samples and a later request continuing one of them (a chat's next turn) reuse blocks."""
    engine, cold = _engine(tiny_llama), _engine(tiny_llama, caching=False)
    params = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=40, ignore_eos=True)
    prompt = _ids(50, 4)
    out, _ = _run(engine, "x", prompt, params)
    want, _ = _run(cold, "x", prompt, params)
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in want.outputs]
    turn = prompt + list(out.outputs[1].token_ids) + _ids(5, 5)
    out, seq = _run(engine, "y", turn)
    assert seq.num_cached_tokens == (50 + 39) // BS * BS  # prompt and generated tokens, full blocks
    assert out.outputs[0].token_ids == _run(cold, "y", turn)[0].outputs[0].token_ids
    _check_consistent(engine)


def test_eviction_is_lru_and_only_when_needed(tiny_llama):
    engine = _engine(tiny_llama, num_gpu_blocks_override=21)  # 20 usable blocks
    bm = engine.scheduler.block_manager
    first = _ids(100, 6)
    _run(engine, "a", first)
    assert bm.num_cached_blocks == 6 and bm.num_evictions == 0
    _run(engine, "b", _ids(150, 7))  # 10 blocks: the 14 never-cached ones are handed out first
    assert bm.num_evictions == 0 and bm.num_cached_blocks == 6 + 9
    assert _run(engine, "a2", first)[1].num_cached_tokens == 96
    _run(engine, "c", _ids(250, 8))  # 16 blocks: the least recently used cached blocks go
    assert bm.num_evictions > 0
    # "b"'s blocks were freed before "a2"'s: they went first, so "first" keeps some of its prefix.
    out, seq = _run(engine, "a3", first)
    assert 0 < seq.num_cached_tokens <= 96
    cold = _engine(tiny_llama, caching=False)
    assert out.outputs[0].token_ids == _run(cold, "a3", first)[0].outputs[0].token_ids
    _check_consistent(engine)
    assert engine.reset_prefix_cache() and bm.num_cached_blocks == 0


def test_inplace_reload_in_flight_finds_nothing_of_the_old_version(tiny_llama, adapters):
    v1, v2 = adapters["a"], adapters["b"]
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = _ids(90, 9)
    cold = _engine(tiny_llama, caching=False)
    want_v1 = _run(cold, "r", prompt, long, LoRARequest("v1", 1, v1))[0].outputs[0].token_ids
    want_v2 = _run(cold, "r", prompt, long, LoRARequest("v2", 2, v2))[0].outputs[0].token_ids
    assert want_v1 != want_v2

    engine = _engine(tiny_llama)
    engine.add_lora(LoRARequest("a", 1, v1))
    engine.add_request("old", {"prompt_token_ids": prompt}, long, lora_request=LoRARequest("a", 1, v1))
    for _ in range(5):
        engine.step()  # prefilled: its blocks are in the index, and it is still decoding
    assert engine.scheduler.block_manager.num_cached_blocks >= 5
    engine.add_lora(LoRARequest("a", 1, v2, load_inplace=True))
    engine.add_request("new", {"prompt_token_ids": prompt}, long, lora_request=LoRARequest("a", 1, v2))
    new_seq = engine.requests["new"][0]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert new_seq.num_cached_tokens == 0
    assert done == {"old": want_v1, "new": want_v2}
    # The new version reuses its own blocks.
    out, seq = _run(engine, "again", prompt, long, LoRARequest("a", 1, v2))
    assert seq.num_cached_tokens == 80 and out.outputs[0].token_ids == want_v2
    # Unloaded and loaded again from the first path: a new version, so nothing cached before is found.
    assert engine.remove_lora("a")
    engine.add_lora(LoRARequest("a", 1, v1))
    out, seq = _run(engine, "reloaded", prompt, long, LoRARequest("a", 1, v1))
    assert seq.num_cached_tokens == 0 and out.outputs[0].token_ids == want_v1
    _check_consistent(engine)


def test_cache_salt_separates_tenants(tiny_llama):
    """vLLM's cache_salt: only requests with the same salt share blocks (the base model's and an unsalted
    request's are not found either); the output carries num_cached_tokens; a bad salt is refused."""
    from loraplex.errors import InvalidRequestError

    engine = _engine(tiny_llama)
    prompt, cold = _ids(70, 6), None

    def run(rid, salt=None):
        body = {"prompt_token_ids": prompt, **({"cache_salt": salt} if salt is not None else {})}
        engine.add_request(rid, body, GREEDY)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished and o.request_id == rid:
                    return o

    first = run("s1", salt="tenant-1")
    assert first.num_cached_tokens == 0
    assert run("s2", salt="tenant-2").num_cached_tokens == 0
    assert run("u", salt=None).num_cached_tokens == 0
    again = run("s1b", salt="tenant-1")
    assert again.num_cached_tokens == 64 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert run("u2").num_cached_tokens == 64
    for bad in ("", 3, None):
        with pytest.raises(InvalidRequestError, match="cache_salt"):
            engine.add_request(f"bad{bad!r}", {"prompt_token_ids": prompt, "cache_salt": bad}, GREEDY)
    assert engine.get_num_unfinished_requests() == 0
    assert cache_key(None, None, salt="x") != cache_key(None, None, salt="y") != cache_key(None, None)
    assert engine.reset_prefix_cache() and run("s1c", salt="tenant-1").num_cached_tokens == 0
    _check_consistent(engine)


def test_llm_reset_prefix_cache(tiny_llama):
    from loraplex import LLM

    llm = LLM(str(tiny_llama), max_model_len=256, block_size=BS, max_num_seqs=4)
    prompt = {"prompt_token_ids": _ids(40, 8)}
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache() is True
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0


def test_cache_key_units():
    class Version:  # stands in for a LoRAModel: hashed by identity
        pass

    v1, v2 = Version(), Version()
    assert version_id(None) == 0 and version_id(v1) == version_id(v1) != version_id(v2) != 0
    assert cache_key(v1, None) != cache_key(v2, None) != cache_key(None, None)
    px = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    same = {"pixel_values": px.clone(), "modalities": ("image",)}
    other = {"pixel_values": px + 1, "modalities": ("image",)}
    assert mm_digest({"pixel_values": px, "modalities": ("image",)}) == mm_digest(same)
    assert mm_digest(same) != mm_digest(other) != b""
    assert mm_digest({**same, "embeds": torch.ones(3)}) == mm_digest(same)  # derived, left out
    assert mm_digest({"pixel_values": px.to(torch.bfloat16)}) != mm_digest({"pixel_values": px})
    assert cache_key(None, same) != cache_key(None, None)


def test_multimodal_blocks_follow_the_image(tmp_path_factory):
    pytest.importorskip("PIL")
    from helpers import make_tiny_llava, random_image

    llava = make_tiny_llava(tmp_path_factory.mktemp("llava-pc") / "model")
    text = "a long shared preamble, " * 6 + "then <image> and a question"

    def run(engine, rid, image):
        engine.add_request(rid, {"prompt": text, "multi_modal_data": {"image": [random_image(image)]}}, GREEDY)
        seq = engine.requests[rid][0]
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    return o.outputs[0].token_ids, seq.num_cached_tokens

    args = dict(model=str(llava), max_model_len=256, block_size=BS, max_num_seqs=4)
    engine = LLMEngine.from_engine_args(EngineArgs(**args))
    cold = LLMEngine.from_engine_args(EngineArgs(**args, enable_prefix_caching=False))
    first, hits = run(engine, "1", 1)
    assert hits == 0
    other, hits = run(engine, "2", 2)
    assert hits == 0 and other == run(cold, "2", 2)[0]
    again, hits = run(engine, "3", 1)
    assert hits > 0 and again == first == run(cold, "1", 1)[0]


# ---------------------------------------------------------------------------------------------- property test
MAX_NUM_SEQS, BUDGET, PBS = 5, 48, 8
_EXAMPLES = iter(range(10**9))


@pytest.fixture(scope="module")
def pair(tiny_llama, adapters):
    """(reference: caching off, roomy, unchunked; engine: caching on, a KV cache small enough to preempt, chunked
    prefill under a small budget)."""
    common = dict(model=str(tiny_llama), max_model_len=128, block_size=PBS, max_num_seqs=MAX_NUM_SEQS,
                  enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=3, lora_loader="thread")
    ref = LLMEngine.from_engine_args(EngineArgs(**common, enable_prefix_caching=False,
                                                enable_chunked_prefill=False))
    engine = LLMEngine.from_engine_args(EngineArgs(**common, num_gpu_blocks_override=22,
                                                   max_num_batched_tokens=BUDGET))
    loras = [LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(adapters.items())]
    return ref, engine, loras


request = st.fixed_dictionaries({
    "system": st.integers(0, 3), "own_len": st.integers(1, 20), "max_tokens": st.integers(1, 12),
    "adapter": st.none() | st.integers(0, 2), "n": st.integers(1, 2), "arrive_at": st.integers(0, 10),
    "abort_at": st.none() | st.integers(0, 20),
})
SYSTEMS = [[], _ids(8 * PBS - 3, 11), _ids(5 * PBS, 12), _ids(3 * PBS + 2, 13)]


def _drive(engine, workload, tag, loras, aborts: bool):
    done, step, added = {}, 0, set()
    while step < 500:
        for i, r in enumerate(workload):
            rid = f"{tag}{i}"
            if r["arrive_at"] == step:
                ids = SYSTEMS[r["system"]] + _ids(r["own_len"], 100 + i)
                lora = None if r["adapter"] is None else loras[r["adapter"]]
                engine.add_request(rid, {"prompt_token_ids": ids}, SamplingParams(
                    temperature=0, max_tokens=r["max_tokens"], n=r["n"], ignore_eos=True), lora_request=lora)
                added.add(rid)
            if aborts and r["abort_at"] == step and rid in added:
                engine.abort_request(rid)
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = [(o.token_ids, o.finish_reason) for o in out.outputs]
        step += 1
        if len(added) == len(workload) and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    return done


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                            hypothesis.HealthCheck.too_slow])
@hypothesis.given(st.lists(request, min_size=2, max_size=9))
def test_caching_never_changes_greedy_outputs(pair, workload):
    ref, engine, loras = pair
    tag = f"w{next(_EXAMPLES)}-"
    want = _drive(ref, workload, tag, loras, aborts=False)
    got = _drive(engine, workload, tag, loras, aborts=True)
    assert got.keys() == want.keys()
    for rid, outs in got.items():
        for (tokens, reason), (full, _) in zip(outs, want[rid], strict=True):
            if reason == "abort":
                assert tokens == full[:len(tokens)], rid
            else:
                assert tokens == full, rid
    _check_consistent(engine)
    mgr = engine.lora_manager
    assert mgr.num_active == 0 and all(m.num_refs == 0 for m in mgr.adapters.values())


def test_the_property_workloads_hit_preempted_and_evicted(pair):
    """Runs after the property test on the same engine: its workloads did exercise the hard paths."""
    _, engine, _ = pair
    bm = engine.scheduler.block_manager
    assert engine.scheduler.num_preemptions > 0
    assert bm.num_hits > 0 and bm.num_evictions > 0
