"""Granite Speech (``GraniteSpeechForConditionalGeneration``): a Conformer speech encoder and a Q-Former projector
in front of our Granite decoder.

As for LLaVA (core/models/llava.py), the encoder and the projector are transformers' own modules built from the
checkpoint's config, so the checkpoint loads unchanged and they compute what HF computes; the decoder is ours.
The processor turns each clip into log-mel frames (``input_features`` [num clips, frames, 160], padded to the
longest clip of the prompt) and expands ``<|audio|>`` into one token per projector output row; the rows that
belong to a clip are ``input_features_mask``. The features are scattered into the prefill's embeddings at those
placeholders, and Granite's embedding multiplier applies to them too (HF's order).
"""
from __future__ import annotations

import torch

from loraplex.models.config import ModelConfig
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.tower_lora import TowerLoRA


class GraniteSpeechForConditionalGeneration(LlamaForCausalLM):
    # Checkpoint name prefixes of the tower parts; everything else is the decoder's, under whichever of the names
    # transformers versions give it (IBM's language_model.model.* / language_model.lm_head.*, later 5.x's
    # model.language_model.* / lm_head.*, and the H200 image's 5.17, which nests one "model." deeper).
    TOWER_PREFIXES = {"model.encoder.": "encoder", "encoder.": "encoder", "model.projector.": "projector",
                      "projector.": "projector"}

    def __init__(self, cfg: ModelConfig, hf_config, attn_backend: str = "auto", dtype=None, device=None):
        super().__init__(cfg, attn_backend=attn_backend, dtype=dtype, device=device)
        from transformers.models.granite_speech.modeling_granite_speech import (GraniteSpeechCTCEncoder,
                                                                                GraniteSpeechEncoderProjector)

        self.audio_token_id = cfg.audio_token_id
        with torch.device(device if device is not None else "cpu"):
            self.encoder = GraniteSpeechCTCEncoder(hf_config.encoder_config).to(dtype)
            self.projector = GraniteSpeechEncoderProjector(hf_config).to(dtype)
        for p in list(self.encoder.parameters()) + list(self.projector.parameters()):
            p.requires_grad_(False)
        self.tower_lora = TowerLoRA({"encoder.": self.encoder, "projector.": self.projector})

    @property
    def mm_token_id(self) -> int:
        return self.audio_token_id

    def tower_parts(self) -> dict[str, torch.nn.Module]:
        return {"encoder": self.encoder, "projector": self.projector}

    def tower_lora_targets(self) -> dict[str, tuple[int, int]]:
        """Linears of the encoder and projector that adapters may target: PEFT path -> (in, out)."""
        return self.tower_lora.targets()

    @staticmethod
    def tower_aliases(path: str) -> tuple[str, ...]:
        return (path,)

    @classmethod
    def checkpoint_name(cls, name: str) -> tuple[str, str]:
        """(part, name inside it): part is "encoder", "projector" or "lm" (names as a causal LM checkpoint's)."""
        for prefix, part in cls.TOWER_PREFIXES.items():
            if name.startswith(prefix):
                return part, name[len(prefix):]
        rest = name.replace("language_model.", "", 1)
        while rest.startswith("model."):
            rest = rest[len("model."):]
        return "lm", rest if rest.startswith("lm_head.") else "model." + rest

    @torch.inference_mode()
    def encode_mm(self, items: list[tuple[dict, dict | None]]) -> list[torch.Tensor]:
        """The audio features of each request: ``items`` are (its mm_inputs, its encoder / projector LoRA or None)
        -> [num audio placeholders, hidden] per request. Requests with the same adapter and the same number of
        frames are encoded together (padding would change a clip's features: the Conformer has no padding mask);
        one adapter per run, since the Q-Former's learned query is shared by every clip."""
        out: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (mm, lora) in enumerate(items):
            groups.setdefault((id(lora), mm["input_features"].shape[1]), []).append(i)
        dev, dtype = self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        for members in groups.values():
            feats = [items[i][0]["input_features"] for i in members]
            lora = items[members[0]][1]
            x = torch.cat(feats).to(dev, dtype)  # [num clips, frames, 160]
            with self.tower_lora.applied([lora] * x.shape[0]):
                hidden = self.encoder(x)
                hidden = getattr(hidden, "last_hidden_state", hidden)  # [num clips, frames / 2, encoder hidden]
                projected = self.projector(hidden)  # [num clips, tokens of the longest, hidden]
            start = 0
            for i, f in zip(members, feats):
                mask = items[i][0]["input_features_mask"].to(dev)  # [clips of this request, tokens]
                out[i] = projected[start:start + f.shape[0]][mask]
                start += f.shape[0]
        return out
