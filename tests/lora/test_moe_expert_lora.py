"""LoRA on MoE experts (issue #19), fp32 on the CPU.

- PEFT adapters with ``target_parameters`` on transformers 5's fused experts (gate_up_proj, down_proj), with and
  without attention modules, of different ranks: a mixed batch with base rows equals PEFT run per adapter (PEFT's
  expert wrappers take no mixed batches), Mixtral, Qwen2-MoE (shared expert, dense first layer) and Qwen3-MoE;
- transformers 4's per-expert adapters (Mixtral's block_sparse_moe.experts.E.w1 / w3 / w2, Qwen's
  mlp.experts.E.gate_proj ...), some experts only: equal HF on the base with each delta merged into its expert;
- misfits refused by name: expert keys on a dense model, on a dense layer, shapes of another model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.errors import LoRALoadError
from loraplex.lora.request import LoRARequest

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import make_peft_adapter  # noqa: E402

PROMPTS = ["Hello, my name is", "The capital of France", "abc", "1 2 3 4", "once upon a time", "zq"]
MAX_TOKENS = 12
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _greedy_hf(model, tok, prompt):
    t = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        gen = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return gen[0, t.shape[1]:].tolist()


def _ours(engine, jobs):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for i, (prompt, lora) in enumerate(jobs):
        engine.add_request(str(i), prompt, params, lora_request=lora)
        if i % 2:
            engine.step()  # staggered: prefills beside decodes
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = list(out.outputs[0].token_ids)
    return [done[i] for i in range(len(jobs))]


def _engine(path, max_rank=16):
    return LLMEngine.from_engine_args(EngineArgs(model=str(path), enable_lora=True, max_loras=2,
                                                 max_lora_rank=max_rank, max_model_len=128))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_target_parameters_adapters_match_peft(arch, tiny_model_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory(arch)
    adapters = {
        "attn_experts": make_peft_adapter(path, tmp_path / "a", rank=4, seed=3, scale=0.3, targets=["q_proj", "v_proj"],
                                          target_parameters=EXPERTS),
        "experts": make_peft_adapter(path, tmp_path / "b", rank=8, seed=4, scale=0.3, targets=[],
                                     target_parameters=EXPERTS),
    }
    names = [None, "attn_experts", "experts", "attn_experts", None, "experts"]
    tok = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                      str(adapters["attn_experts"]), adapter_name="attn_experts")
    model.load_adapter(str(adapters["experts"]), adapter_name="experts")
    model.eval()
    expected = []
    for prompt, name in zip(PROMPTS, names):
        if name is None:
            with model.disable_adapter():
                expected.append(_greedy_hf(model, tok, prompt))
        else:
            model.set_adapter(name)
            expected.append(_greedy_hf(model, tok, prompt))
    engine = _engine(path)
    ids = {n: i + 1 for i, n in enumerate(adapters)}
    ours = _ours(engine, [(p, LoRARequest(n, ids[n], str(adapters[n])) if n else None)
                          for p, n in zip(PROMPTS, names)])
    assert ours == expected
    base = _ours(engine, [(p, None) for p in PROMPTS[1:3]])
    assert ours[1:3] != base  # the expert weights change the output


def _per_expert_adapter(model_dir, out: Path, arch: str, rank: int, seed: int):
    """A transformers 4 style adapter on some experts of every sparse layer: (dir, {(layer, expert, kind): delta})."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    hidden = cfg.hidden_size
    inter = cfg.intermediate_size if arch == "mixtral" else cfg.moe_intermediate_size
    sparse = [i for i in range(cfg.num_hidden_layers) if i not in (getattr(cfg, "mlp_only_layers", None) or [])]
    names = {"gate": "w1", "up": "w3", "down": "w2"} if arch == "mixtral" else {
        "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    part = "block_sparse_moe" if arch == "mixtral" else "mlp"
    tensors, deltas, alpha = {}, {}, 2 * rank
    for layer in sparse:
        for expert in (0, 2):  # some experts only: the others keep their base weights
            for kind, module in names.items():
                if kind == "up" and expert == 2:
                    continue  # and some projections only
                fan_in, fan_out = (inter, hidden) if kind == "down" else (hidden, inter)
                a = torch.randn(rank, fan_in, generator=gen) * 0.3
                b = torch.randn(fan_out, rank, generator=gen) * 0.3
                key = f"base_model.model.model.layers.{layer}.{part}.experts.{expert}.{module}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
                deltas[layer, expert, kind] = b @ a * (alpha / rank)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(set(names.values()))}))
    return out, deltas, inter


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_per_expert_adapters_match_merged_hf(arch, tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory(arch)
    adapter, deltas, inter = _per_expert_adapter(path, tmp_path / "each", arch, rank=4, seed=7)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for (layer, expert, kind), delta in deltas.items():
            experts = merged.model.layers[layer].mlp.experts
            if kind == "down":
                experts.down_proj[expert] += delta
            else:
                lo = 0 if kind == "gate" else inter
                experts.gate_up_proj[expert, lo:lo + inter] += delta
    names = [None, "each", "each", None]
    expected = [_greedy_hf(merged if n else base, tok, p) for p, n in zip(PROMPTS, names)]
    ours = _ours(_engine(path), [(p, LoRARequest("each", 1, str(adapter)) if n else None)
                                 for p, n in zip(PROMPTS, names)])
    assert ours == expected
    assert expected[1] != _greedy_hf(base, tok, PROMPTS[1])


def test_expert_adapters_refused_where_they_do_not_fit(tiny_model_factory, tmp_path):
    moe = tiny_model_factory("qwen2_moe")
    llama = tiny_model_factory("llama")
    fused = make_peft_adapter(moe, tmp_path / "fused", rank=4, targets=[], target_parameters=EXPERTS)
    with pytest.raises(LoRALoadError, match="targets MoE experts; this model has none"):
        _engine(llama).add_lora(LoRARequest("x", 1, str(fused)))
    dense = tmp_path / "dense-layer"
    dense.mkdir()
    key = "base_model.model.model.layers.0.mlp.experts.0.gate_proj"  # layer 0 is dense (mlp_only_layers)
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 64), f"{key}.lora_B.weight": torch.zeros(40, 4)},
              str(dense / "adapter_model.safetensors"))
    (dense / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    engine = _engine(moe)
    with pytest.raises(LoRALoadError, match="layer 0 has no routed experts"):
        engine.add_lora(LoRARequest("dense", 2, str(dense)))
    mixtral = make_peft_adapter(tiny_model_factory("mixtral"), tmp_path / "mixtral", rank=4, targets=[],
                                target_parameters=EXPERTS)  # intermediate 112, not Qwen3-MoE's 40
    with pytest.raises(LoRALoadError, match="fit neither the experts' gate_up_proj"):
        _engine(tiny_model_factory("qwen3_moe")).add_lora(LoRARequest("other", 3, str(mixtral)))


@pytest.mark.gpu
def test_expert_lora_cuda_matches_peft(tiny_model_factory, tmp_path):
    """bf16 on CUDA with CUDA graphs on: steps with expert LoRA run eager, the others from graphs; each row
    against PEFT with its adapter alone."""
    from helpers import agree_up_to_near_ties
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory("mixtral")
    adapter = make_peft_adapter(path, tmp_path / "a", rank=8, seed=3, scale=0.3, targets=["q_proj", "v_proj"],
                                target_parameters=EXPERTS)
    tok = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda(),
                                      str(adapter)).eval()
    names = [None, "a", "a", None]
    ref = []
    for prompt, name in zip(PROMPTS, names):
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        ctx = model.disable_adapter() if name is None else torch.no_grad()
        with ctx, torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                                 output_scores=True)
        top2 = [s[0].float().topk(2).values for s in gen.scores]
        ref.append((gen.sequences[0, ids.shape[1]:].tolist(), [float(t[0] - t[1]) for t in top2]))
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="bfloat16", device="cuda",
                                                   enable_lora=True, max_loras=2, max_lora_rank=8,
                                                   max_model_len=128, enforce_eager=False))
    ours = _ours(engine, [(p, LoRARequest("a", 1, str(adapter)) if n else None)
                          for p, n in zip(PROMPTS[:4], names)])
    assert agree_up_to_near_ties(ours, ref) == len(names), list(zip(ours, ref))
