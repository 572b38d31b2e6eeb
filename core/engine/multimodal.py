"""MultiModalPrompts: a multi-modal model's prompts as the engine takes them (vLLM's ``multi_modal_data``).

The model's own HF processor expands each placeholder and makes the tower's inputs; processed inputs (the server's
front end runs the processor) are checked against the model; ``default_mm_loras`` picks a request's adapter.
"""
from __future__ import annotations

import logging

from loraplex.errors import InvalidRequestError, UnsupportedArgumentError
from loraplex.lora.request import LoRARequest

logger = logging.getLogger("loraplex.engine")

DEFAULT_MM_LORA_ID = 2**31 - 1  # default_mm_loras take ids counting down from here, far above users'


def _as_list(x) -> list:
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) and not _is_audio_item(x) else [x])


def _is_audio_item(x) -> bool:
    """vLLM's audio item: ``(array, sample_rate)``."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) and not isinstance(x[0], (int, float))


def _audio_for(processor, item, where: str):
    """An audio item as the processor takes it: a mono float32 array at the processor's sampling rate."""
    import numpy as np
    import torch

    if not _is_audio_item(item):
        raise InvalidRequestError(f"{where}: an audio item is (array, sample_rate), got {type(item).__name__}")
    array, rate = item
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:  # [channels, samples] -> mono
        array = array.mean(axis=0 if array.shape[0] <= array.shape[1] else 1)
    if array.ndim != 1 or array.size == 0:
        raise InvalidRequestError(f"{where}: audio must be a non-empty 1-D (or [channels, samples]) array")
    if not np.isfinite(array).all():
        raise InvalidRequestError(f"{where}: audio holds NaN or infinite samples")
    if not 1000 <= rate <= 384000:
        raise InvalidRequestError(f"{where}: sample rate {rate} is out of range")
    extractor = getattr(processor, "audio_processor", None) or getattr(processor, "feature_extractor", None)
    target = getattr(extractor, "sampling_rate", None)
    if target is not None and int(rate) != int(target):
        import torchaudio

        array = torchaudio.functional.resample(torch.from_numpy(array), int(rate), int(target)).numpy()
    return array


def run_processor(processor, text: str, images=None, audios=None) -> tuple[list[int], dict | None]:
    """The model's HF processor over one prompt: ``images`` (PIL images), ``audios`` (``(array, sample_rate)``,
    resampled to the processor's rate) -> (expanded token ids, mm_inputs or None when there is no media).
    ``mm_inputs`` holds the processor's tensors for the tower (``pixel_values``; ``input_features`` and
    ``input_features_mask``) and ``modalities``, the modalities present. Raises InvalidRequestError when the
    processor refuses the prompt (a placeholder count that does not match the media, a wrong image type...)."""
    images, audios = _as_list(images), _as_list(audios)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if audios:
        kwargs["audio"] = [_audio_for(processor, a, f"audio {i}") for i, a in enumerate(audios)]
    try:
        # One prompt: nothing to pad (and a tokenizer without a pad token would refuse Granite's padding=True).
        out = processor(text=text, return_tensors="pt", padding=False, **kwargs)
    except InvalidRequestError:
        raise
    except Exception as e:
        raise InvalidRequestError(f"the model's processor refused the prompt: {type(e).__name__}: {e}") from None
    ids = out["input_ids"][0].tolist()
    if not kwargs:
        return ids, None
    mm = {"modalities": tuple(m for m, items in (("image", images), ("audio", audios)) if items)}
    for key in ("pixel_values", "input_features", "input_features_mask"):
        if key in out:
            mm[key] = out[key]
    return ids, mm


class MultiModalPrompts:
    def __init__(self, model_config, processor, tokens_per_image: int | None, args):
        self.model_config = model_config
        self.processor = processor
        self.tokens_per_image = tokens_per_image
        self.limits = dict(args.limit_mm_per_prompt or {})
        # Named after the modality, as vLLM names them.
        self.default_loras = {m: LoRARequest(m, DEFAULT_MM_LORA_ID - i, path)
                              for i, (m, path) in enumerate(sorted((args.default_mm_loras or {}).items()))}

    def _check_count(self, modality: str, num_items: int) -> None:
        limit = self.limits.get(modality)
        if limit is not None and num_items > limit:
            raise InvalidRequestError(f"At most {limit} {modality}(s) may be provided in one prompt, got {num_items}")

    def process(self, prompt: dict) -> tuple[str, list[int], dict | None]:
        """``{"prompt": text with placeholders, "multi_modal_data": {"image": image or [images], "audio":
        (array, sample_rate) or [those]}}`` -> (text, expanded ids, mm_inputs or None without media)."""
        for key in prompt:
            if key not in ("prompt", "multi_modal_data"):
                raise UnsupportedArgumentError(key, "a multi-modal prompt takes 'prompt' and 'multi_modal_data'")
        text, data = prompt.get("prompt"), prompt["multi_modal_data"]
        if not isinstance(text, str):
            raise InvalidRequestError("a multi-modal prompt needs a text 'prompt' with the model's placeholders "
                                      "(the processor expands them)")
        if not isinstance(data, dict):
            raise InvalidRequestError(f"multi_modal_data must be a dict of modality -> data, got {type(data).__name__}")
        allowed = self.model_config.modalities
        for modality in data:
            if modality not in allowed:
                raise InvalidRequestError(f"multi_modal_data[{modality!r}]: this model takes {', '.join(allowed)}")
        images, audios = _as_list(data.get("image")), _as_list(data.get("audio"))
        self._check_count("image", len(images))  # before the processor spends time on too many
        self._check_count("audio", len(audios))
        if self.processor is None:
            raise InvalidRequestError("this engine has no processor (skip_tokenizer_init=True)")
        ids, mm = run_processor(self.processor, text, images, audios)
        if mm is not None:
            self.check(ids, mm)
        return text, ids, mm

    def check(self, ids: list[int], mm_inputs: dict) -> None:
        """Processed inputs must fit the model: its modality, the item limits, one placeholder per feature row."""
        cfg = self.model_config
        if cfg.image_token_id is not None:
            pixels = mm_inputs.get("pixel_values")
            if pixels is None or pixels.dim() != 4:
                raise InvalidRequestError("mm_inputs needs 'pixel_values' [num_images, channels, height, width]")
            self._check_count("image", pixels.shape[0])
            want, token, what = pixels.shape[0] * self.tokens_per_image, cfg.image_token_id, f"{pixels.shape[0]} image(s)"
        else:
            feats, mask = mm_inputs.get("input_features"), mm_inputs.get("input_features_mask")
            if feats is None or feats.dim() != 3 or mask is None or mask.dim() != 2 or mask.shape[0] != feats.shape[0]:
                raise InvalidRequestError("mm_inputs needs 'input_features' [num_clips, frames, features] and "
                                          "'input_features_mask' [num_clips, tokens]")
            self._check_count("audio", feats.shape[0])
            want, token, what = int(mask.sum()), cfg.audio_token_id, f"{feats.shape[0]} audio clip(s)"
        got = sum(1 for t in ids if t == token)
        if got != want:
            raise InvalidRequestError(f"the prompt has {got} placeholder tokens; its {what} need {want}")
    def default_lora(self, mm_inputs: dict) -> LoRARequest | None:
        """vLLM's default_mm_loras: a request that names no adapter and carries a modality with a default adapter
        runs with it (the caller keeps a request's own). A prompt carrying two such modalities gets none: one
        adapter per request, as vLLM."""
        present = [m for m in mm_inputs.get("modalities", ()) if m in self.default_loras]
        if len(present) != 1:
            if present:
                logger.warning("a prompt carries %s, each with a default adapter; one adapter per request: none "
                               "is applied", ", ".join(present))
            return None
        return self.default_loras[present[0]]
