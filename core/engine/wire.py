"""What crosses between the server's front end and the engine core: plain msgpack values, never pickles.

A message is one msgpack array. Front end -> core: ``[kind, call_id, *args]``; core -> front end:
``["out", records]`` (one per step), ``["state", state]``, ``["reply", call_id, ok, value]``. Requests carry
``SamplingParams`` as a field map, adapters as ``LoRARequest`` field maps, and errors as
``[class name, message, attributes]``, rebuilt on the other side as the same typed exception, so the server maps
them to the same HTTP answers whichever side raised them.

A step record (``ServingCore.step``), per request with news:
``[request_id, finished, samples, prompt_logprobs, first_token_time, error]``, each sample
``[index, new_token_ids, logprobs, finish_reason, stop_reason]``; logprobs are the runner's raw
``[chosen, rank, top_ids, top_lps]`` per new token (None when not asked for).
"""
from __future__ import annotations

import dataclasses

import msgpack

from loraplex import errors as _errors
from loraplex.lora.request import LoRARequest
from loraplex.sampling_params import RequestOutputKind, SamplingParams

_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# ---------------------------------------------------------------------- requests
def params_to_wire(params: SamplingParams) -> dict:
    d = {name: getattr(params, name) for name in _PARAM_FIELDS}
    d["output_kind"] = params.output_kind.value
    return d


def params_from_wire(d: dict) -> SamplingParams:
    d = dict(d)
    d["output_kind"] = RequestOutputKind(d["output_kind"])
    return SamplingParams(**d)


def lora_to_wire(req: LoRARequest | None) -> list | None:
    if req is None:
        return None
    if req.tensors is not None:
        raise ValueError("an adapter given as in-memory tensors cannot be sent to the engine process")
    return [req.lora_name, req.lora_int_id, req.lora_path, req.base_model_name, req.load_inplace,
            list(req.allowed_paths) if req.allowed_paths is not None else None]


def lora_from_wire(v: list | None) -> LoRARequest | None:
    if v is None:
        return None
    name, lora_id, path, base, inplace, allowed = v
    return LoRARequest(name, lora_id, path, base_model_name=base, load_inplace=inplace,
                       allowed_paths=tuple(allowed) if allowed is not None else None)


# The processor outputs a tower takes, and their dtypes as numpy names them (bool and float32 both travel).
MM_TENSORS = ("pixel_values", "input_features", "input_features_mask")


def mm_to_wire(mm: dict | None):
    """Processed multi-modal inputs: each tensor as [shape, dtype name, raw bytes]; modalities as a list."""
    if mm is None:
        return None
    out = {"modalities": list(mm.get("modalities", ()))}
    for key in MM_TENSORS:
        if key in mm:
            t = mm[key].contiguous()
            out[key] = [list(t.shape), str(t.dtype).removeprefix("torch."), t.numpy().tobytes()]
    return out


def mm_from_wire(v):
    if v is None:
        return None
    import numpy as np
    import torch

    out = {"modalities": tuple(v["modalities"])}
    for key in MM_TENSORS:
        if key in v:
            shape, dtype, data = v[key]
            out[key] = torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy())
    return out


# ---------------------------------------------------------------------- errors
class EngineCoreError(_errors.LoraplexError):
    """An error of the engine process with no typed counterpart here (HTTP 500); its text names the type."""


_ERROR_TYPES = {cls.__name__: cls for cls in vars(_errors).values()
                if isinstance(cls, type) and issubclass(cls, _errors.LoraplexError)}
_ERROR_TYPES[EngineCoreError.__name__] = EngineCoreError
_PLAIN = (str, int, float, bool, type(None))


def error_to_wire(exc: BaseException) -> list:
    if type(exc).__name__ in _ERROR_TYPES:
        attrs = {k: v for k, v in vars(exc).items() if isinstance(v, _PLAIN)}
        return [type(exc).__name__, str(exc), attrs]
    # Not one of ours: a bug or an environment failure. Its text may carry another request's data, so only
    # the type travels (the engine process logs the whole error).
    return [EngineCoreError.__name__, f"The engine failed ({type(exc).__name__}); see the server log", {}]


def error_from_wire(v: list) -> Exception:
    name, message, attrs = v
    cls = _ERROR_TYPES.get(name, EngineCoreError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(attrs)
    return exc
