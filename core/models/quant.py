"""Quantized bases: which formats load, and the 4-bit weight of a Linear (bitsandbytes NF4 / FP4, the QLoRA base).

A checkpoint saved by transformers with ``BitsAndBytesConfig(load_in_4bit=True)`` keeps each quantized Linear as
packed 4-bit codes (``weight``, uint8) plus its quantization state (``weight.absmax``, ``weight.quant_map``,
with double quantization ``weight.nested_absmax`` / ``weight.nested_quant_map``, and
``weight.quant_state.bitsandbytes__nf4``). A float checkpoint with ``quantization="bitsandbytes"`` is quantized
to NF4 as it loads (vLLM's in-flight bitsandbytes). The codes stay 4-bit on the device; LoRA runs on top in the
model's dtype, as in QLoRA.

Our packed linears (q/k/v, gate/up) hold several HF modules. A 4-bit code block covers ``blocksize`` consecutive
weights of the row-major [out, in] matrix, so stacking modules by rows stacks their codes and their per-block
absmax: the packed layer is one quantized matrix, dequantized to exactly the values of its parts. Double
quantization's nested absmax has one offset per module, so it is undone here (to fp32 absmax, as bitsandbytes
itself computes it before dequantizing): 4 bytes per 64 weights instead of about 1.
"""
from __future__ import annotations

import dataclasses

import torch

from loraplex.errors import ConfigError, UnsupportedModelError

# quantization_config["quant_method"] -> why it is refused. Refused at start, before any weight is read: a quantized
# checkpoint loaded as if it were not fails on its first packed tensor, or worse, runs on garbage.
_REFUSED = {
    "fp8": "FP8 checkpoints are not supported yet; load the bf16 base",
    "compressed-tensors": "compressed-tensors (FP8 / INT8 / W4A16) checkpoints are not supported yet",
    "gptq": "GPTQ checkpoints are not supported",
    "awq": "AWQ checkpoints are not supported",
}
# EngineArgs.quantization values (vLLM's names).
QUANTIZATION_METHODS = ("bitsandbytes",)
# The tensors a bitsandbytes 4-bit Linear saves beside its packed "weight".
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                  "quant_state.bitsandbytes__fp4")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the base's Linears are stored. :param is_prequantized: the checkpoint holds 4-bit codes (else a float
    checkpoint is quantized as it loads). :param quant_type: "nf4" or "fp4". :param blocksize: weights per absmax."""

    method: str = "bitsandbytes"
    quant_type: str = "nf4"
    blocksize: int = 64
    is_prequantized: bool = False


def _method(quant) -> str:
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown").lower()


def quant_spec(hf_config, quantization: str | None) -> QuantSpec | None:
    """The base's quantization, from its config.json and EngineArgs.quantization; None for a float base. Raises
    UnsupportedModelError for a format that cannot load, ConfigError for a quantization that contradicts it."""
    found = None
    for config in [hf_config] + [getattr(hf_config, n) for n in ("text_config",) if getattr(hf_config, n, None)]:
        quant = getattr(config, "quantization_config", None)
        if quant:
            found = quant if isinstance(quant, dict) else quant.to_dict()
            break
    if found is None:
        if quantization is None:
            return None
        if quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"quantization={quantization!r} is not supported (supported: "
                              f"{', '.join(QUANTIZATION_METHODS)})")
        return QuantSpec(method=quantization)
    method = _method(found)
    if method != "bitsandbytes":
        raise UnsupportedModelError(f"quantization_config with quant_method {method!r}: "
                                    f"{_REFUSED.get(method, 'quantized checkpoints are not supported')}")
    if quantization not in (None, method):
        raise ConfigError(f"quantization={quantization!r}, but the checkpoint is quantized with {method!r}")
    if found.get("load_in_8bit") or found.get("_load_in_8bit"):
        raise UnsupportedModelError("quantization_config with quant_method 'bitsandbytes': 8-bit (LLM.int8) "
                                    "bases are not supported; 4-bit (NF4 / FP4) are")
    quant_type = found.get("bnb_4bit_quant_type", "nf4")
    if quant_type not in ("nf4", "fp4"):
        raise UnsupportedModelError(f"bitsandbytes bnb_4bit_quant_type {quant_type!r} is not supported")
    if found.get("llm_int8_skip_modules"):
        raise UnsupportedModelError("bitsandbytes llm_int8_skip_modules is not supported: which of our packed "
                                    f"linears stay float would differ from the checkpoint ({found['llm_int8_skip_modules']})")
    return QuantSpec(method=method, quant_type=quant_type, is_prequantized=True)


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise UnsupportedModelError("a bitsandbytes 4-bit base needs the bitsandbytes package: "
                                    "pip install 'loraplex[quant]'") from e
    return bitsandbytes


def unpack_prequantized(parts: dict[str, torch.Tensor], shape: tuple[int, int], name: str):
    """(codes [numel / 2] uint8, absmax [numel / blocksize] fp32, quant_type, blocksize) from the tensors one
    bitsandbytes Linear4bit saved (the suffixes of QUANT_SUFFIXES plus "weight")."""
    bnb = _bnb()
    state_key = next((k for k in parts if k.startswith("quant_state.")), None)
    if "weight" not in parts or state_key is None:
        raise UnsupportedModelError(f"{name}: a 4-bit weight without its quantization state ({sorted(parts)})")
    state = bnb.functional.QuantState.from_dict({k: v for k, v in parts.items() if k != "weight"},
                                                torch.device("cpu"))
    if tuple(state.shape) != tuple(shape):
        raise UnsupportedModelError(f"{name}: checkpoint shape {tuple(state.shape)} != model shape {tuple(shape)}")
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = parts["weight"].reshape(-1)
    return codes, absmax.float().reshape(-1), state.quant_type, state.blocksize


def quantize(weight: torch.Tensor, spec: QuantSpec):
    """(codes, absmax fp32) of a float [out, in] weight, as bitsandbytes quantizes a Linear4bit without double
    quantization."""
    bnb = _bnb()
    codes, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=spec.blocksize,
                                                quant_type=spec.quant_type, compress_statistics=False)
    return codes.reshape(-1), state.absmax.float().reshape(-1)


class QuantWeight:
    """A Linear's 4-bit weight: codes and absmax as tensors the module owns (so ``.to(device)`` moves them), and
    the bitsandbytes QuantState built from them once per device."""

    def __init__(self, shape: tuple[int, int], quant_type: str, blocksize: int):
        self.shape = torch.Size(shape)
        self.quant_type = quant_type
        self.blocksize = blocksize
        self._state = None

    def state(self, absmax: torch.Tensor, dtype: torch.dtype):
        if self._state is None or self._state.absmax is not absmax or self._state.dtype != dtype:
            bnb = _bnb()
            code = bnb.functional.get_4bit_type(self.quant_type, device=absmax.device)
            self._state = bnb.functional.QuantState(absmax=absmax, shape=self.shape, code=code,
                                                    blocksize=self.blocksize, quant_type=self.quant_type,
                                                    dtype=dtype)
        return self._state

    def matmul(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        bnb = _bnb()
        return bnb.matmul_4bit(x, codes.view(-1, 1).t(), quant_state=self.state(absmax, x.dtype), bias=bias)

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        bnb = _bnb()
        return bnb.functional.dequantize_4bit(codes.view(-1, 1), self.state(absmax, dtype))
