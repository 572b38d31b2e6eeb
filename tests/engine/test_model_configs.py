"""Model configs loraplex refuses at start, by name, and the limits it derives (issue #19).

- quantized checkpoints (bitsandbytes 8-bit, FP8, compressed-tensors, GPTQ, AWQ, unknown methods) fail before
  any weight is read, naming the method (bitsandbytes 4-bit loads: tests/engine/test_quantized.py);
- LongRoPE (Phi-4-mini): max_model_len defaults to the pre-training length and a longer one is refused;
- Phi-3's fused modules: its PEFT adapters load, and one targeting qkv_proj on a Llama is refused naming it;
- MoE: an adapter on an MLP (dense layer, shared expert) is refused naming the module.
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


def test_moe_mlp_adapters_refused(tiny_model_factory, tmp_path):
    """MoE models take LoRA on attention and on the routed experts (tests/lora/test_moe_expert_lora.py): an
    adapter on an MLP (a dense layer's, or Qwen2-MoE's shared expert) is refused by name when it loads."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    path = tiny_model_factory("qwen2_moe")
    mlp = make_peft_adapter(path, tmp_path / "mlp", rank=4, targets=["gate_proj"])
    llm = LLM(str(path), enable_lora=True, max_lora_rank=8, max_model_len=128)
    with pytest.raises(LoRALoadError, match="gate_proj"):
        llm.llm_engine.add_lora(LoRARequest("mlp", 1, str(mlp)))
