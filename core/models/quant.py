"""Quantized bases: which formats load, read once from config.json and EngineArgs.quantization.

- bitsandbytes 4-bit (NF4 / FP4, the QLoRA base), as transformers saves ``BitsAndBytesConfig(load_in_4bit=True)``,
  or a float checkpoint with ``quantization="bitsandbytes"`` (quantized to NF4 as it loads, vLLM's in-flight
  bitsandbytes). Weights: loraplex.layers.bnb4.
- FP8 (e4m3) as compressed-tensors saves it (``format: float-quantized``, the format of llm-compressor's FP8 /
  FP8_DYNAMIC schemes): per-tensor or per-channel weight scales, activations quantized per token or per tensor,
  dynamically or with the checkpoint's static input scale; or a float checkpoint with ``quantization="fp8"`` (per-channel
  weights, per-token dynamic activations). Weights: loraplex.layers.fp8.
- GGUF files of the Llama, Qwen2 and Qwen3 architectures: Q4_0 / Q4_1 / Q8_0 projections stay in their block
  format (loraplex.layers.gguf_quant), other types are dequantized as they load. Other architectures' GGUF files
  load dequantized through transformers.

Only the projections of the decoder layers are quantized; embeddings, norms and the LM head stay float, as the
tools that make these checkpoints leave them. LoRA runs on top in the model's dtype.
"""
from __future__ import annotations

import dataclasses

from loraplex.errors import ConfigError, UnsupportedModelError

# quantization_config["quant_method"] -> why it is refused. Refused at start, before any weight is read: a quantized
# checkpoint loaded as if it were not fails on its first packed tensor, or worse, runs on garbage.
_REFUSED = {
    "fp8": "block-wise FP8 checkpoints (transformers' FineGrainedFP8, weight_scale_inv) are not supported yet; "
           "per-tensor / per-channel FP8 in compressed-tensors format is",
    "gptq": "GPTQ checkpoints are not supported",
    "awq": "AWQ checkpoints are not supported",
}
# EngineArgs.quantization values (vLLM's names): in-flight for a float checkpoint, or the checkpoint's own method.
QUANTIZATION_METHODS = ("bitsandbytes", "fp8", "compressed-tensors")
# Checkpoint tensors beside a quantized Linear's "weight": bitsandbytes' quant state, FP8's scales.
QUANT_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                  "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "weight_scale",
                  "input_scale", "gguf_type")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the base's projections are stored.

    :param method: "bitsandbytes" (4-bit), "fp8" or "gguf".
    :param is_prequantized: the checkpoint holds quantized weights (else a float checkpoint is quantized as it
        loads).
    :param quant_type: bitsandbytes' "nf4" or "fp4". :param blocksize: bitsandbytes' weights per absmax.
    :param weight_strategy: FP8 weight scales, "tensor" or "channel".
    :param act_strategy: FP8 activation scales, "token" or "tensor"; None: weight-only FP8 (activations stay float).
    :param is_act_dynamic: FP8 activation scales computed per step (else the checkpoint's static input_scale).
    """

    method: str = "bitsandbytes"
    is_prequantized: bool = False
    quant_type: str = "nf4"
    blocksize: int = 64
    weight_strategy: str = "channel"
    act_strategy: str | None = "token"
    is_act_dynamic: bool = True


def _method(quant) -> str:
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown").lower()


def quant_spec(hf_config, quantization: str | None) -> QuantSpec | None:
    """The base's quantization, from its config.json and EngineArgs.quantization; None for a float base. Raises
    UnsupportedModelError for a format that cannot load, ConfigError for a quantization that contradicts it."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization={quantization!r} is not supported (supported: "
                          f"{', '.join(QUANTIZATION_METHODS)})", "quantization")
    found = None
    for config in [hf_config] + [getattr(hf_config, n) for n in ("text_config",) if getattr(hf_config, n, None)]:
        quant = getattr(config, "quantization_config", None)
        if quant:
            found = quant if isinstance(quant, dict) else quant.to_dict()
            break
    if found is None:
        if quantization is None:
            return None
        if quantization == "compressed-tensors":
            raise ConfigError("quantization='compressed-tensors' needs a compressed-tensors checkpoint; this one has "
                              "no quantization_config (quantize in flight with 'fp8' or 'bitsandbytes')",
                              "quantization")
        return QuantSpec(method=quantization)
    method = _method(found)
    if method == "bitsandbytes":
        spec = _bnb_spec(found)
    elif method == "compressed-tensors":
        spec = _compressed_tensors_spec(found)
    else:
        raise UnsupportedModelError(f"quantization_config with quant_method {method!r}: "
                                    f"{_REFUSED.get(method, 'quantized checkpoints are not supported')}")
    if quantization not in (None, method, spec.method):
        raise ConfigError(f"quantization={quantization!r}, but the checkpoint is quantized with {method!r}",
                          "quantization")
    return spec


def _bnb_spec(found: dict) -> QuantSpec:
    if found.get("load_in_8bit") or found.get("_load_in_8bit"):
        raise UnsupportedModelError("quantization_config with quant_method 'bitsandbytes': 8-bit (LLM.int8) "
                                    "bases are not supported; 4-bit (NF4 / FP4) are")
    quant_type = found.get("bnb_4bit_quant_type", "nf4")
    if quant_type not in ("nf4", "fp4"):
        raise UnsupportedModelError(f"bitsandbytes bnb_4bit_quant_type {quant_type!r} is not supported")
    if found.get("llm_int8_skip_modules"):
        raise UnsupportedModelError("bitsandbytes llm_int8_skip_modules is not supported: which of our packed "
                                    f"linears stay float would differ ({found['llm_int8_skip_modules']})")
    return QuantSpec(method="bitsandbytes", quant_type=quant_type, is_prequantized=True)


def _compressed_tensors_spec(found: dict) -> QuantSpec:
    def refuse(why: str):
        raise UnsupportedModelError(f"quantization_config with quant_method 'compressed-tensors': {why}")

    groups = found.get("config_groups") or {}
    if len(groups) != 1:
        refuse(f"{len(groups)} config groups; one FP8 scheme for every Linear is supported")
    group = next(iter(groups.values()))
    fmt = group.get("format") or found.get("format")
    if fmt != "float-quantized":
        refuse(f"format {fmt!r} is not supported yet (only 'float-quantized', FP8)")
    if list(group.get("targets") or []) != ["Linear"]:
        refuse(f"targets {group.get('targets')!r}; only ['Linear'] is supported")
    ignore = [m for m in found.get("ignore") or [] if m != "lm_head"]
    if ignore:
        refuse(f"ignore {ignore[:3]!r}: only the LM head may stay unquantized")
    if found.get("kv_cache_scheme") or group.get("output_activations"):
        refuse("an FP8 KV cache / output activations are not supported yet")
    weights = group.get("weights") or {}
    if (weights.get("num_bits"), weights.get("type"), weights.get("symmetric", True)) != (8, "float", True) or (
            weights.get("strategy") not in ("tensor", "channel") or weights.get("dynamic")):
        refuse(f"weights {weights!r}: only symmetric 8-bit float with per-tensor or per-channel scales")
    acts = group.get("input_activations")
    if acts is not None and ((acts.get("num_bits"), acts.get("type")) != (8, "float") or (
            acts.get("strategy") not in ("token", "tensor")) or (acts.get("strategy") == "token"
                                                                  and not acts.get("dynamic"))):
        refuse(f"input_activations {acts!r}: only 8-bit float, per token (dynamic) or per tensor")
    return QuantSpec(method="fp8", is_prequantized=True, weight_strategy=weights["strategy"],
                     act_strategy=acts["strategy"] if acts else None,
                     is_act_dynamic=bool(acts.get("dynamic")) if acts else True)
