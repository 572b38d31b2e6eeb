"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM, Granite; Phi-3 in phi3.py, MoE in moe.py) over a
flat token batch and paged KV cache."""
from __future__ import annotations

import torch
from torch import nn

from loraplex.distributed import TensorParallel
from loraplex.kernels.activation import silu_and_mul
from loraplex.kernels.rms_norm import rms_norm
from loraplex.layers.attention import Attention, AttentionMetadata
from loraplex.layers.linear import Linear
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype=None, device=None, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: the normed x. With residual: (norm(x + residual), x + residual), fused on CUDA."""
        out, new_residual = rms_norm(x, self.weight, self.eps, residual, use_triton=self.fused)
        return out if residual is None else (out, new_residual)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str, dtype, device):
        super().__init__()
        self.cfg = cfg
        tp = TensorParallel(cfg.tp_rank, cfg.tp_size)
        self.qkv_proj = Linear(cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size], bias=cfg.attention_bias,
                               names=["q_proj", "k_proj", "v_proj"], dtype=dtype, device=device, fused_name="qkv_proj",
                               tp=tp, parallel="column")
        self.o_proj = Linear(cfg.q_size, [cfg.hidden_size], names=["o_proj"], dtype=dtype, device=device, tp=tp,
                             parallel="row")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device, cfg.fused_ops)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device, cfg.fused_ops)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                      fused=cfg.fused_ops, rotary_dim=cfg.rotary_dim)
        self.attn = Attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              cfg.sliding_window, attn_backend, scale=cfg.attention_multiplier)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cfg = self.cfg
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(-1, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(-1, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(-1, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        attn = self.attn
        q = self.rotary.forward_to_cache(positions, q, k, v, attn.k_cache, attn.v_cache, meta.slot_mapping)
        out = attn.attend(q, meta)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(out.reshape(-1, cfg.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        tp = TensorParallel(cfg.tp_rank, cfg.tp_size)
        self.gate_up_proj = Linear(cfg.hidden_size, [inter] * 2, names=["gate_proj", "up_proj"],
                                   dtype=dtype, device=device, fused_name="gate_up_proj", tp=tp, parallel="column")
        self.down_proj = Linear(inter, [cfg.hidden_size], names=["down_proj"], dtype=dtype, device=device, tp=tp,
                                parallel="row")
        self.fused = cfg.fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), use_triton=self.fused))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str, dtype, device, mlp: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, cfg.fused_ops)
        self.self_attn = LlamaAttention(cfg, attn_backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, cfg.fused_ops)
        self.mlp = mlp if mlp is not None else LlamaMLP(cfg, dtype, device)  # a MoE block's (moe.py)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, positions, x, residual, meta):
        # The residual stream travels beside the hidden states so each add fuses into the next norm; a branch's
        # output is scaled (Granite) before it joins the stream.
        m = self.residual_multiplier
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        if m != 1.0:
            x = x * m
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        return (x * m if m != 1.0 else x), residual


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding (loraplex.distributed): ids outside them look up zeros, and the
    all-reduce brings each token the row of the rank that holds it."""

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.tp = TensorParallel(cfg.tp_rank, cfg.tp_size)
        self.start, rows = self.tp.vocab_shard(cfg.vocab_size)
        self.weight = nn.Parameter(torch.empty(rows, cfg.hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        is_mine = (local >= 0) & (local < self.weight.shape[0])
        out = nn.functional.embedding(torch.where(is_mine, local, 0), self.weight)  # [num_tokens, hidden]
        return self.tp.all_reduce(out * is_mine.unsqueeze(-1).to(out.dtype))


class LlamaForCausalLM(nn.Module):
    # HF module name of each LoRA-targetable projection -> (attribute path inside a decoder layer)
    LORA_MODULES = {
        "q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj", "v_proj": "self_attn.qkv_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
        "down_proj": "mlp.down_proj",
    }

    def __init__(self, cfg: ModelConfig, attn_backend: str = "auto", dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.tp = TensorParallel(cfg.tp_rank, cfg.tp_size)
        if self.tp.is_parallel:
            self.embed_tokens = VocabParallelEmbedding(cfg, dtype, device)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            self._decoder_layer(cfg, i, attn_backend, dtype, device) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, cfg.fused_ops)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            rows = self.embed_tokens.weight.shape[0]  # this rank's share under tensor parallelism
            self.lm_head_weight = nn.Parameter(torch.empty(rows, cfg.hidden_size, dtype=dtype, device=device),
                                               requires_grad=False)

    def _decoder_layer(self, cfg: ModelConfig, layer_idx: int, attn_backend: str, dtype, device) -> nn.Module:
        return LlamaDecoderLayer(cfg, attn_backend, dtype, device)

    def lora_layer(self, layer_idx: int, module: str) -> Linear:
        obj = self.layers[layer_idx]
        for part in self.LORA_MODULES[module].split("."):
            obj = getattr(obj, part)
        return obj

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]. inputs_embeds [num_tokens, hidden]
        # replaces the embedding lookup (a multi-modal prefill: token embeddings with encoder outputs scattered in at
        # the placeholder positions); Granite's multiplier applies to it as well, as in HF.
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.cfg.embedding_multiplier != 1.0:
            x = x * self.cfg.embedding_multiplier
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_seqs, hidden] -> [num_seqs, vocab] in fp32 for sampling
        logits = nn.functional.linear(hidden, self.lm_head_weight).float()
        if self.tp.is_parallel:
            logits = self.tp.all_gather(logits)[:, : self.cfg.vocab_size]  # the ranks' blocks, padding cut
        return logits / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else logits
