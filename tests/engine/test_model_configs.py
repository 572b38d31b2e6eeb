"""Model configs loraplex refuses at start, by name, and the limits it derives (issue #19).

- quantized checkpoints (bitsandbytes 8-bit, FP8, compressed-tensors, GPTQ, AWQ, unknown methods) fail before
  any weight is read, naming the method (bitsandbytes 4-bit loads: tests/engine/test_quantized.py);
- LongRoPE (Phi-4-mini): max_model_len defaults to the pre-training length and a longer one is refused;
- Phi-3's fused modules: its PEFT adapters load, and one targeting qkv_proj on a Llama is refused naming it;
- MoE: an MLP module in a layer that has none, or the shared expert's gate, is refused naming it.
"""
from __future__ import annotations

import json
import shutil

import pytest

from loraplex import LLM, EngineArgs, LLMEngine
from loraplex.errors import ConfigError, LoRALoadError, UnsupportedModelError
from loraplex.lora.request import LoRARequest


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("quant, named", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "format": "pack-quantized", "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}}},
     "compressed-tensors"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "awq", "bits": 4}, "awq"),
    ({"quant_method": "hqq"}, "hqq"),
])
def test_quantized_checkpoints_refused_by_method(tiny_llama, tmp_path, quant, named):
    path = _with_config(tiny_llama, tmp_path / "q", quantization_config=quant)
    with pytest.raises(UnsupportedModelError, match=f"quant_method '{named}'"):
        LLMEngine.from_engine_args(EngineArgs(model=str(path)))


def test_longrope_bounds_max_model_len(tiny_model_factory):
    path = tiny_model_factory("phi4mini")  # max_position_embeddings 512, pre-training length 256
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path)))
    assert engine.max_model_len == 256
    with pytest.raises(ConfigError, match="LongRoPE"):
        LLMEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=300))


def test_fused_module_adapter_on_a_model_without_it(tiny_llama, tiny_model_factory, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    phi = tiny_model_factory("phi3")
    adapter = make_peft_adapter(phi, tmp_path / "phi-lora", rank=4, targets=["qkv_proj", "gate_up_proj"])
    llm = LLM(str(tiny_llama), enable_lora=True, max_lora_rank=8, max_model_len=128)
    with pytest.raises(LoRALoadError, match=r"target module .(qkv_proj|gate_up_proj). does not exist"):
        llm.llm_engine.add_lora(LoRARequest("phi", 1, str(adapter)))


def test_moe_mlp_adapters_refused_where_the_layer_lacks_them(tiny_model_factory, tmp_path):
    """MoE models take LoRA on attention, the routed experts (tests/lora/test_moe_expert_lora.py), a dense layer's
    MLP and Qwen2-MoE's shared expert (tests/lora/test_peft_parity.py); an MLP module in a layer that has no such
    module, and the shared expert's 1-wide gate, are refused by name when the adapter loads."""
    import torch
    from safetensors.torch import save_file

    def adapter(name: str, module: str, a_shape, b_shape):
        d = tmp_path / name
        d.mkdir()
        key = f"base_model.model.model.layers.1.mlp.{module}"
        save_file({f"{key}.lora_A.weight": torch.zeros(a_shape), f"{key}.lora_B.weight": torch.zeros(b_shape)},
                  str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
        return str(d)

    qwen2 = LLM(str(tiny_model_factory("qwen2_moe")), enable_lora=True, max_lora_rank=8, max_model_len=128)
    with pytest.raises(LoRALoadError, match="layer 1 has no gate_proj"):  # layer 1 is sparse: experts, no MLP
        qwen2.llm_engine.add_lora(LoRARequest("dense", 1, adapter("dense", "gate_proj", (4, 64), (112, 4))))
    with pytest.raises(LoRALoadError, match="shared_expert_gate"):
        qwen2.llm_engine.add_lora(LoRARequest("gate", 2, adapter("gate", "shared_expert_gate", (4, 64), (1, 4))))
    qwen3 = LLM(str(tiny_model_factory("qwen3_moe")), enable_lora=True, max_lora_rank=8, max_model_len=128)
    with pytest.raises(LoRALoadError, match="layer 1 has no shared_expert.gate_proj"):
        qwen3.llm_engine.add_lora(LoRARequest("shared", 3, adapter("shared", "shared_expert.gate_proj", (4, 64),
                                                                   (56, 4))))
