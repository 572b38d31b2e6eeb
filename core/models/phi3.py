"""Phi-3 / Phi-4-mini: Llama's blocks, with q/k/v and gate/up fused in the checkpoint (``qkv_proj``,
``gate_up_proj``) and partial rotary (Phi-4-mini rotates 3/4 of each head; ModelConfig.rotary_dim).

The packed layers are Llama's already; only the module names differ. PEFT adapters of Phi target the fused
modules: one A for all slices and one B over their outputs, which the adapter planner splits by slice
(loraplex.lora.plan), so the LoRA kernels see the same three (two) slices as for Llama.
"""
from __future__ import annotations

from loraplex.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    LORA_MODULES = {"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
                    "gate_up_proj": "mlp.gate_up_proj", "down_proj": "mlp.down_proj"}
