"""ModelConfig: the parts of an HF config our Llama-family code needs, parsed once and validated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from loraplex.errors import UnsupportedModelError
from loraplex.layers.rotary import longrope_original_len

# Architectures our model code implements; all are Llama-shaped decoders.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # Llama with four scalars: embeddings, attention scores, residual branches and logits (Granite 3.x).
    "GraniteForCausalLM": "granite",
    # Their own blocks (core/models/gemma.py): four norms, GeLU, soft-capping, sliding-window layers.
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    # Llama with fused qkv_proj / gate_up_proj in the checkpoint and partial rotary (core/models/phi3.py).
    "Phi3ForCausalLM": "phi3",
    # Mixture of Experts (core/models/moe.py): Llama's attention, a router and experts in sparse layers.
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# A tower + connector before one of the decoders above: vision (core/models/llava.py), speech
# (core/models/granite_speech.py).
MULTIMODAL_ARCHITECTURES = {"LlavaForConditionalGeneration": "llava",
                            "GraniteSpeechForConditionalGeneration": "granite_speech"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2, some Llamas)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    sliding_window: int | None = None
    # Phi: the share of each head that rotary rotates (the first int(head_dim * factor) dims).
    partial_rotary_factor: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # Mixture of Experts (core/models/moe.py): experts per sparse layer and per token, each expert's width, whether
    # the top-k weights are renormalised, Qwen2-MoE's shared expert width (0: none), which layers are sparse.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    # Granite's multipliers (1.0 / None elsewhere): x = embed * embedding_multiplier; softmax scale
    # attention_multiplier instead of head_dim ** -0.5; residual += branch * residual_multiplier; logits / logits_scaling.
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Gemma 2 / 3 (core/models/gemma.py). Soft caps: x = tanh(x / cap) * cap on attention scores before the softmax,
    # on the final logits. layer_types: per layer "sliding_attention" (sliding_window applies) or "full_attention";
    # empty: sliding_window applies to every layer (Mistral). local_rope_*: the sliding layers' rope (Gemma 3's
    # rope_local_base_freq), None: the full layers' one.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None
    local_rope_scaling: dict = field(default_factory=dict)
    # Fused Triton RMSNorm / rotary / SiLU·mul on CUDA (LORAPLEX_FUSED_OPS=1). Off by default: experimental.
    fused_ops: bool = False
    # Multi-modal models: the placeholder token that the processor expands, one per feature row of an image
    # (LLaVA) or an audio clip (Granite Speech).
    image_token_id: int | None = None
    audio_token_id: int | None = None
    # Tensor parallelism (loraplex.distributed): this rank's share. The head and MLP counts above are this rank's.
    tp_rank: int = 0
    tp_size: int = 1

    def shard(self, rank: int, world_size: int) -> "ModelConfig":
        """This rank's config under tensor parallelism: 1 / world of the attention heads, KV heads and MLP
        columns; refused by name for what is not split yet."""
        if world_size == 1:
            return self
        why = None
        if self.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                     "Qwen3ForCausalLM", "GraniteForCausalLM"):
            why = f"{self.architecture} is not split yet (the Llama family is: Llama, Mistral, Qwen2, Qwen3, Granite)"
        elif self.num_attention_heads % world_size or self.num_key_value_heads % world_size:
            why = (f"{self.num_attention_heads} attention / {self.num_key_value_heads} KV heads do not split into "
                   f"{world_size} equal shares")
        elif self.intermediate_size % world_size:
            why = f"intermediate_size {self.intermediate_size} does not split into {world_size} equal shares"
        if why is not None:
            raise UnsupportedModelError(f"tensor_parallel_size {world_size}: {why}")
        return dataclasses.replace(
            self, num_attention_heads=self.num_attention_heads // world_size,
            num_key_value_heads=self.num_key_value_heads // world_size,
            intermediate_size=self.intermediate_size // world_size, tp_rank=rank, tp_size=world_size)

    @property
    def is_multimodal(self) -> bool:
        return bool(self.modalities)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, t in (("image", self.image_token_id), ("audio", self.audio_token_id)) if t is not None)

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer (None: full attention)."""
        if self.layer_types and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def max_served_len(self) -> int:
        """The longest sequence served: max_position_embeddings, or with LongRoPE its pre-training length (past
        it HF switches every position to the long factors, which a KV cache written with the short ones cannot
        follow)."""
        original = longrope_original_len(self.rope_scaling)
        return min(original, self.max_position_embeddings) if original else self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        _refuse_quantized(hf_config)
        archs = list(getattr(hf_config, "architectures", None) or [])
        if "GraniteSpeechForConditionalGeneration" in archs or (not archs and hf_config.model_type == "granite_speech"):
            # Speech encoder and Q-Former projector before a Granite decoder: the decoder's fields are text_config's,
            # but for logits_scaling: HF's model applies its own lm_head to the decoder's hidden states, unscaled.
            text = cls.from_hf(hf_config.text_config)
            return dataclasses.replace(text, architecture="GraniteSpeechForConditionalGeneration",
                                       audio_token_id=int(hf_config.audio_token_index), logits_scaling=1.0)
        if any(a in MULTIMODAL_ARCHITECTURES for a in archs) or (not archs and hf_config.model_type == "llava"):
            # A vision tower and projector before a Llama-family decoder: the decoder's fields are text_config's.
            text = cls.from_hf(hf_config.text_config)
            image_token = getattr(hf_config, "image_token_id", None)
            if image_token is None:
                image_token = getattr(hf_config, "image_token_index", None)
            strategy = getattr(hf_config, "vision_feature_select_strategy", "default")
            if strategy not in ("default", "full"):
                raise UnsupportedModelError(f"unsupported vision_feature_select_strategy {strategy!r}")
            return dataclasses.replace(text, architecture="LlavaForConditionalGeneration",
                                       image_token_id=int(image_token))
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = getattr(hf_config, "model_type", None)
            by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "granite": "GraniteForCausalLM",
                       "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                       "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                       "qwen3_moe": "Qwen3MoeForCausalLM"}
            arch = by_type.get(model_type) if not archs else None
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or getattr(hf_config, 'model_type', '?')}; loraplex supports "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES | MULTIMODAL_ARCHITECTURES))}")
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish") and family not in ("gemma2", "gemma3"):  # Gemma: read in _gemma_fields
            raise UnsupportedModelError(f"unsupported activation {act!r}")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        theta = rope.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
        window = None
        if family in ("mistral", "phi3", "mixtral"):
            window = getattr(hf_config, "sliding_window", None)
        elif family.startswith("qwen") and getattr(hf_config, "use_sliding_window", False):
            raise UnsupportedModelError("Qwen sliding-window attention (use_sliding_window=True) is not supported")
        if getattr(hf_config, "mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=True (a bias on gate/up/down) is not supported")
        partial = float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0))
        if longrope_original_len({**rope, "original_max_position_embeddings": 0}) is not None:
            # transformers 4.x keeps the pre-training length beside rope_scaling, 5.x inside rope_parameters.
            original = rope.get("original_max_position_embeddings") or getattr(
                hf_config, "original_max_position_embeddings", None)
            if not original:
                raise UnsupportedModelError("longrope rope scaling without original_max_position_embeddings")
            rope["original_max_position_embeddings"] = int(original)
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        cfg = cls(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=getattr(hf_config, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=rope,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=(family == "qwen2" or (family == "qwen2_moe" and getattr(hf_config, "qkv_bias", True))
                            or bool(getattr(hf_config, "attention_bias", False))),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_window=window,
            partial_rotary_factor=partial,
            eos_token_ids=eos_ids,
            hidden_act=act,
            **({} if family != "granite" else dict(
                embedding_multiplier=float(hf_config.embedding_multiplier),
                attention_multiplier=float(hf_config.attention_multiplier),
                residual_multiplier=float(hf_config.residual_multiplier),
                logits_scaling=float(hf_config.logits_scaling))),
        )
        if family in ("mixtral", "qwen2_moe", "qwen3_moe"):
            return dataclasses.replace(cfg, **_moe_fields(hf_config, family))
        return dataclasses.replace(cfg, **_gemma_fields(hf_config, family)) if family.startswith("gemma") else cfg


def _refuse_quantized(hf_config) -> None:
    # At start, before any weight is read: a format that cannot load is refused naming it (loraplex.models.quant).
    from loraplex.models.quant import quant_spec

    quant_spec(hf_config, None)


def _moe_fields(hf_config, family: str) -> dict:
    """Mixtral's and Qwen MoE's expert fields. Mixtral: every layer sparse, experts as wide as intermediate_size,
    top-k always renormalised; Qwen: moe_intermediate_size, norm_topk_prob, decoder_sparse_step / mlp_only_layers."""
    n = hf_config.num_hidden_layers
    if family == "mixtral":
        return dict(num_experts=hf_config.num_local_experts, num_experts_per_tok=hf_config.num_experts_per_tok,
                    moe_intermediate_size=hf_config.intermediate_size, norm_topk_prob=True, moe_layers=(True,) * n)
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    num = hf_config.num_experts
    return dict(num_experts=num, num_experts_per_tok=hf_config.num_experts_per_tok,
                moe_intermediate_size=hf_config.moe_intermediate_size,
                norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
                shared_expert_intermediate_size=(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
                if family == "qwen2_moe" else 0,
                moe_layers=tuple(i not in dense and num > 0 and (i + 1) % step == 0 for i in range(n)))


def _gemma_fields(hf_config, family: str) -> dict:
    """Gemma 2 / 3's fields over the Llama ones, from transformers 5's config (4.x's spellings where they differ)."""
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"unsupported Gemma hidden_activation {act!r} (gelu_pytorch_tanh is)")
    for name in ("use_bidirectional_attention", "attention_bias"):
        if getattr(hf_config, name, False):
            raise UnsupportedModelError(f"Gemma with {name}=True is not supported")
    num_layers = hf_config.num_hidden_layers
    # Without layer_types (transformers 4.x): every pattern-th layer is full, the others sliding.
    pattern = 2 if family == "gemma2" else getattr(hf_config, "_sliding_window_pattern",
                                                   getattr(hf_config, "sliding_window_pattern", 6))
    types = tuple(getattr(hf_config, "layer_types", None)
                  or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)])
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown or len(types) != num_layers:
        raise UnsupportedModelError(f"unsupported Gemma layer_types {sorted(unknown) or len(types)}")
    fields = dict(hidden_act=act, layer_types=types, sliding_window=getattr(hf_config, "sliding_window", None),
                  attention_multiplier=float(hf_config.query_pre_attn_scalar) ** -0.5,
                  final_logit_softcapping=_float_or_none(getattr(hf_config, "final_logit_softcapping", None)),
                  # HF's Gemma 3 has the field but never applies it; its q/k norms replace the cap.
                  attn_logit_softcapping=_float_or_none(getattr(hf_config, "attn_logit_softcapping", None))
                  if family == "gemma2" else None,
                  qk_norm=family == "gemma3")
    if family == "gemma3":
        rope = getattr(hf_config, "rope_parameters", None) or {}
        if "full_attention" in rope:  # transformers 5: one rope per layer type, scaling on the full layers
            full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or {})
        else:  # 4.x: rope_theta / rope_scaling for the full layers, rope_local_base_freq for the sliding ones
            full = {**(getattr(hf_config, "rope_scaling", None) or {}), "rope_theta": hf_config.rope_theta}
            local = {"rope_theta": getattr(hf_config, "rope_local_base_freq", 10000.0)}
        fields.update(rope_theta=float(full.get("rope_theta", 1_000_000.0)), rope_scaling=full,
                      local_rope_theta=float(local.get("rope_theta", 10000.0)), local_rope_scaling=local)
    return fields


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)
