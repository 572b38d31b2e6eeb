"""GGUF weights of a Linear kept in their llama.cpp block format (Q4_0, Q4_1, Q8_0) on the device.

A row of a GGUF matrix is a run of 32-weight blocks: Q8_0 a float16 scale and 32 int8 (34 bytes), Q4_0 a scale and
16 bytes of 4-bit codes (18 bytes, weight = d * (q - 8)), Q4_1 a scale, a minimum and 16 bytes (20 bytes, weight =
d * q + m), low nibbles first. The layer keeps ``qblocks`` [out, row bytes] uint8 and dequantizes it for each
product, with gguf-py's exact arithmetic (fp32 d * q + m), so the weights equal transformers' dequantized ones.
Rows are independent, so stacking modules by rows (our packed q/k/v, gate/up) and llama.cpp's q/k row
permutation both move whole rows. Other types (the K-quants, ...) are dequantized as the checkpoint loads.
"""
from __future__ import annotations

import torch

# GGMLQuantizationType values -> (name, bytes per 32-weight block)
SUPPORTED = {2: ("Q4_0", 18), 3: ("Q4_1", 20), 8: ("Q8_0", 34)}


def _f16(part: torch.Tensor) -> torch.Tensor:
    return part.contiguous().view(torch.float16).float()  # [..., 2] bytes -> [..., 1]


def dequantize_blocks(blocks: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    """[out, row bytes] uint8 of one of SUPPORTED -> [out, in] in dtype."""
    name, size = SUPPORTED[qtype]
    out = blocks.shape[0]
    b = blocks.view(out, -1, size)  # [out, blocks, bytes]
    if name == "Q8_0":
        w = _f16(b[..., :2]) * b[..., 2:].contiguous().view(torch.int8).float()
    else:
        codes = b[..., 4:] if name == "Q4_1" else b[..., 2:]  # [out, blocks, 16]
        q = torch.cat([codes & 0x0F, codes >> 4], dim=-1).float()  # [out, blocks, 32], low nibbles first
        w = _f16(b[..., :2]) * q + _f16(b[..., 2:4]) if name == "Q4_1" else _f16(b[..., :2]) * (q - 8.0)
    return w.reshape(out, -1).to(dtype)


def unpack(parts: dict[str, torch.Tensor], shape: tuple[int, int], name: str):
    """(blocks [out, row bytes] uint8, GGML type) of one HF module's GGUF weight."""
    blocks, qtype = parts["weight"], int(parts["gguf_type"])
    size = SUPPORTED.get(qtype, (None, None))[1]
    if blocks.shape[0] != shape[0] or (size is not None and blocks.shape[1] != shape[1] // 32 * size):
        raise ValueError(f"{name}: GGUF blocks {tuple(blocks.shape)} do not fit the model shape {tuple(shape)}")
    return blocks, qtype


def dequantize_any(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """[out, in] fp32 of blocks of any GGML type, by gguf-py (as transformers dequantizes)."""
    import gguf

    floats = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(floats.reshape(blocks.shape[0], -1))


class GgufWeight:
    """The GGUF weight of one Linear, whose buffer ``qblocks`` ([out, row bytes] uint8) it reads."""

    def __init__(self, qtype: int):
        self.qtype = qtype

    @staticmethod
    def stack(pieces: list[tuple]):
        """(weight, buffers) of a packed layer from its modules' (blocks, qtype), or None when they are not all of
        one supported type (the caller then loads them dequantized)."""
        types = {p[1] for p in pieces}
        if len(types) != 1 or next(iter(types)) not in SUPPORTED:
            return None
        return GgufWeight(types.pop()), {"qblocks": torch.cat([p[0] for p in pieces])}

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_blocks(layer.qblocks, self.qtype, dtype)

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]; the weight is expanded for this product only.
        return torch.nn.functional.linear(x, self.dequantize(layer, x.dtype), layer.bias)
