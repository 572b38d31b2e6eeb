"""LLaVA (``LlavaForConditionalGeneration``): a vision tower and a projector in front of our Llama-family decoder.

The tower and the projector are transformers' own modules built from the checkpoint's config (CLIP, SigLIP...,
whatever ``AutoModel.from_config(vision_config)`` gives), so any LLaVA checkpoint's vision side loads unchanged
and computes what HF computes; they run once per image, before its prompt's prefill, so their cost is small
beside the decoder's. The decoder is ours (paged KV cache, LoRA, CUDA graphs): the image features are scattered
into the prefill's token embeddings at the image placeholder positions (``LlamaForCausalLM.forward``'s
``inputs_embeds``), as HF's ``masked_scatter`` does.
"""
from __future__ import annotations

import torch

from loraplex.models.config import ModelConfig
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.tower_lora import TowerLoRA


class LlavaForConditionalGeneration(LlamaForCausalLM):
    # Checkpoint name prefixes: transformers >= 4.52 (model.*) and the older llava-hf layout.
    VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
    PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
    LM_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                   "language_model.lm_head.": "lm_head."}

    def __init__(self, cfg: ModelConfig, hf_config, attn_backend: str = "auto", dtype=None, device=None):
        super().__init__(cfg, attn_backend=attn_backend, dtype=dtype, device=device)
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.image_token_id = cfg.image_token_id
        self.vision_feature_layer = hf_config.vision_feature_layer
        self.vision_feature_select_strategy = hf_config.vision_feature_select_strategy
        vision = hf_config.vision_config
        # Placeholder tokens per image: one per patch, and the CLS token's too with the "full" strategy.
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2 + (
            1 if self.vision_feature_select_strategy == "full" else 0)
        with torch.device(device if device is not None else "cpu"):
            self.vision_tower = AutoModel.from_config(hf_config.vision_config, dtype=dtype)
            self.multi_modal_projector = LlavaMultiModalProjector(hf_config).to(dtype)
        for p in list(self.vision_tower.parameters()) + list(self.multi_modal_projector.parameters()):
            p.requires_grad_(False)
        self.tower_lora = TowerLoRA({"vision_tower.": self.vision_tower,
                                     "multi_modal_projector.": self.multi_modal_projector})

    @property
    def mm_token_id(self) -> int:
        return self.image_token_id

    def tower_parts(self) -> dict[str, torch.nn.Module]:
        """Checkpoint part (``checkpoint_name``) -> the module its tensors load into."""
        return {"vision": self.vision_tower, "projector": self.multi_modal_projector}

    def tower_lora_targets(self) -> dict[str, tuple[int, int]]:
        """Linears of the tower and projector that adapters may target: PEFT path from the tower down -> (in, out)."""
        return self.tower_lora.targets()

    @staticmethod
    def tower_aliases(path: str) -> tuple[str, ...]:
        """The other spelling of a tower path: transformers 5 flattened CLIPVisionModel (``vision_tower.encoder``),
        checkpoints and adapters saved before have ``vision_tower.vision_model.encoder``; both are the same."""
        if path.startswith("vision_tower.vision_model."):
            return (path, "vision_tower." + path[len("vision_tower.vision_model."):])
        if path.startswith("vision_tower."):
            return (path, "vision_tower.vision_model." + path[len("vision_tower."):])
        return (path,)

    @classmethod
    def checkpoint_name(cls, name: str) -> tuple[str, str]:
        """(part, name inside it): part is "vision", "projector" or "lm" (names as a causal LM checkpoint's)."""
        for prefix in cls.VISION_PREFIXES:
            if name.startswith(prefix):
                return "vision", name[len(prefix):]
        for prefix in cls.PROJECTOR_PREFIXES:
            if name.startswith(prefix):
                return "projector", name[len(prefix):]
        for prefix, new in cls.LM_PREFIXES.items():
            if name.startswith(prefix):
                return "lm", new + name[len(prefix):]
        return "lm", name

    @torch.inference_mode()
    def encode_mm(self, items: list[tuple[dict, dict | None]]) -> list[torch.Tensor]:
        """The image features of each request: ``items`` are (its mm_inputs, its tower / projector LoRA: path ->
        (A, B) on this device and dtype, or None) -> [num images * tokens per image, hidden] per request. One tower
        run for all of them; each request's rows get its own adapter."""
        pixels = [mm["pixel_values"] for mm, _ in items]
        loras = [lora for p, (_, lora) in zip(pixels, items) for _ in range(p.shape[0])]
        with self.tower_lora.applied(loras):
            feats = self._embed_images(torch.cat(pixels).to(self.embed_tokens.weight.device))
        return list(feats.split([p.shape[0] * self.tokens_per_image for p in pixels]))

    def _embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values.to(self.embed_tokens.weight.dtype), output_hidden_states=True)
        layers = self.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        feats = [out.hidden_states[i] for i in layers]
        if self.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]  # the CLS token is not an image token
        image_features = self.multi_modal_projector(torch.cat(feats, dim=-1))  # [num_images, tokens, hidden]
        return image_features.reshape(-1, image_features.shape[-1])
