"""Greedy tokens identical to HF transformers generate (same weights, fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from loraplex import EngineArgs, LLMEngine, SamplingParams

PROMPTS = [
    "Hello, my name is",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "1 2 3 4 5 6 7",
    "héllo wörld — ünïcode 日本語",
    "Once upon a time in a land far away there lived",
    "zz",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]
MAX_TOKENS = 24


def hf_greedy(model_dir, prompts, max_tokens=MAX_TOKENS):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


def run_staggered(engine: LLMEngine, prompts, params, arrivals):
    """Submit prompt i at step arrivals[i]; return token ids per prompt."""
    results, step, pending = {}, 0, list(range(len(prompts)))
    while pending or engine.has_unfinished_requests():
        for i in [i for i in pending if arrivals[i] <= step]:
            engine.add_request(str(i), prompts[i], params)
            pending.remove(i)
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out
        step += 1
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3", "granite", "gemma2", "gemma3",
                                  "phi3", "phi4mini", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_greedy_matches_hf(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    expected = hf_greedy(path, PROMPTS)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=256, max_num_seqs=8))
    outs = run_staggered(engine, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                         arrivals=[0, 0, 1, 3, 3, 5, 8, 13])
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == expected[i], f"prompt {i}"
        assert out.outputs[0].finish_reason in ("stop", "length")


def test_preemption_gives_same_outputs(tiny_llama):
    expected = hf_greedy(tiny_llama, PROMPTS)
    # 24 usable blocks of 8 tokens: about half of what 8 sequences need, so the scheduler must preempt.
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=192, block_size=8,
                                                   num_gpu_blocks_override=25, max_num_seqs=8))
    outs = run_staggered(engine, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), [0] * 8)
    assert engine.scheduler.num_preemptions > 0
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == expected[i], f"prompt {i}"
