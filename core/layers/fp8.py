"""FP8 (e4m3) weights of a Linear: the weight as float8 codes with a per-output-channel scale, activations
quantized per token or per tensor (dynamically, or with the checkpoint's static input scale), and the product
through ``torch._scaled_mm`` (FP8 tensor cores on Hopper / Ada; the CPU kernel elsewhere in the tests), fp32
accumulation, then the scales. As vLLM's Fp8LinearMethod.

Per-tensor weight scales become per-channel ones when modules are stacked into our packed q/k/v and gate/up (each
module's scale over its rows), which changes no value. Static input scales of stacked modules become their
maximum, as vLLM does, since the packed layer quantizes its input once.
"""
from __future__ import annotations

import torch

from loraplex.errors import UnsupportedModelError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = torch.finfo(torch.float32).eps


def unpack(parts: dict[str, torch.Tensor], shape: tuple[int, int], name: str):
    """(weight [out, in] fp8, scale [out] fp32, input scale fp32 scalar or None) of one HF module."""
    weight, scale = parts.get("weight"), parts.get("weight_scale")
    if weight is None or scale is None:
        raise UnsupportedModelError(f"{name}: an FP8 weight needs weight and weight_scale ({sorted(parts)})")
    if weight.dtype != FP8:
        raise UnsupportedModelError(f"{name}: FP8 weight of dtype {weight.dtype}; only float8_e4m3fn is supported")
    if tuple(weight.shape) != tuple(shape):
        raise UnsupportedModelError(f"{name}: checkpoint shape {tuple(weight.shape)} != model shape {tuple(shape)}")
    if scale.numel() not in (1, shape[0]):
        raise UnsupportedModelError(f"{name}: weight_scale of shape {tuple(scale.shape)}: only per-tensor or "
                                    "per-channel scales are supported")
    scale = scale.float().reshape(-1).expand(shape[0]).contiguous()
    input_scale = parts.get("input_scale")
    return weight, scale, None if input_scale is None else input_scale.float().reshape(-1).max()


def quantize(weight: torch.Tensor):
    """(weight fp8, per-channel scale fp32) of a float [out, in] weight: each row's absmax maps to 448."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)  # [out]
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Weight:
    """The FP8 weight of one Linear, whose buffers ``qweight`` ([out, in] fp8), ``qscale`` ([out] fp32) and, with
    static activation scales, ``qinput_scale`` ([] fp32) it reads.

    :param act_strategy: "token" or "tensor" activation scales; None keeps activations in the model's dtype
        (weight-only FP8: the weight is dequantized for each product).
    """

    def __init__(self, act_strategy: str | None, is_act_dynamic: bool):
        self.act_strategy = act_strategy
        self.is_act_dynamic = is_act_dynamic
        self._is_scaled_mm: dict[tuple, bool] = {}  # (device, dtype) -> whether torch._scaled_mm takes it

    @staticmethod
    def stack(pieces: list[tuple], act_strategy, is_act_dynamic: bool):
        buffers = {"qweight": torch.cat([p[0] for p in pieces]), "qscale": torch.cat([p[1] for p in pieces])}
        if act_strategy is not None and not is_act_dynamic:
            scales = [p[2] for p in pieces]
            if any(s is None for s in scales):
                raise UnsupportedModelError("static FP8 activations need an input_scale for every module")
            buffers["qinput_scale"] = torch.stack(scales).max()
        return Fp8Weight(act_strategy, is_act_dynamic), buffers

    def _input_scale(self, layer, x: torch.Tensor) -> torch.Tensor:
        if not self.is_act_dynamic:
            return layer.qinput_scale.reshape(1, 1).repeat(x.shape[0], 1)  # _scaled_mm takes no 0-strides
        if self.act_strategy == "token":
            amax = x.abs().amax(dim=-1, keepdim=True).float()  # [num_tokens, 1]
        else:
            amax = x.abs().amax().float().reshape(1, 1).repeat(x.shape[0], 1)
        return (amax / FP8_MAX).clamp(min=_MIN_SCALE)

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        w, w_scale = layer.qweight, layer.qscale
        if self.act_strategy is None:
            y = torch.nn.functional.linear(x, self.dequantize(layer, x.dtype))
        else:
            x_scale = self._input_scale(layer, x)  # [num_tokens, 1] fp32
            xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            key = (x.device, x.dtype)
            if key not in self._is_scaled_mm:
                self._is_scaled_mm[key] = _has_scaled_mm(x, w)
            if self._is_scaled_mm[key]:
                y = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                                     out_dtype=x.dtype)
            else:  # the same product in the model's dtype: no FP8 matmul for this device or shape
                y = torch.nn.functional.linear((xq.float() * x_scale).to(x.dtype), self.dequantize(layer, x.dtype))
        return y if layer.bias is None else y + layer.bias

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        return (layer.qweight.float() * layer.qscale[:, None]).to(dtype)


def _has_scaled_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not x.is_cuda:
        return True  # torch's CPU kernel takes any shape and output dtype
    # Row-wise scales need bf16 output on CUDA, dims in multiples of 16, and FP8 tensor cores (sm89+).
    return (x.dtype == torch.bfloat16 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 9))
