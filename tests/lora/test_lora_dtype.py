"""EngineArgs.lora_dtype: adapters are stored (host buffers, device pool) in lora_dtype and applied to activations
in the model's dtype, multiplied in fp32 and added once in the model's dtype (as vLLM's lora_dtype).

fp32 model, bf16/fp16 adapters: the reference is PEFT on the same fp32 model with its adapter weights rounded to
lora_dtype. The adapters used have alpha / r = 2, a power of two, so the pool's rounded scale * B equals PEFT's
scale * rounded B exactly, and only fp32 summation order separates the two: first-step logprobs within 1e-5
(measured at most 7e-7) and the same greedy tokens. Against PEFT with the unrounded weights the adapter rows
differ by 6e-4 to 2e-3 (bf16) and 1e-5 to 2e-4 (fp16), so the test also shows that the weights were rounded.

bf16 model, fp32 adapters: the reference is PEFT on HF's bf16 model (PEFT keeps adapter weights in fp32 there).
The engine's bf16 base model already differs from HF's bf16 by up to 1.6e-2 in first-step logprobs on this model,
with no adapter at all (its kernels round bf16 activations at other places); the adapter rows differ by the same
(7e-3 to 1.6e-2 measured), so the tolerance is 5e-2; and the same rows differ from those of an engine whose
adapters are bf16 (while its base row does not), which that tolerance alone could not show.
"""
from __future__ import annotations

import pytest
import torch

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.engine.engine_core import _DTYPE_NAMES
from loraplex.errors import ConfigError
from loraplex.lora.request import LoRARequest

PROMPTS = ["Hello, my name is", "The capital of France", "abc", "once upon a time, there was"]
RANKS = [4, 32]  # conftest.ADAPTER_SPECS: alpha = 2 * r, no rsLoRA or alpha pattern
MAX_TOKENS = 12
TOP = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _jobs():
    names = [f"r{r}" for r in RANKS]
    return [(p, names[i % len(names)]) for i, p in enumerate(PROMPTS)] + [(PROMPTS[0], None)]


def _engine_run(model_dir, adapters, dtype, lora_dtype):
    """-> ([(token ids, {token: first-step logprob})], pool dtype)"""
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(model_dir), device="cpu", dtype=dtype,
                                                   lora_dtype=lora_dtype, enable_lora=True, max_loras=2,
                                                   max_lora_rank=32, max_model_len=128))
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP)
    jobs = _jobs()
    for i, (prompt, name) in enumerate(jobs):
        lora = LoRARequest(name, ids[name], adapters[name]) if name else None
        engine.add_request(str(i), prompt, params, lora_request=lora)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[int(out.request_id)] = out.outputs[0]
    results = [(finals[i].token_ids, {t: lp.logprob for t, lp in finals[i].logprobs[0].items()})
               for i in range(len(jobs))]
    return results, engine.lora_manager.pool.pool.dtype


def _peft_run(model_dir, adapters, dtype, round_to=None, generate=True):
    """-> [(greedy token ids or None, first-step logprobs over the vocabulary)] for _jobs()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                                      adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    with torch.no_grad():
        if round_to is not None:
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(p.to(round_to))
        results = []
        for prompt, name in _jobs():
            t = torch.tensor([tok(prompt).input_ids])
            route = [name or "__base__"]
            logprobs = model(t, adapter_names=route).logits[0, -1].float().log_softmax(-1)
            tokens = None
            if generate:
                gen = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=MAX_TOKENS,
                                     do_sample=False, adapter_names=route, pad_token_id=tok.pad_token_id)
                tokens = gen[0, t.shape[1]:].tolist()
            results.append((tokens, logprobs))
    return results


def _max_diff(engine_logprobs: dict, ref: torch.Tensor) -> float:
    return max(abs(lp - ref[t].item()) for t, lp in engine_logprobs.items())


@pytest.mark.parametrize("lora_dtype", ["bfloat16", "float16"])
def test_fp32_model_low_precision_adapters_match_rounded_peft(lora_dtype, tiny_llama, adapter_factory):
    adapters = {f"r{r}": str(adapter_factory("llama", r)) for r in RANKS}
    results, pool_dtype = _engine_run(tiny_llama, adapters, "float32", lora_dtype)
    assert pool_dtype == DTYPES[lora_dtype]
    rounded = _peft_run(tiny_llama, adapters, torch.float32, round_to=DTYPES[lora_dtype])
    unrounded = _peft_run(tiny_llama, adapters, torch.float32, generate=False)
    off_unrounded = []
    for i, ((tokens, logprobs), (ref_tokens, ref), (_, full), (_, name)) in enumerate(
            zip(results, rounded, unrounded, _jobs())):
        assert tokens == ref_tokens, f"job {i} ({name})"
        assert _max_diff(logprobs, ref) < 1e-5, f"job {i} ({name})"
        if name is not None:
            off_unrounded.append(_max_diff(logprobs, full))
    assert max(off_unrounded) > 1e-5, "the adapters were not rounded to lora_dtype"


def test_bf16_model_fp32_adapters_match_peft(tiny_llama, adapter_factory):
    adapters = {f"r{r}": str(adapter_factory("llama", r)) for r in RANKS}
    results, pool_dtype = _engine_run(tiny_llama, adapters, "bfloat16", "float32")
    assert pool_dtype == torch.float32
    reference = _peft_run(tiny_llama, adapters, torch.bfloat16, generate=False)
    for i, ((_, logprobs), (_, ref), (_, name)) in enumerate(zip(results, reference, _jobs())):
        assert _max_diff(logprobs, ref) < 5e-2, f"job {i} ({name})"
    bf16_adapters, _ = _engine_run(tiny_llama, adapters, "bfloat16", "auto")
    changed = [a[1] != b[1] for (a, b), (_, name) in zip(zip(results, bf16_adapters), _jobs()) if name]
    assert any(changed), "lora_dtype=float32 gave the same logprobs as bf16 adapters"
    assert results[-1] == bf16_adapters[-1], "the base row depends on lora_dtype"


@pytest.mark.parametrize("value", ["int8", "float64", "fp8", "", 16])
def test_invalid_lora_dtype_is_refused(value):
    with pytest.raises(ConfigError, match="EngineArgs.lora_dtype must be one of") as info:
        EngineArgs(model="m", lora_dtype=value)
    assert info.value.name == "lora_dtype"


@pytest.mark.parametrize("value", ["auto", "float32", "float16", "bfloat16", "half", "float", "fp32", "fp16", "bf16",
                                   "BF16", torch.float16, "torch.bfloat16"])
def test_every_accepted_lora_dtype_names_a_torch_dtype(value):
    name = EngineArgs(model="m", lora_dtype=value).lora_dtype
    assert name == "auto" or isinstance(_DTYPE_NAMES[name], torch.dtype)
