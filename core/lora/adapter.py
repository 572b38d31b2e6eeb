"""LoRAModel: a PEFT adapter validated against the base model and packed into our layers' slot layout."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from loraplex.errors import LoRALoadError, LoRARankError
from loraplex.lora.request import LoRARequest

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rule: a pattern matches a module when the module's dotted name ends with it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def validate_config(config: dict, name: str) -> None:
    def fail(msg: str):
        raise LoRALoadError(f"adapter '{name}': {msg}", name)

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        fail(f"peft_type {peft_type!r} is not supported (only LORA)")
    if config.get("bias", "none") not in ("none", None):
        fail(f"bias={config.get('bias')!r} is not supported (only 'none')")
    if config.get("use_dora"):
        fail("use_dora=True (DoRA) is not supported")
    if config.get("modules_to_save"):
        fail(f"modules_to_save={config['modules_to_save']!r} is not supported (it would replace base weights)")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        fail(f"r must be a positive int, got {r!r}")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        for t in targets:
            if t.split(".")[-1] not in _ALL_MODULES:
                fail(f"target module {t!r} does not exist in the model (LoRA-capable modules: "
                     f"{', '.join(_ALL_MODULES)})")


@dataclass(eq=False)
class LoRAModel:
    name: str
    lora_int_id: int
    version: int
    request: LoRARequest
    rank: int = 0
    # (layer index, packed module attribute) -> (A [num_slices, r, in], B [out_total, r]), B pre-scaled
    weights: dict | None = field(default=None, repr=False)
    num_bytes: int = 0

    @property
    def path(self) -> str:
        return self.request.lora_path

    @property
    def is_materialized(self) -> bool:
        return self.weights is not None


def pack_adapter(model, config: dict, tensors: dict[str, torch.Tensor], name: str, max_lora_rank: int,
                 dtype: torch.dtype, pin: bool) -> tuple[dict, int]:
    """Validate every tensor against the model and pack them per layer; returns (weights, max rank)."""
    validate_config(config, name)
    num_layers = model.cfg.num_hidden_layers
    alpha_default = config.get("lora_alpha", config["r"])
    rslora = bool(config.get("use_rslora", False))
    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            module = key.split(".lora_")[0].split(".")[-1] if ".lora_" in key else key
            raise LoRALoadError(f"adapter '{name}': module {module!r} ({key}) is not supported; LoRA-capable "
                                f"modules are {', '.join(_ALL_MODULES)}", name)
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in model.LORA_MODULES:
            raise LoRALoadError(f"adapter '{name}': target module {module!r} does not exist in the model", name)
        if layer >= num_layers:
            raise LoRALoadError(f"adapter '{name}': layer {layer} of {module} does not exist (the base model has "
                                f"{num_layers} layers; was it trained for another model?)", name)
        modules.setdefault((layer, module), {})[ab] = tensor
    if not modules:
        raise LoRALoadError(f"adapter '{name}': no LoRA weights found", name)
    packed: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    max_rank = 0
    for (layer, module), ab in sorted(modules.items()):
        where = f"adapter '{name}', layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise LoRALoadError(f"{where}: lora_A and lora_B must both be present", name)
        a, b = ab["A"], ab["B"]
        linear = model.lora_layer(layer, module)
        out_size = linear.out_sizes[linear.slice_of(module)]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != linear.in_features or b.shape != (out_size, rank):
            raise LoRALoadError(
                f"{where}: shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base model (expected A "
                f"[r, {linear.in_features}] and B [{out_size}, r]); was it trained for another model?", name)
        if rank > max_lora_rank:
            raise LoRARankError(f"{where}: rank {rank} exceeds max_lora_rank {max_lora_rank}", name)
        module_key = f"model.layers.{layer}.{module}"
        alpha = _pattern_value(config.get("alpha_pattern"), module_key, alpha_default)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        packed.setdefault((layer, model.LORA_MODULES[module]), {})[module] = (a, b.float() * scale)
        max_rank = max(max_rank, rank)
    weights = {}
    for (layer, attr), per_module in packed.items():
        linear = model.lora_layer(layer, next(iter(per_module)))
        r = max(a.shape[0] for a, _ in per_module.values())
        a_all = torch.zeros(len(linear.out_sizes), r, linear.in_features, dtype=dtype)
        b_all = torch.zeros(linear.out_features, r, dtype=dtype)
        for module, (a, b) in per_module.items():
            i = linear.slice_of(module)
            a_all[i, : a.shape[0]] = a.to(dtype)
            b_all[linear.offsets[i]: linear.offsets[i + 1], : b.shape[1]] = b.to(dtype)
        if pin:
            a_all, b_all = a_all.pin_memory(), b_all.pin_memory()
        weights[(layer, attr)] = (a_all, b_all)
    if any(torch.isnan(w).any() or torch.isinf(w).any() for pair in weights.values() for w in pair):
        raise LoRALoadError(f"adapter '{name}': weights contain NaN or Inf", name)
    return weights, max_rank
