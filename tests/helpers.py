"""Builders for tiny random models and PEFT adapters, so no test touches a model hub."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TOKENIZER_VOCAB = 256


def _tiny_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer with no merges: every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # alphabet() comes from a set, so its order follows the per-process string hash: sort it, or every
    # process numbers the bytes differently and the same random model generates different text.
    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out_dir)


def make_tiny_model(out_dir, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random HF checkpoint (safetensors + tokenizer) of the given architecture."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=TOKENIZER_VOCAB + 3,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=TOKENIZER_VOCAB,
        eos_token_id=TOKENIZER_VOCAB + 2,
        pad_token_id=TOKENIZER_VOCAB,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "llama3":
        cfg = transformers.LlamaConfig(**{**common, "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}})
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": None, "head_dim": 16})
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, "use_sliding_window": False})
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 32, "num_attention_heads": 3, "num_key_value_heads": 1,
                                           "use_sliding_window": False})
        cls = transformers.Qwen3ForCausalLM
    elif arch == "granite":
        # Multipliers far from 1 (Granite 3.x ships e.g. 12, 0.0078, 0.22, 8), so each one shows in the output.
        cfg = transformers.GraniteConfig(**{**common, "embedding_multiplier": 6.0, "attention_multiplier": 0.05,
                                            "residual_multiplier": 0.5, "logits_scaling": 4.0})
        cls = transformers.GraniteForCausalLM
    elif arch in ("gemma2", "gemma3"):
        # Caps small enough to bind (scores and logits here are a few units), a window shorter than most prompts,
        # a query_pre_attn_scalar other than head_dim, tied embeddings as Gemma ships them.
        gemma = dict(common, num_hidden_layers=3, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                     query_pre_attn_scalar=10, sliding_window=8, final_logit_softcapping=1.5, tie_word_embeddings=True)
        if arch == "gemma2":
            cfg = transformers.Gemma2Config(**gemma, attn_logit_softcapping=0.8,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
            cls = transformers.Gemma2ForCausalLM
        else:
            # Gemma 3's 5:1 pattern cut to 2:1; local rope base 10k against 1M (linear-scaled) on the full layers.
            cfg = transformers.Gemma3TextConfig(**gemma, layer_types=[
                "sliding_attention", "sliding_attention", "full_attention"], rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
            cls = transformers.Gemma3ForCausalLM
    elif arch == "phi3":
        # Phi-3-mini's shape in small: fused qkv / gate_up, a sliding window shorter than most prompts, half of
        # each head rotated.
        cfg = transformers.Phi3Config(**{**common, "sliding_window": 12, "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}})
        cls = transformers.Phi3ForCausalLM
    elif arch == "phi4mini":
        # Phi-4-mini's rope: LongRoPE (short factors up to the pre-training length 256, whose attention factor
        # sqrt(1 + ln 2 / ln 256) scales cos and sin) on 3/4 of each head.
        cfg = transformers.Phi3Config(**{**common, "head_dim": 16, "original_max_position_embeddings": 256,
                                         "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.3, 1.9, 2.6, 3.2, 4.1], "long_factor": [2.0, 3.0, 5.0, 8.0, 13.0, 21.0],
            "original_max_position_embeddings": 256}})
        cls = transformers.Phi3ForCausalLM
    elif arch == "mixtral":
        # 4 experts, 2 per token, a window shorter than most prompts.
        cfg = transformers.MixtralConfig(**{**common, "num_local_experts": 4, "num_experts_per_tok": 2,
                                            "sliding_window": 12})
        cls = transformers.MixtralForCausalLM
    elif arch == "qwen2_moe":
        # A shared expert behind its gate, top-k not renormalised, the first layer dense (mlp_only_layers).
        cfg = transformers.Qwen2MoeConfig(**{**common, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 40, "shared_expert_intermediate_size": 56,
                                             "norm_topk_prob": False, "mlp_only_layers": [0],
                                             "use_sliding_window": False})
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**{**common, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 40, "norm_topk_prob": True,
                                             "use_sliding_window": False})
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    # Random init gives near-uniform logits; scale up so greedy decoding is decisive and not tie-prone.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif arch.startswith("gemma") and "norm" in name:  # x * (1 + w) with w = 0 hides which norm is which
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir, safe_serialization=True)
    _tiny_tokenizer(out_dir)
    return out_dir


def make_peft_adapter(model_dir, out_dir, rank: int = 8, alpha: int | None = None,
                      targets=("q_proj", "v_proj"), seed: int = 1, scale: float = 0.05, **config_overrides) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for the model in model_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                     target_modules=list(targets) if not isinstance(targets, str) else targets,
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **config_overrides)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out_dir)
    # PEFT records the local path as base model; keep it so resolvers can check lineage.
    return out_dir


def read_adapter_config(adapter_dir) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def make_tiny_llava(out_dir, seed: int = 0) -> Path:
    """A tiny random LLaVA checkpoint (CLIP tower 32x32 images in 8x8 patches -> 16 image tokens, 2-layer MLP
    projector, Llama decoder) with its processor (PIL image processor: no torchvision) and an <image> token."""
    import transformers
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tiny_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init is small: make every part matter for the tokens
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out_dir)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(out_dir)
    return out_dir


def make_llava_adapter(llava_dir, out_dir, targets: str, seed: int, scale: float = 0.3, rank: int = 8) -> Path:
    """A PEFT adapter of the tiny LLaVA on the modules whose names match the regex ``targets`` (decoder, tower,
    projector in any mix), with random A and B large enough to change the tokens."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def random_image(seed: int, size: int = 40):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_tiny_granite_speech(out_dir, seed: int = 0, lora_targets: str | None = None, lora_seed: int = 1) -> Path:
    """A tiny random Granite Speech checkpoint: a 2-layer Conformer speech encoder (80 mels stacked by 2 -> 160
    inputs), a 2-layer Q-Former projector (windows of 15 encoder frames -> 3 audio tokens), and a Granite decoder
    with multipliers far from 1; its processor (GraniteSpeechFeatureExtractor: 16 kHz; 1 s of audio -> 12
    ``<|audio|>`` tokens) and the token. With ``lora_targets`` (a regex) the checkpoint ships its own PEFT adapter
    on those modules beside the weights (``has_lora_adapter``, as IBM's checkpoints do)."""
    import transformers
    from transformers import AutoTokenizer, GraniteSpeechFeatureExtractor, GraniteSpeechProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _tiny_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|audio|>"]})
    audio_token_id = tok.convert_tokens_to_ids("<|audio|>")
    text = transformers.GraniteConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.5, logits_scaling=4.0)
    encoder = transformers.GraniteSpeechEncoderConfig(
        input_dim=160, num_layers=2, hidden_dim=64, feedforward_mult=2, num_heads=4, dim_head=16, output_dim=42,
        context_size=200, max_pos_emb=512)
    projector = transformers.Blip2QFormerConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=112, encoder_hidden_size=64,
        cross_attention_frequency=1, max_position_embeddings=64)
    cfg = transformers.GraniteSpeechConfig(
        text_config=text.to_dict(), encoder_config=encoder.to_dict(), projector_config=projector.to_dict(),
        audio_token_index=audio_token_id, has_lora_adapter=lora_targets is not None, downsample_rate=5,
        window_size=15, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.GraniteSpeechForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init is small: make every part matter for the tokens
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if lora_targets is not None:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets))
        _randomize_lora(peft_model, lora_seed, 0.3)
        peft_model.save_pretrained(out_dir)  # the adapter beside the weights
        model = peft_model.unload()
    model.save_pretrained(out_dir)
    processor = GraniteSpeechProcessor(audio_processor=GraniteSpeechFeatureExtractor(), tokenizer=tok)
    processor.save_pretrained(out_dir)
    return out_dir


def make_granite_speech_adapter(model_dir, out_dir, targets: str, seed: int, scale: float = 0.3,
                                rank: int = 8) -> Path:
    """A PEFT adapter of the tiny Granite Speech on the modules matching the regex ``targets`` (decoder, speech
    encoder, Q-Former projector in any mix)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    _randomize_lora(peft_model, seed, scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def _randomize_lora(peft_model, seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)


def random_audio(seed: int, seconds: float = 1.0, sample_rate: int = 16000):
    """A mono float32 clip in [-1, 1] (noise over a tone) and its rate, as vLLM's AudioAsset gives."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    clip = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.1 * rng.standard_normal(t.shape)
    return clip.astype(np.float32), sample_rate


def agree_up_to_near_ties(ours, ref, margin: float = 0.25) -> int:
    """Count outputs whose tokens match HF's, up to the first step where HF's top two logits are within `margin`.
    ``ref``: [(tokens, [top-1 minus top-2 logit per step])].

    Both sides compute in bf16 with different kernels, so a near-tie may legitimately go either way; a
    divergence where HF was decisive is a bug.
    """
    good = 0
    for a, (b, margins) in zip(ours, ref):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        good += first is None and len(a) == len(b) or (first is not None and margins[first] < margin)
    return good


def make_fp8_checkpoint(model_dir, out_dir, scheme: str = "FP8_DYNAMIC", calibration=("Hello, my name is",)) -> Path:
    """An FP8 checkpoint of the float model in model_dir, written by compressed-tensors as llm-compressor would
    (format "float-quantized"): weight scales by min-max (each channel's, or the tensor's, absmax maps to 448), and for
    the static scheme "FP8" input scales from the absmax each Linear saw over the calibration prompts.
    scheme: "FP8_DYNAMIC" (per-channel weights, per-token dynamic activations), "FP8" (per-tensor weights, static
    per-tensor activations) or "FP8_W" (per-channel weights only; activations stay float)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    amax: dict[str, float] = {}
    if scheme == "FP8":
        tok = AutoTokenizer.from_pretrained(model_dir)
        hooks = [m.register_forward_hook(lambda mod, args, out, name=name: amax.__setitem__(
                     name, max(amax.get(name, 0.0), float(args[0].abs().max()))))
                 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
        with torch.no_grad():
            for prompt in calibration:
                model(torch.tensor([tok(prompt).input_ids]))
        for h in hooks:
            h.remove()
    q_scheme = preset_name_to_scheme("FP8_DYNAMIC" if scheme == "FP8_W" else scheme, ["Linear"])
    if scheme == "FP8_W":
        q_scheme.input_activations = None
    config = QuantizationConfig(config_groups={"group_0": q_scheme}, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight_scale"):
                w = m.weight.abs()
                a = (w.amax(dim=1, keepdim=True) if m.weight_scale.numel() > 1
                     else w.amax().reshape(m.weight_scale.shape))
                m.weight_scale.copy_((a / 448.0).to(m.weight_scale.dtype))
            if hasattr(m, "input_scale") and name in amax:
                m.input_scale.fill_(amax[name] / 448.0)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir
