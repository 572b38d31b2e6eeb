"""Gemma 2 and Gemma 3 (text) decoders over a flat token batch and paged KV cache.

Llama's face (LORA_MODULES, lora_layer, the packed q/k/v and gate/up linears, so LoRA applies unchanged), its own
blocks: four Gemma norms per layer (x * (1 + w), in fp32), a GeLU-tanh MLP, embeddings scaled by sqrt(hidden),
query_pre_attn_scalar as the attention scale, sliding-window and full layers (ModelConfig.layer_types), soft caps
on the attention scores (Gemma 2) and the final logits, q/k norms and a rope base of their own on the sliding
layers (Gemma 3).
"""
from __future__ import annotations

import torch
from torch import nn

from loraplex.layers.attention import Attention, AttentionMetadata
from loraplex.layers.linear import Linear
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.config import ModelConfig
from loraplex.models.llama import LlamaAttention, LlamaForCausalLM


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), all in fp32 and rounded once (HF's Gemma2RMSNorm / Gemma3RMSNorm); w starts at 0."""

    def __init__(self, size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # [..., size]
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(LlamaAttention):
    """Llama's forward over Gemma's parts: Gemma norms on q/k (Gemma 3), a rotary shared by the layers of one
    kind, the layer's own window and the attention soft cap (Gemma 2)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, attn_backend: str, dtype,
                 device):
        nn.Module.__init__(self)  # not Llama's __init__: its norms, rotary and window are not Gemma's
        self.cfg = cfg
        self.qkv_proj = Linear(cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size], names=["q_proj", "k_proj",
                               "v_proj"], dtype=dtype, device=device)
        self.o_proj = Linear(cfg.q_size, [cfg.hidden_size], names=["o_proj"], dtype=dtype, device=device)
        if cfg.qk_norm:
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
        self.rotary = rotary  # shared by the layers of one kind: its tables are max_position x head_dim
        self.attn = Attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              cfg.layer_window(layer_idx), attn_backend, scale=cfg.attention_multiplier,
                              softcap=cfg.attn_logit_softcapping)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, [cfg.intermediate_size] * 2, names=["gate_proj", "up_proj"],
                                   dtype=dtype, device=device)
        self.down_proj = Linear(cfg.intermediate_size, [cfg.hidden_size], names=["down_proj"], dtype=dtype,
                                device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [num_tokens, intermediate] each
        return self.down_proj(nn.functional.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    """Each branch is normed on the way in and on the way out before it joins the residual stream."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, attn_backend: str, dtype,
                 device):
        super().__init__()
        size, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps, dtype, device)
        self.self_attn = GemmaAttention(cfg, layer_idx, rotary, attn_backend, dtype, device)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps, dtype, device)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype, device)
        self.mlp = GemmaMLP(cfg, dtype, device)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps, dtype, device)

    def forward(self, positions, x, meta):
        # x: [num_tokens, hidden], the residual stream
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma2ForCausalLM and Gemma3ForCausalLM. Subclasses Llama for its face only: builds its own modules."""

    def __init__(self, cfg: ModelConfig, attn_backend: str = "auto", dtype=None, device=None):
        nn.Module.__init__(self)  # not Llama's __init__: none of its blocks
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        # sqrt(hidden) rounded to the model's dtype, as HF does (sqrt(3072) is 55.5 in bf16).
        self.embed_scale = float(torch.tensor(cfg.hidden_size ** 0.5).to(self.embed_tokens.weight.dtype))
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                 fused=cfg.fused_ops)
        local = rotary
        if cfg.local_rope_theta is not None:  # Gemma 3: the sliding layers' own base (scaling only if configured)
            local = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.local_rope_theta,
                                    cfg.local_rope_scaling, fused=cfg.fused_ops)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, i, local if cfg.layer_window(i) is not None else rotary, attn_backend, dtype,
                              device)
            for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                                           device=device), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]. inputs_embeds are taken as
        # final: HF scales only the lookup.
        x = self.embed_tokens(input_ids) * self.embed_scale if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_seqs, hidden] -> [num_seqs, vocab] in fp32 for sampling, soft-capped in fp32
        logits = nn.functional.linear(hidden, self.lm_head_weight).float()
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
