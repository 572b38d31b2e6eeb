"""TowerLoRA: LoRA on the transformers modules a multi-modal model reuses for its tower and connector.

The tower (vision or speech encoder) and the connector (projector, Q-Former) are transformers' own modules, so
their Linears are plain ``nn.Linear``: a forward hook on each adds ``x·A·B`` of the adapter of the items being
encoded. One tower run may encode the media of several requests, each with its own adapter (or none): the
items are laid out along dim 0 in request order, and each hook adds each adapter's delta to its requests' rows.
A Linear whose dim 0 is not a multiple of the items (a Q-Former's learned query, shared by all) can only take
one adapter per run: the model runs such towers once per adapter group.
"""
from __future__ import annotations

import contextlib

import torch


class TowerLoRA:
    def __init__(self, roots: dict[str, torch.nn.Module]):
        """``roots``: path prefix (``"vision_tower."``) -> module; every Linear under them may take LoRA."""
        self.linears: dict[str, torch.nn.Linear] = {}
        for prefix, root in roots.items():
            for name, module in root.named_modules():
                if isinstance(module, torch.nn.Linear):
                    self.linears[prefix + name] = module
        # (num_items, [(first item, end item, {path: (A [r, in], B [out, r] scaled)})]) of the run in progress.
        self._active: tuple[int, list] | None = None
        for path, linear in self.linears.items():
            linear.register_forward_hook(self._hook(path))

    def targets(self) -> dict[str, tuple[int, int]]:
        """PEFT path -> (in_features, out_features) of every Linear adapters may target."""
        return {path: (m.in_features, m.out_features) for path, m in self.linears.items()}

    @contextlib.contextmanager
    def applied(self, loras: list[dict | None]):
        """Run the tower with item i under ``loras[i]`` (path -> (A, B) on the tower's device and dtype, or None)."""
        runs, start = [], 0
        for i in range(1, len(loras) + 1):
            if i == len(loras) or loras[i] is not loras[start]:
                if loras[start]:
                    runs.append((start, i, loras[start]))
                start = i
        self._active = (len(loras), runs) if runs else None
        try:
            yield
        finally:
            self._active = None

    def _hook(self, path: str):
        def hook(module, inputs, output):
            active = self._active
            if active is None:
                return None
            num_items, runs = active
            x = inputs[0]
            if len(runs) == 1 and runs[0][:2] == (0, num_items):
                lora = runs[0][2]
                if path not in lora:
                    return None
                a, b = lora[path]
                return output + (x @ a.t()) @ b.t()
            rows, rem = divmod(x.shape[0], num_items)
            if rem:
                raise RuntimeError(f"tower LoRA on {path}: {x.shape[0]} rows for {num_items} items of several "
                                   "adapters; run this tower once per adapter")
            for first, end, lora in runs:
                if path in lora:
                    a, b = lora[path]
                    sl = slice(first * rows, end * rows)
                    output[sl] += (x[sl] @ a.t()) @ b.t()
            return output
        return hook
