"""LoRARegistry: adapter names, their current version, and versions still loading (engine thread only).

Each load creates a new immutable version. It becomes the name's current version only once it has loaded, so
a failed load or in-place reload leaves the name as it was. A sequence keeps the version it was added with.
"""
from __future__ import annotations

import itertools

from loraplex.errors import LoRAAlreadyLoadedError, LoRANotFoundError
from loraplex.lora.adapter import LoRAModel
from loraplex.lora.request import LoRARequest


def _already_loaded(name: str) -> LoRAAlreadyLoadedError:
    return LoRAAlreadyLoadedError(f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                  "adapter in place, set 'load_inplace' to True.", name)


class LoRARegistry:
    def __init__(self):
        self.current: dict[str, LoRAModel] = {}
        self.pending: dict[str, LoRAModel] = {}  # the newest load of a name, registered when it succeeds
        self.pinned: set[str] = set()
        self._versions = itertools.count(1)
        self.epoch = 0  # bumped whenever `current` changes (snapshots compare it)

    def lookup(self, req: LoRARequest, check_path: bool = True) -> tuple[LoRAModel, bool]:
        """(version, is_new) for a request: the current or loading version when that serves it, else a new
        version the caller must load. With check_path (add_lora), another path under a loaded name raises
        LoRAAlreadyLoadedError; a generation request (check_path=False) runs with the loaded version, as vLLM's
        cache keyed by name and id does."""
        name = req.lora_name
        known = self.pending.get(name) if req.load_inplace else (self.current.get(name) or self.pending.get(name))
        if req.load_inplace and known is not None and known.path == req.lora_path \
                and known.request.tensors is req.tensors:
            return known, False  # the same reload asked for twice while it runs
        if known is not None and not req.load_inplace:
            if check_path and req.lora_path and known.path and req.lora_path != known.path:
                raise _already_loaded(name)
            return known, False
        m = LoRAModel(name, req.lora_int_id, next(self._versions), req)
        self.pending[name] = m
        return m, True

    def commit(self, m: LoRAModel) -> LoRAModel | None:
        """m loaded: make it current if it is still its name's newest load; returns the version it replaced."""
        if self.pending.get(m.name) is not m:
            return None  # removed or superseded meanwhile: it serves only the requests that hold it
        del self.pending[m.name]
        old = self.current.get(m.name)
        self.current[m.name] = m
        self.epoch += 1
        return old

    def forget_pending(self, m: LoRAModel) -> None:
        if self.pending.get(m.name) is m:
            del self.pending[m.name]

    def remove(self, name: str) -> LoRAModel | None:
        self.pending.pop(name, None)
        m = self.current.pop(name, None)
        if m is not None:
            self.pinned.discard(name)
            self.epoch += 1
        return m

    def pin(self, name: str) -> None:
        if name not in self.current:
            raise LoRANotFoundError(f"The lora adapter '{name}' cannot be found.", name)
        self.pinned.add(name)

    def is_pinned(self, m: LoRAModel) -> bool:
        return m.name in self.pinned and self.current.get(m.name) is m

    def name_of(self, lora_int_id: int) -> str | None:
        return next((m.name for m in self.current.values() if m.lora_int_id == lora_int_id), None)
