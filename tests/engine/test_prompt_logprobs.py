"""prompt_logprobs: vLLM's semantics, checked against HF transformers (and PEFT for adapters) on the same weights.

One entry per prompt token: None for the first, then {token_id: Logprob} with the prompt token itself and the
top-k of the logits at the position before it, ranks counted over the whole vocabulary (fp32, CPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.errors import InvalidRequestError
from loraplex.lora.request import LoRARequest
from loraplex.outputs import Logprob

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import make_peft_adapter  # noqa: E402

PROMPTS = ["Hello, my name is", "The quick brown fox", "1 2 3 4 5", "héllo — 日本"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("plp-adapter") / "a", rank=8,
                             targets=("q_proj", "v_proj", "down_proj"), seed=3, scale=0.2)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), max_model_len=128, max_num_seqs=8, seed=0, enable_lora=True, max_loras=2,
               max_lora_rank=8)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is log_softmax of the logits that predict token p + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check(prompt_logprobs, ids: list[int], ref: torch.Tensor, k: int, tokenizer) -> None:
    assert isinstance(prompt_logprobs, list) and len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        entry, row, tid = prompt_logprobs[p], ref[p - 1], ids[p]
        assert all(isinstance(lp, Logprob) for lp in entry.values())
        assert next(iter(entry)) == tid  # vLLM's order: the prompt token first
        assert entry[tid].logprob == pytest.approx(row[tid].item(), abs=ATOL), p
        assert entry[tid].rank == int((row > row[tid]).sum()) + 1
        top = row.topk(k).indices.tolist() if k else []
        assert set(entry) == set(top) | {tid}
        for r, t in enumerate(top, 1):
            assert entry[t].logprob == pytest.approx(row[t].item(), abs=ATOL)
            if t != tid:
                assert entry[t].rank == r
        for t, lp in entry.items():
            assert lp.decoded_token == tokenizer.decode([t])


def test_matches_hf_in_a_mixed_batch(llm, hf):
    tok = llm.get_tokenizer()
    # A mixed batch: prompt logprobs of several k (one with n=2, one with sample logprobs too), and requests that
    # ask for none, so only some rows of the step need all-position logits.
    params = [SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3),
              SamplingParams(temperature=0, max_tokens=4),
              SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=4, prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=5, logprobs=2)]
    model = llm.llm_engine.model
    rows: list[int] = []
    real = model.compute_logits

    def recording(hidden):
        rows.append(hidden.shape[0])
        return real(hidden)

    model.compute_logits = recording
    try:
        outs = llm.generate(PROMPTS, params)
    finally:
        del model.compute_logits
    assert outs[1].prompt_logprobs is None
    # All-position logits only for the requests that asked, once per request (not per sample of n=2), beside
    # the usual last-position row per sequence.
    asked = sum(len(o.prompt_token_ids) - 1 for o, p in zip(outs, params) if p.prompt_logprobs is not None)
    assert rows[:2] == [asked, 5] and all(r <= 5 for r in rows[2:])  # the prefill step, then decode steps
    for out, p in zip(outs, params):
        if p.prompt_logprobs is not None:
            check(out.prompt_logprobs, out.prompt_token_ids, reference_logprobs(hf, out.prompt_token_ids),
                  p.prompt_logprobs, tok)
    # The sampled tokens are unaffected: the same as when the batch asks for no prompt logprobs.
    plain_params = [p.clone() for p in params]
    for p in plain_params:
        p.prompt_logprobs = None
    plain = llm.generate(PROMPTS, plain_params)
    for a, b in zip(outs, plain):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    sample = outs[3].outputs[0].logprobs
    assert sample is not None and len(sample) == len(outs[3].outputs[0].token_ids)


def test_one_token_prompt_and_token_ids(llm, hf):
    out = llm.generate([{"prompt_token_ids": [65]}], SamplingParams(max_tokens=2, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]
    ids = [256, 40, 41, 42, 43, 44, 45]
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=2, prompt_logprobs=1))[0]
    check(out.prompt_logprobs, ids, reference_logprobs(hf, ids), 1, llm.get_tokenizer())


def test_with_adapter_matches_peft(llm, tiny_llama, adapter, hf):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                     str(adapter)).eval()
    lora = LoRARequest("plp", 1, str(adapter))
    loras = [lora, None, lora, None]
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2), lora_request=loras)
    tok = llm.get_tokenizer()
    for out, req in zip(outs, loras):
        ids = out.prompt_token_ids
        ref = reference_logprobs(peft if req is not None else hf, ids)
        check(out.prompt_logprobs, ids, ref, 2, tok)
    # The adapter really changes them.
    assert outs[0].prompt_logprobs[2][outs[0].prompt_token_ids[2]].logprob != pytest.approx(
        reference_logprobs(hf, outs[0].prompt_token_ids)[1, outs[0].prompt_token_ids[2]].item(), abs=1e-3)


def test_computed_once_despite_preemption_and_n(tiny_llama, hf):
    from loraplex import EngineArgs, LLMEngine

    # 12 usable blocks of 8 tokens for 4 requests x n=2 that each grow to ~40 tokens: the scheduler must preempt,
    # and a preempted sequence is prefilled again (prompt and generated tokens).
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=64, block_size=8,
                                                   num_gpu_blocks_override=13, max_num_seqs=8, seed=0))
    calls: dict[str, int] = {}
    real = engine.outputs.set_prompt_logprobs

    def counting(seq, raw):
        calls[seq.request_id] = calls.get(seq.request_id, 0) + 1
        real(seq, raw)

    engine.outputs.set_prompt_logprobs = counting
    prompts = [p * 2 for p in PROMPTS]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, n=2, max_tokens=24, ignore_eos=True,
                                                      prompt_logprobs=2))
    first: dict[str, list] = {}
    seen: dict[str, object] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.prompt_logprobs is not None  # from the request's first output on
            assert first.setdefault(out.request_id, out.prompt_logprobs) == out.prompt_logprobs
            if out.finished:
                seen[out.request_id] = out
    assert engine.scheduler.num_preemptions > 0
    assert calls == {str(i): 1 for i in range(len(prompts))}
    for i in range(len(prompts)):
        out = seen[str(i)]
        check(out.prompt_logprobs, out.prompt_token_ids, reference_logprobs(hf, out.prompt_token_ids), 2,
              engine.tokenizer)


def test_bounds(llm):
    with pytest.raises(InvalidRequestError, match="Requested prompt logprobs of 21, which is greater than max "
                                                  "allowed: 20"):
        llm.generate("hi", SamplingParams(prompt_logprobs=21))
    with pytest.raises(InvalidRequestError, match="Requested sample logprobs of 21"):
        llm.generate("hi", SamplingParams(logprobs=21))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-2)
