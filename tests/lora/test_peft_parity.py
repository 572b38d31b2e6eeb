"""Mixed base + multi-adapter batches give PEFT's greedy tokens and logprobs (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.lora.request import LoRARequest

PROMPTS = ["Hello, my name is", "The capital of France", "abc", "1 2 3 4", "once upon a time, there was",
           "zq", "The quick brown fox jumps over the lazy dog", "hi"]
RANKS = [4, 8, 16, 32]
MAX_TOKENS = 16
TOP = 5


def peft_reference(model_dir, adapters: dict[str, str], jobs, per_adapter: bool = False):
    """jobs: [(prompt, adapter name or None)] -> [(token ids, [first-step top logprobs])]. per_adapter: switch
    PEFT's active adapter per row instead of ``adapter_names`` (Qwen2-MoE runs its shared expert on the flattened
    tokens, which PEFT's adapter_names cannot route)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    results = []
    # One mixed batch for the first forward: PEFT's adapter_names routes each row to its adapter.
    batch = [tok(p).input_ids for p, _ in jobs]
    row_names = [a if a is not None else "__base__" for _, a in jobs]
    with torch.no_grad():
        for ids, name in zip(batch, row_names):
            t = torch.tensor([ids])
            kwargs = {"adapter_names": [name]}
            if per_adapter:
                kwargs = {}
                if name == "__base__":
                    model.base_model.disable_adapter_layers()
                else:
                    model.base_model.enable_adapter_layers()
                    model.set_adapter(name)
            logits = model(t, **kwargs).logits[0, -1].float()
            gen = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kwargs)
            results.append((gen[0, t.shape[1]:].tolist(), logits.log_softmax(-1)))
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen2", "granite", "gemma2", "gemma3", "phi3", "phi4mini",
                                  "mixtral", "qwen2_moe", "qwen3_moe"])
def test_mixed_batch_matches_peft(arch, tiny_model_factory, adapter_factory):
    model_dir = tiny_model_factory(arch)
    adapters = {f"r{r}": str(adapter_factory(arch, r)) for r in RANKS}
    names = [None, "r4", "r8", "r16", "r32", None, "r16", "r4"]
    jobs = list(zip(PROMPTS, names))
    expected = peft_reference(model_dir, adapters, jobs, per_adapter=arch == "qwen2_moe")
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(model_dir), enable_lora=True, max_loras=4,
                                                   max_lora_rank=32, max_cpu_loras=4, max_model_len=128))
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP)
    arrivals = [0, 0, 1, 1, 2, 4, 4, 7]
    results, step, pending = {}, 0, list(range(len(jobs)))
    while pending or engine.has_unfinished_requests():
        for i in [i for i in pending if arrivals[i] <= step]:
            name = names[i]
            lora = LoRARequest(name, ids[name], adapters[name]) if name else None
            engine.add_request(str(i), PROMPTS[i], params, lora_request=lora)
            pending.remove(i)
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0]
        step += 1
    for i, (tokens, ref_logprobs) in enumerate(expected):
        out = results[i]
        assert out.token_ids == tokens, f"prompt {i} adapter {names[i]}"
        first = out.logprobs[0]
        for token_id, lp in first.items():
            assert abs(lp.logprob - ref_logprobs[token_id].item()) < 1e-4, (i, token_id)


def test_adapter_changes_output(tiny_llama, adapter_factory):
    from loraplex import LLM

    llm = LLM(model=str(tiny_llama), enable_lora=True, max_lora_rank=32, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=12)
    base = llm.generate(PROMPTS[:3], params)
    lora = llm.generate(PROMPTS[:3], params, lora_request=LoRARequest("r32", 1, str(adapter_factory("llama", 32))))
    assert [o.outputs[0].token_ids for o in base] != [o.outputs[0].token_ids for o in lora]
