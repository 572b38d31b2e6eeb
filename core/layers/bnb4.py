"""bitsandbytes 4-bit weights of a Linear (NF4 / FP4, the QLoRA base): codes and absmax as the module's buffers,
the matmul through bitsandbytes' ``matmul_4bit`` (a 4-bit GEMV for one row, dequantize + GEMM for more).

A 4-bit code block covers ``blocksize`` consecutive weights of the row-major [out, in] matrix, so stacking modules
by rows (our packed q/k/v and gate/up) stacks their codes and their per-block absmax: the packed layer is one
quantized matrix, dequantized to exactly the values of its parts. Double quantization's nested absmax has one
offset per module, so it is undone at load (to fp32 absmax, as bitsandbytes itself computes it before
dequantizing): 4 bytes per 64 weights instead of about 1.
"""
from __future__ import annotations

import torch

from loraplex.errors import UnsupportedModelError


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise UnsupportedModelError("a bitsandbytes 4-bit base needs the bitsandbytes package: "
                                    "pip install 'loraplex[quant]'") from e
    return bitsandbytes


def unpack(parts: dict[str, torch.Tensor], shape: tuple[int, int], name: str):
    """(codes [numel / 2] uint8, absmax [numel / blocksize] fp32, quant_type, blocksize) of one HF module from
    the tensors its Linear4bit saved: "weight" and the "weight.<quant state>" ones."""
    bnb = _bnb()
    if "weight" not in parts or not any(k.startswith("weight.quant_state.") for k in parts):
        raise UnsupportedModelError(f"{name}: a 4-bit weight without its quantization state ({sorted(parts)})")
    state = bnb.functional.QuantState.from_dict({k: v for k, v in parts.items() if k != "weight"},
                                                torch.device("cpu"))
    if tuple(state.shape) != tuple(shape):
        raise UnsupportedModelError(f"{name}: checkpoint shape {tuple(state.shape)} != model shape {tuple(shape)}")
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return parts["weight"].reshape(-1), absmax.float().reshape(-1), state.quant_type, state.blocksize


def quantize(weight: torch.Tensor, quant_type: str, blocksize: int):
    """(codes, absmax fp32) of a float [out, in] weight, as bitsandbytes quantizes a Linear4bit without double
    quantization."""
    bnb = _bnb()
    codes, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=False)
    return codes.reshape(-1), state.absmax.float().reshape(-1)


class Bnb4Weight:
    """The 4-bit weight of one Linear, whose buffers ``qcodes`` ([out * in / 2] uint8, two codes a byte) and
    ``qabsmax`` ([out * in / blocksize] fp32) it reads; the QuantState is built once per device and dtype."""

    def __init__(self, shape: tuple[int, int], quant_type: str, blocksize: int):
        self.shape = torch.Size(shape)
        self.quant_type = quant_type
        self.blocksize = blocksize
        self._state = None

    @staticmethod
    def stack(pieces: list[tuple], rows: list[int], in_features: int, names: list[str]):
        """Buffers of a packed layer from its modules' (codes, absmax, quant_type, blocksize)."""
        kinds = {(p[2], p[3]) for p in pieces}
        if len(kinds) != 1:
            raise UnsupportedModelError(f"{'/'.join(names)}: slices quantized differently {sorted(kinds)}")
        quant_type, blocksize = kinds.pop()
        for name, n in zip(names, rows):
            if (n * in_features) % blocksize:
                raise UnsupportedModelError(f"{name}: {n} x {in_features} weights are not whole blocks of "
                                            f"{blocksize}, so its codes cannot be stacked with the other slices'")
        buffers = {"qcodes": torch.cat([p[0] for p in pieces]), "qabsmax": torch.cat([p[1] for p in pieces])}
        return Bnb4Weight((sum(rows), in_features), quant_type, blocksize), buffers

    def _quant_state(self, absmax: torch.Tensor, dtype: torch.dtype):
        if self._state is None or self._state.absmax is not absmax or self._state.dtype != dtype:
            bnb = _bnb()
            code = bnb.functional.get_4bit_type(self.quant_type, device=absmax.device)
            self._state = bnb.functional.QuantState(absmax=absmax, shape=self.shape, code=code,
                                                    blocksize=self.blocksize, quant_type=self.quant_type,
                                                    dtype=dtype)
        return self._state

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]
        state = self._quant_state(layer.qabsmax, x.dtype)
        return _bnb().matmul_4bit(x, layer.qcodes.view(-1, 1).t(), quant_state=state, bias=layer.bias)

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        return _bnb().functional.dequantize_4bit(layer.qcodes.view(-1, 1), self._quant_state(layer.qabsmax, dtype))
