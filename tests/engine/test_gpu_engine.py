"""GPU suite: bf16 on CUDA, tokens matching HF/PEFT bf16 on tiny models, with and without CUDA graphs."""
from __future__ import annotations

import pytest
import torch
from helpers import agree_up_to_near_ties as _agree

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.lora.request import LoRARequest

pytestmark = pytest.mark.gpu

PROMPTS = ["Hello, my name is", "a", "The quick brown fox jumps over the lazy dog. " * 3, "1 2 3 4 5 6 7",
           "héllo wörld", "Once upon a time in a land far away there lived", "zz", "def f(n):\n    return n\n"]
MAX_TOKENS = 24


def _hf(model_dir, adapters=None, names=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    kwargs_per_row = [{}] * len(PROMPTS)
    if adapters:
        from peft import PeftModel

        first = next(iter(adapters))
        model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
        for n, p in adapters.items():
            if n != first:
                model.load_adapter(p, adapter_name=n)
        kwargs_per_row = [{"adapter_names": [n or "__base__"]} for n in names]
    outs = []
    for p, kw in zip(PROMPTS, kwargs_per_row):
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_scores=True, **kw)
        top2 = [s[0].float().topk(2).values for s in gen.scores]
        outs.append((gen.sequences[0, ids.shape[1]:].tolist(), [float(t[0] - t[1]) for t in top2]))
    return outs


def _run(engine, loras=None):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params, lora_request=loras[i] if loras else None)
        if i % 3 == 2:
            engine.step()  # staggered arrivals: prefills join running decodes
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    return [done[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("enforce_eager", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3", "phi3", "phi4mini", "mixtral", "qwen2_moe"])
def test_bf16_matches_hf(tiny_model_factory, arch, enforce_eager):
    path = tiny_model_factory(arch)
    ref = _hf(path)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="bfloat16", device="cuda",
                                                   max_model_len=256, max_num_seqs=8, enforce_eager=enforce_eager))
    ours = _run(engine)
    assert _agree(ours, ref) == len(PROMPTS), list(zip(ours, ref))


@pytest.mark.parametrize("enforce_eager", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_bf16_lora_matches_peft(tiny_model_factory, tmp_path, arch, enforce_eager):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    path = tiny_model_factory(arch)
    some = ["qkv_proj", "down_proj"] if arch.startswith("phi") else ["q_proj", "v_proj", "down_proj"]
    adapters = {f"r{r}": str(make_peft_adapter(path, tmp_path / f"r{r}", rank=r, seed=r,
                                               targets="all-linear" if r == 16 else some))
                for r in (4, 8, 16)}
    names = [None, "r4", "r8", "r16", None, "r16", "r4", "r8"]
    ref = _hf(path, adapters, names)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="bfloat16", device="cuda",
                                                   max_model_len=256, max_num_seqs=8, enforce_eager=enforce_eager,
                                                   enable_lora=True, max_loras=3, max_lora_rank=16))
    ids = {n: i + 1 for i, n in enumerate(adapters)}
    ours = _run(engine, [LoRARequest(n, ids[n], adapters[n]) if n else None for n in names])
    assert _agree(ours, ref) == len(PROMPTS), list(zip(ours, ref))


def test_1024_adapters_equal_each_alone(tiny_model_factory, tmp_path):
    """1024 distinct adapters on disk through a pool of 96, max_loras 32, CUDA graphs and async scheduling,
    with base requests mixed in: every output equals its request run alone (fp32, so that batch shapes cannot
    flip a near-tie)."""
    import json
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    path = tiny_model_factory("llama")
    src = make_peft_adapter(path, tmp_path / "src", rank=8, targets="all-linear", seed=5, scale=0.15)
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    loras = []
    for i in range(1024):
        d = tmp_path / f"a{i}"
        d.mkdir()
        save_file({k: v * (0.5 + torch.rand(v.shape, generator=gen)) for k, v in tensors.items()},
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(config))
        loras.append(LoRARequest(f"a{i}", i + 1, str(d)))
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(path), dtype="float32", device="cuda", max_model_len=256, max_num_seqs=64, enable_lora=True,
        max_loras=32, max_lora_rank=8, max_gpu_loras=96, max_cpu_loras=256))
    assert engine.runner.graph_runner is not None and engine.is_async_scheduling
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    jobs = [(PROMPTS[i % len(PROMPTS)], loras[i] if i < 1024 else None) for i in range(1024 + 64)]
    for i, (p, lora) in enumerate(jobs):
        engine.add_request(str(i), p, params, lora_request=lora)
    done, max_distinct = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        max_distinct = max(max_distinct, len({s.lora_name for s in engine.scheduler.running if s.lora_name}))
    assert max_distinct <= 32
    stats = engine.lora_manager.stats
    assert stats["num_loads"] >= 1024 and stats["num_evictions"] > 0
    for i, (p, lora) in enumerate(jobs):
        engine.add_request(f"alone-{i}", p, params, lora_request=lora)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    assert out.outputs[0].token_ids == done[i], (i, lora and lora.lora_name)
