"""Which names the server answers to: the base model's aliases and the adapters in the engine.

The engine's LoRA registry is the single source of truth; this module reads its snapshot (published
by the engine side) for fast checks, and the engine side checks again when it acts, so an adapter
unloaded in between gives a clean 404 rather than a silent reload.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from loraplex.errors import LoRAAlreadyLoadedError, LoRADisabledError, LoRAError, LoRANotFoundError
from loraplex.lora.peft_loader import locate
from loraplex.lora.request import LoRARequest
from loraplex.server.errors import APIError

logger = logging.getLogger("loraplex.server")


def parse_lora_module(spec) -> tuple[str, str, str | None]:
    """``name=path``, a JSON object string, or a dict ``{"name", "path", "base_model_name"}``."""
    if isinstance(spec, LoRARequest):
        return spec.lora_name, spec.lora_path, spec.base_model_name
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"--lora-modules: invalid JSON {spec!r}: {e}") from None
    if isinstance(spec, dict):
        name, path = spec.get("name"), spec.get("path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"--lora-modules: a JSON module needs non-empty 'name' and 'path', got {spec!r}")
        return name, path, spec.get("base_model_name")
    if isinstance(spec, str) and "=" in spec:
        name, path = spec.split("=", 1)
        if name and path:
            return name, path, None
    raise ValueError(f"--lora-modules: expected name=path or a JSON object, got {spec!r}")


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


class ModelRegistry:
    def __init__(self, aengine, served_names: list[str], model_root: str, *, allow_runtime_updates: bool,
                 allowed_lora_paths: list[str] | None = None, lora_resolution=None):
        self.aengine = aengine
        self.served_names = served_names
        self.base_name = served_names[0]
        self.aliases = set(served_names) | {model_root}
        self.model_root = model_root
        self.max_model_len = aengine.max_model_len
        self.lora_enabled = aengine.is_lora_enabled
        self.allow_runtime_updates = allow_runtime_updates
        self.allowed_roots = [os.path.realpath(os.path.expanduser(p)) for p in allowed_lora_paths or []]
        self._resolution = lora_resolution
        self.created = int(time.time())

    # ------------------------------------------------------------------ names
    def not_found(self, model: str) -> APIError:
        names = self.served_names + sorted(self.aengine.adapters)
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return APIError(404, f"The model `{model}` does not exist. Valid aliases: {shown}", "NotFoundError",
                        param="model")

    def known_label(self, model) -> str | None:
        """The metrics label of a request's ``model`` when it names something served now (the base, an alias, a
        loaded adapter), else None: names nobody serves must not mint metric series."""
        if model is None:
            return self.base_name
        if isinstance(model, str) and (model in self.aliases or model in self.aengine.adapters):
            return model
        return None

    async def lora_for(self, model: str | None) -> str | None:
        """The adapter a request's ``model`` names, None for the base; resolves unknown names if allowed."""
        if model is None or model in self.aliases:
            return None
        if model in self.aengine.adapters:
            return model
        if self.allow_runtime_updates and self.lora_enabled:
            await self._resolve(model)
            return model
        raise self.not_found(model)

    async def _resolve(self, name: str) -> None:
        if self._resolution is None:
            from loraplex.lora.resolution import LoRAResolution

            self._resolution = LoRAResolution()
        try:
            req = await self._resolution.resolve(self.base_name, name)
        except LoRANotFoundError as e:
            logger.info("adapter %r not resolved: %s", name, e)
            raise self.not_found(name) from None
        except LoRAError as e:
            raise APIError(400, f"LoRA adapter '{name}' was found but could not be loaded.") from e
        req = dataclasses.replace(req, lora_name=name, load_inplace=False)
        try:
            # Queued in the loaders (a concurrent request may have queued or added it already): the engine keeps
            # stepping while it loads.
            await self.aengine.add_resolved(req)
        except LoRAError as e:
            logger.warning("resolved adapter %r at %s failed to load: %s", name, req.lora_path, e)
            raise APIError(400, f"LoRA adapter '{name}' was found but could not be loaded.") from e

    # ------------------------------------------------------------------ listing
    def list_models(self) -> dict:
        permission = [{"id": f"modelperm-{self.base_name}", "object": "model_permission", "created": self.created,
                       "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                       "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                       "organization": "*", "group": None, "is_blocking": False}]
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                 "root": self.model_root, "parent": None, "max_model_len": self.max_model_len,
                 "permission": permission} for name in self.served_names]
        for name, req in sorted(self.aengine.adapters.items()):
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                         "root": req.lora_path, "parent": req.base_model_name or self.base_name,
                         "max_model_len": None, "permission": permission})
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ adapter management
    @staticmethod
    def check_value(param: str, value) -> str:
        """A name or path from a request: a non-empty string the OS can take (never a 500 further on)."""
        if not isinstance(value, str) or not value:
            raise APIError(400, f"'{param}' must be a non-empty string", param=param)
        if "\x00" in value:
            raise APIError(400, f"'{param}' must not contain NUL bytes", param=param)
        try:
            os.fsencode(value)
        except UnicodeError:
            raise APIError(400, f"'{param}' is not a valid path string (it holds a lone surrogate)",
                           param=param) from None
        return value

    def locate(self, name: str, path: str) -> str:
        """The path a runtime load reads: with --allowed-lora-paths a relative path is looked up under the
        allowed roots (never the CWD) and one that is not there is a 404, never a Hub repo id. Without it the
        path is used as given (vLLM's behaviour): relative to the server's CWD, and one that is no local
        directory but looks like ``org/name[/sub]`` is downloaded from the Hugging Face Hub (peft_loader)."""
        if not self.allowed_roots:
            return path
        located = locate(path, self.allowed_roots)
        if located is None:
            raise APIError(404, f"Loading lora {name} failed: No adapter found for {path} under the directories "
                           "allowed by --allowed-lora-paths", "NotFoundError", param="lora_path")
        return located

    def check_path(self, path: str) -> None:
        if not self.allowed_roots:
            return
        real = os.path.realpath(os.path.expanduser(path))
        # Files inside are checked too: a symlinked weight file could expose any file on the host. The loader
        # checks the files it opens again at every (re)load (LoRARequest.allowed_paths).
        inside = [real]
        if os.path.isdir(real):
            try:
                inside += [os.path.realpath(e.path) for e in os.scandir(real)]
            except OSError:
                pass  # unreadable: the loader fails it with its own error
        if not all(_inside(p, self.allowed_roots) for p in inside):
            raise APIError(403, f"lora_path '{path}' is outside the directories allowed by --allowed-lora-paths",
                           param="lora_path")

    async def load(self, name: str, path: str, load_inplace: bool) -> None:
        name, path = self.check_value("lora_name", name), self.check_value("lora_path", path)
        if name in self.aliases:
            raise APIError(400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput")
        path = self.locate(name, path)
        self.check_path(path)
        if not self.lora_enabled:
            raise APIError(400, "LoRA is not enabled on this server; start it with --enable-lora")
        try:
            # Loaded by the loaders, not the engine loop: running streams keep their pace.
            await self.aengine.load_adapter(name, path, load_inplace, self.allowed_roots or None)
        except LoRAAlreadyLoadedError as e:
            raise APIError(400, str(e), "InvalidUserInput") from None
        except LoRANotFoundError:
            raise APIError(404, f"Loading lora {name} failed: No adapter found for {path}") from None
        except LoRAError as e:
            raise APIError(400, f"Loading lora {name} failed: {e}") from None

    async def unload(self, name: str) -> None:
        try:
            await self.aengine.unload_adapter(name)
        except (LoRANotFoundError, LoRADisabledError):
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError") from None
