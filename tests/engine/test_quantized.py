"""Quantized bases against HF transformers running the same quantized weights, on the CPU in fp32 (issue #19).

bitsandbytes 4-bit (NF4 / FP4, the QLoRA setting):

- a checkpoint saved by transformers with BitsAndBytesConfig (double quantization on) loads, its packed
  linears stay 4-bit, and greedy tokens equal HF's on that quantized model, Llama and Phi-3 (fused qkv);
- QLoRA: PEFT adapters on that 4-bit base, several in one batch with base rows, equal PEFT on HF's 4-bit model;
- FP4 checkpoints likewise (Llama);
- a float checkpoint with quantization="bitsandbytes" is quantized as it loads, to exactly the codes HF's
  in-flight NF4 gives (double quantization off);
- 8-bit, MoE and multi-modal 4-bit bases, and other quantization values are refused by name.

FP8 in compressed-tensors' format (the test checkpoints written by compressed-tensors itself), HF running it
through compressed-tensors' own forward (each
activation quantized as the scheme says, then the dequantized product):
- per-channel weights with per-token dynamic activations, per-tensor weights with static activations, and
  weight-only: greedy tokens equal, Llama and Phi-3 (fused qkv); with PEFT adapters in a mixed batch too;
- a float checkpoint with quantization="fp8": the same FP8 weights and scales as compressed-tensors writes for
  FP8_DYNAMIC with min-max scales, and its tokens.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from loraplex import EngineArgs, LLMEngine, SamplingParams  # noqa: E402
from loraplex.errors import ConfigError, UnsupportedModelError  # noqa: E402
from loraplex.layers.linear import Linear  # noqa: E402
from loraplex.lora.request import LoRARequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import make_fp8_checkpoint, make_peft_adapter, make_tiny_model  # noqa: E402

PROMPTS = ["Hello, my name is", "The capital of France", "abc", "1 2 3 4", "once upon a time", "zq"]
MAX_TOKENS = 12


def _bnb_config(quant_type="nf4", double_quant=True):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=double_quant)


def _hf_4bit(model_dir, **bnb):
    import bitsandbytes as bnb_lib
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=_bnb_config(**bnb),
                                                 device_map="cpu", dtype=torch.float32).eval()
    # On a CPU with AVX512-BF16, bitsandbytes repacks the codes for a bf16 kernel (8e-3 off the fp32 product
    # here); its generic path is the fp32 product of the dequantized weight, as on the GPU and as ours.
    for module in model.modules():
        if isinstance(module, bnb_lib.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def float_models(tmp_path_factory):
    # bitsandbytes' CPU kernels take output sizes in multiples of 32: an MLP of 128, not the usual tiny 112.
    return {arch: make_tiny_model(tmp_path_factory.mktemp(f"q-{arch}"), arch, intermediate_size=128)
            for arch in ("llama", "phi3")}


@pytest.fixture(scope="module")
def nf4_models(float_models, tmp_path_factory):
    out = {}
    for arch, quant_type in (("llama", "nf4"), ("phi3", "nf4"), ("llama", "fp4")):
        path = float_models[arch]
        out[arch, quant_type] = dst = tmp_path_factory.mktemp(f"{quant_type}-{arch}")
        _hf_4bit(path, quant_type=quant_type).save_pretrained(dst)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (path / f).exists():
                (dst / f).write_bytes((path / f).read_bytes())
    return out


def _hf_greedy(model, tok, prompts, adapter_names=None):
    outs = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            t = torch.tensor([tok(prompt).input_ids])
            extra = {} if adapter_names is None else {"adapter_names": [adapter_names[i]]}
            gen = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **extra)
            outs.append(gen[0, t.shape[1]:].tolist())
    return outs


def _ours(engine, prompts, loras=None):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)  # stops at EOS, as HF generate
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params, lora_request=(loras or {}).get(i))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = list(out.outputs[0].token_ids)
    return [done[i] for i in range(len(prompts))]


def _linears(engine):
    return [m for m in engine.model.modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("arch, quant_type", [("llama", "nf4"), ("phi3", "nf4"), ("llama", "fp4")])
def test_prequantized_checkpoint_matches_hf(arch, quant_type, nf4_models):
    from transformers import AutoTokenizer

    path = nf4_models[arch, quant_type]
    tok = AutoTokenizer.from_pretrained(path)
    expected = _hf_greedy(_hf_4bit(path), tok, PROMPTS)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=128))
    linears = _linears(engine)
    assert linears and all(m.weight is None and m.qcodes.dtype == torch.uint8 for m in linears)
    assert all(m.qcodes.numel() * 2 == m.out_features * m.in_features for m in linears)
    assert _ours(engine, PROMPTS) == expected


def test_qlora_mixed_batch_matches_peft(nf4_models, float_models, tmp_path):
    """Adapters trained for the float base, served on its 4-bit checkpoint: PEFT's QLoRA layers as the oracle."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = nf4_models["llama", "nf4"]
    adapters = {f"r{r}": make_peft_adapter(float_models["llama"], tmp_path / f"r{r}", rank=r, seed=r,
                                           targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
                                           scale=0.1) for r in (4, 8)}
    names = [None, "r4", "r8", "r4", None, "r8"]
    tok = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(_hf_4bit(path), str(adapters["r4"]), adapter_name="r4")
    model.load_adapter(str(adapters["r8"]), adapter_name="r8")
    model.eval()
    expected = _hf_greedy(model, tok, PROMPTS, [n or "__base__" for n in names])
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=128, enable_lora=True,
                                                   max_loras=2, max_lora_rank=8))
    loras = {i: LoRARequest(n, int(n[1:]), str(adapters[n])) for i, n in enumerate(names) if n}
    ours = _ours(engine, PROMPTS, loras)
    assert ours == expected
    base_only = _ours(engine, [PROMPTS[1]])
    assert ours[1] != base_only[0]  # the adapters change the output


def test_inflight_quantization_equals_hf(float_models):
    from transformers import AutoTokenizer

    path = float_models["llama"]
    hf = _hf_4bit(path, double_quant=False)
    ref = {n: m.weight.data.clone() for n, m in hf.named_modules() if n.endswith("_proj")}  # before HF's CPU repack
    tok = AutoTokenizer.from_pretrained(path)
    expected = _hf_greedy(hf, tok, PROMPTS)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=128, quantization="bitsandbytes"))
    qkv = engine.model.layers[0].self_attn.qkv_proj
    codes = torch.cat([ref[f"model.layers.0.self_attn.{p}_proj"].reshape(-1) for p in "qkv"])
    assert torch.equal(qkv.qcodes, codes)  # the same 4-bit codes, slice by slice
    assert _ours(engine, PROMPTS) == expected


@pytest.fixture(scope="module")
def fp8_models(float_models, tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    return {(arch, scheme): make_fp8_checkpoint(float_models[arch], tmp_path_factory.mktemp(f"{scheme}-{arch}"),
                                                scheme, calibration=PROMPTS)
            for arch, scheme in (("llama", "FP8_DYNAMIC"), ("llama", "FP8"), ("llama", "FP8_W"),
                                 ("phi3", "FP8_DYNAMIC"))}


def _hf_fp8(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch, scheme", [("llama", "FP8_DYNAMIC"), ("llama", "FP8"), ("llama", "FP8_W"),
                                          ("phi3", "FP8_DYNAMIC")])
def test_fp8_checkpoint_matches_hf(arch, scheme, fp8_models):
    from transformers import AutoTokenizer

    path = fp8_models[arch, scheme]
    expected = _hf_greedy(_hf_fp8(path), AutoTokenizer.from_pretrained(path), PROMPTS)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=128))
    linears = _linears(engine)
    assert linears and all(m.weight is None and m.qweight.dtype == torch.float8_e4m3fn for m in linears)
    assert _ours(engine, PROMPTS) == expected


def test_fp8_lora_mixed_batch_matches_peft(fp8_models, float_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = fp8_models["llama", "FP8_DYNAMIC"]
    adapters = {f"r{r}": make_peft_adapter(float_models["llama"], tmp_path / f"r{r}", rank=r, seed=r,
                                           targets="all-linear", scale=0.1) for r in (4, 8)}
    names = [None, "r4", "r8", "r4", None, "r8"]
    model = PeftModel.from_pretrained(_hf_fp8(path), str(adapters["r4"]), adapter_name="r4")
    model.load_adapter(str(adapters["r8"]), adapter_name="r8")
    expected = _hf_greedy(model.eval(), AutoTokenizer.from_pretrained(path), PROMPTS,
                          [n or "__base__" for n in names])
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=128, enable_lora=True,
                                                   max_loras=2, max_lora_rank=8))
    loras = {i: LoRARequest(n, int(n[1:]), str(adapters[n])) for i, n in enumerate(names) if n}
    assert _ours(engine, PROMPTS, loras) == expected


def test_inflight_fp8_equals_compressed_tensors(fp8_models, float_models):
    from transformers import AutoTokenizer

    ref_path = fp8_models["llama", "FP8_DYNAMIC"]
    expected = _hf_greedy(_hf_fp8(ref_path), AutoTokenizer.from_pretrained(ref_path), PROMPTS)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(float_models["llama"]), max_model_len=128,
                                                   quantization="fp8"))
    from safetensors import safe_open

    with safe_open(str(ref_path / "model.safetensors"), "pt") as f:
        down = engine.model.layers[1].mlp.down_proj
        ref_w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        ref_s = f.get_tensor("model.layers.1.mlp.down_proj.weight_scale")
    assert torch.equal(down.qweight.view(torch.uint8), ref_w.view(torch.uint8))
    assert torch.equal(down.qscale, ref_s.float().reshape(-1))
    assert _ours(engine, PROMPTS) == expected


def test_refusals(tiny_model_factory, float_models):
    with pytest.raises(ConfigError, match="quantization"):
        EngineArgs(model=str(float_models["llama"]), quantization="awq")
    with pytest.raises(UnsupportedModelError, match="bitsandbytes base of MixtralForCausalLM"):
        LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_factory("mixtral")), quantization="bitsandbytes"))
    with pytest.raises(ConfigError, match="needs a compressed-tensors checkpoint"):
        LLMEngine.from_engine_args(EngineArgs(model=str(float_models["llama"]), quantization="compressed-tensors"))


def _cuda_peft_reference(hf, path, float_models, tmp_path):
    """(adapters, row adapter names, [(HF tokens, top-1 minus top-2 logit per step)]) of two PEFT adapters on the
    HF model ``hf`` (on CUDA), each row under its own adapter or none."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapters = {f"r{r}": make_peft_adapter(float_models["llama"], tmp_path / f"r{r}", rank=r, seed=r,
                                           targets="all-linear", scale=0.1) for r in (4, 8)}
    names = [None, "r4", "r8", "r4", None, "r8"]
    tok = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(hf, str(adapters["r4"]), adapter_name="r4")
    model.load_adapter(str(adapters["r8"]), adapter_name="r8")
    ref = []
    for prompt, name in zip(PROMPTS, names):
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_scores=True,
                             adapter_names=[name or "__base__"])
        top2 = [s[0].float().topk(2).values for s in gen.scores]
        ref.append((gen.sequences[0, ids.shape[1]:].tolist(), [float(t[0] - t[1]) for t in top2]))
    return adapters, names, ref


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_nf4_cuda_matches_hf_with_qlora(enforce_eager, nf4_models, float_models, tmp_path):
    """bf16 on CUDA: HF's bitsandbytes model with PEFT adapters against ours, with and without CUDA graphs."""
    from helpers import agree_up_to_near_ties
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = nf4_models["llama", "nf4"]
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16,
                                              device_map="cuda")
    adapters, names, ref = _cuda_peft_reference(hf, path, float_models, tmp_path)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="bfloat16", device="cuda",
                                                   max_model_len=128, enable_lora=True, max_loras=2,
                                                   max_lora_rank=8, enforce_eager=enforce_eager))
    assert all(m.weight is None for m in _linears(engine))
    loras = {i: LoRARequest(n, int(n[1:]), str(adapters[n])) for i, n in enumerate(names) if n}
    ours = _ours(engine, PROMPTS, loras)
    assert agree_up_to_near_ties(ours, ref) == len(PROMPTS), list(zip(ours, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_fp8_cuda_matches_hf(enforce_eager, fp8_models, float_models, tmp_path):
    """bf16 on CUDA, FP8 matmuls (torch._scaled_mm, row-wise scales) against compressed-tensors' forward in HF,
    with adapters, with and without CUDA graphs."""
    from helpers import agree_up_to_near_ties
    from transformers import AutoModelForCausalLM

    path = fp8_models["llama", "FP8_DYNAMIC"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    adapters, names, ref = _cuda_peft_reference(hf, path, float_models, tmp_path)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="bfloat16", device="cuda",
                                                   max_model_len=128, enable_lora=True, max_loras=2,
                                                   max_lora_rank=8, enforce_eager=enforce_eager))
    layer = engine.model.layers[0].self_attn.qkv_proj
    assert layer.quant._is_scaled_mm.get((layer.qweight.device, torch.bfloat16)) in (None, True)
    loras = {i: LoRARequest(n, int(n[1:]), str(adapters[n])) for i, n in enumerate(names) if n}
    ours = _ours(engine, PROMPTS, loras)
    assert layer.quant._is_scaled_mm[(layer.qweight.device, torch.bfloat16)]  # the FP8 tensor-core path ran
    assert agree_up_to_near_ties(ours, ref) == len(PROMPTS), list(zip(ours, ref))
