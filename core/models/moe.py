"""Mixture-of-Experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

Llama's attention and layer structure; the feed-forward of a sparse layer is a router (softmax over experts in
fp32, top-k, renormalised where the model does) and per-expert SwiGLU MLPs, plus Qwen2-MoE's shared expert behind
a sigmoid gate. Dense layers (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``) keep Llama's MLP.

LoRA applies to the attention projections, a dense layer's MLP and Qwen2-MoE's shared expert (paged, as on every
model), and to the routed experts: each expert's gate / up and down projections get their own A and B (PEFT's
``target_parameters`` on transformers 5's fused experts, or transformers 4's per-expert Linears). On CUDA the experts run as two fused Triton grouped GEMMs over the experts the step's
tokens chose (loraplex.kernels.fused_moe), eager and inside CUDA graphs; on the CPU, and in a step with expert
LoRA, as a torch loop over those experts (HF's reference computation), expert LoRA as matmuls per (expert,
adapter) on the rows of that pair. A step with expert LoRA runs eager (no CUDA graph): the fused kernel does not
take expert LoRA yet.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from loraplex.kernels.activation import silu_and_mul
from loraplex.kernels.fused_moe import HAS_TRITON, fused_moe
from loraplex.models.config import ModelConfig
from loraplex.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

# Checkpoint names of the sparse feed-forward, per layer: Mixtral's "block_sparse_moe.experts.E.w1" (w1 gate,
# w3 up, w2 down) and Qwen's "mlp.experts.E.gate_proj"; the router "gate"; Qwen2-MoE's shared expert and its gate.
_EXPERT = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROUTER = re.compile(r"^(?:block_sparse_moe|mlp)\.gate\.weight$")
_SHARED = re.compile(r"^mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED_GATE = "mlp.shared_expert_gate.weight"
_DENSE = re.compile(r"^mlp\.(gate_proj|up_proj|down_proj)\.weight$")


class ExpertLoRARuns:
    """This step's expert LoRA, shared by every sparse layer: [(first token, end token, weights)] for the runs of
    flat-batch rows whose adapter targets the experts; weights: experts_path(layer, kind) -> (A [experts, r, in],
    B [experts, out, r]) on the device. Empty outside a step, and inside CUDA graphs."""

    def __init__(self):
        self.runs: list[tuple[int, int, dict]] = []


class SparseMoe(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, layer_idx: int = 0, lora_runs: ExpertLoRARuns | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.lora_runs = lora_runs or ExpertLoRARuns()
        self._paths = {kind: f"model.layers.{layer_idx}.mlp.experts.{kind}" for kind in ("w13", "w2")}
        self.is_fused = cfg.fused_ops and HAS_TRITON  # the Triton grouped GEMMs on CUDA
        num, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.is_renormalized = cfg.norm_topk_prob
        self.is_fp32_weights = cfg.architecture == "MixtralForCausalLM"  # Qwen rounds them to the model dtype
        self.router = nn.Parameter(torch.empty(num, hidden, dtype=dtype, device=device), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(num, 2 * inter, hidden, dtype=dtype, device=device),
                                requires_grad=False)  # [experts, gate rows then up rows, hidden]
        self.w2 = nn.Parameter(torch.empty(num, hidden, inter, dtype=dtype, device=device), requires_grad=False)
        self.shared = None
        if cfg.shared_expert_intermediate_size:
            self.shared = LlamaMLP(cfg, dtype, device, intermediate_size=cfg.shared_expert_intermediate_size)
            self.shared_gate = nn.Parameter(torch.empty(1, hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden]
        probs = nn.functional.linear(x, self.router).float().softmax(-1)  # [num_tokens, experts]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [num_tokens, top_k]
        if self.is_renormalized:
            weights = weights / weights.sum(-1, keepdim=True)
        if not self.is_fp32_weights:
            weights = weights.to(x.dtype)
        runs = [r for r in self.lora_runs.runs if self._paths["w13"] in r[2] or self._paths["w2"] in r[2]]
        if self.is_fused and x.is_cuda and not runs:
            # Two grouped GEMMs over the chosen experts, no host sync: eager and inside CUDA graphs alike.
            out = fused_moe(x, self.w13, self.w2, weights, experts)
        elif x.is_cuda and torch.cuda.is_current_stream_capturing():
            # A CUDA graph (decode) cannot read back which experts were chosen: every expert runs on every row,
            # weighted by zero where it was not chosen. Decode reads each expert's weights either way.
            out = torch.zeros_like(x)
            for e in range(self.w13.shape[0]):
                w = (weights * (experts == e)).sum(-1, keepdim=True)  # [num_tokens, 1]
                h = silu_and_mul(nn.functional.linear(x, self.w13[e]))
                out += (nn.functional.linear(h, self.w2[e]) * w).to(x.dtype)
        else:
            out = torch.zeros_like(x)
            for e in experts.unique().tolist():  # the experts this step's tokens chose
                token, slot = (experts == e).nonzero(as_tuple=True)
                g = nn.functional.linear(x[token], self.w13[e])  # [n, 2 * inter]
                if runs:
                    self._add_lora(g, x[token], token, e, "w13", runs)
                h = silu_and_mul(g)  # [n, inter]
                y = nn.functional.linear(h, self.w2[e])
                if runs:
                    self._add_lora(y, h, token, e, "w2", runs)
                out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        if self.shared is not None:
            gate = torch.sigmoid(nn.functional.linear(x, self.shared_gate))  # [num_tokens, 1]
            out = out + gate * self.shared(x)
        return out

    def _add_lora(self, out: torch.Tensor, inp: torch.Tensor, token: torch.Tensor, expert: int, kind: str,
                  runs: list) -> None:
        """out[i] += B_e (A_e inp[i]) for the rows i of expert e whose token's adapter targets this projection."""
        path = self._paths[kind]
        for first, end, lora in runs:
            if path not in lora:
                continue
            rows = ((token >= first) & (token < end)).nonzero().squeeze(1)
            if rows.numel():
                a, b = lora[path]  # [experts, r, in], [experts, out, r]
                out.index_add_(0, rows, (inp[rows] @ a[expert].t()) @ b[expert].t())

    def load(self, rest: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor (its name after "model.layers.N.") in; False when it is not this block's."""
        m = _EXPERT.match(rest)
        if m is not None:
            e, kind = int(m.group(1)), m.group(2)
            inter = self.w2.shape[2]
            if kind in ("w2", "down_proj"):
                self.w2.data[e].copy_(tensor)
            else:
                lo = 0 if kind in ("w1", "gate_proj") else inter
                self.w13.data[e, lo:lo + inter].copy_(tensor)
            return True
        if _ROUTER.match(rest):
            self.router.data.copy_(tensor)
            return True
        m = _SHARED.match(rest)
        if m is not None and self.shared is not None:
            linear = self.shared.down_proj if m.group(1) == "down_proj" else self.shared.gate_up_proj
            linear.load_weight(m.group(1), tensor)
            return True
        if rest == _SHARED_GATE and self.shared is not None:
            self.shared_gate.data.copy_(tensor)
            return True
        return False


class MoeForCausalLM(LlamaForCausalLM):
    """MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM."""

    # Attention in every layer; a dense layer's MLP (Qwen's mlp_only_layers) and Qwen2-MoE's shared expert where
    # the layer has them (the page layout skips the others). The routed experts' LoRA is not paged (SparseMoe).
    LORA_MODULES = {"q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj", "v_proj": "self_attn.qkv_proj",
                    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
                    "down_proj": "mlp.down_proj", "shared_expert.gate_proj": "mlp.shared.gate_up_proj",
                    "shared_expert.up_proj": "mlp.shared.gate_up_proj", "shared_expert.down_proj": "mlp.shared.down_proj"}

    def _decoder_layer(self, cfg: ModelConfig, layer_idx: int, attn_backend: str, dtype, device) -> nn.Module:
        if not hasattr(self, "expert_lora"):
            self.expert_lora = ExpertLoRARuns()  # built before the layers: LlamaForCausalLM's __init__ calls this
        mlp = SparseMoe(cfg, dtype, device, layer_idx, self.expert_lora) if cfg.moe_layers[layer_idx] else None
        return LlamaDecoderLayer(cfg, attn_backend, dtype, device, mlp=mlp)

    def expert_lora_shapes(self) -> dict[int, tuple[int, int, int]]:
        """Sparse layer -> (num_experts, hidden, intermediate): the experts adapters may target."""
        cfg = self.cfg
        return {i: (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
                for i, is_sparse in enumerate(cfg.moe_layers) if is_sparse}

    def load_layer_tensor(self, layer_idx: int, rest: str, tensor: torch.Tensor) -> bool:
        """The loader's hook for names Llama's layout does not have: the sparse feed-forward's, and a dense
        layer's MLP (its projections are not LoRA modules here, so the loader does not place them)."""
        mlp = self.layers[layer_idx].mlp
        if isinstance(mlp, SparseMoe):
            return mlp.load(rest, tensor)
        m = _DENSE.match(rest)
        if m is None:
            return False
        (mlp.down_proj if m.group(1) == "down_proj" else mlp.gate_up_proj).load_weight(m.group(1), tensor)
        return True

