"""The built-in adapter loader: a PEFT directory (or hub repo) -> (adapter_config dict, state dict).

Registered as the default ``loraplex_load_adapter`` hook implementation; plugins registered later win.

``LoRARequest.allowed_paths`` (the server's ``--allowed-lora-paths``) is enforced here, at every read from
storage: the adapter directory and every file opened must lie inside one of those directories after following
symlinks, a relative ``lora_path`` is looked up under them (never the CWD), and nothing is downloaded. Without
it, a ``lora_path`` that is not a local directory but looks like ``org/name`` or ``org/name/sub`` is a Hugging
Face Hub repo (and sub-folder): only its adapter files are downloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from loraplex.errors import LoRALoadError, LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
GLOB_CHARS = frozenset("*?[]{}")
_OUTSIDE = "resolves outside the directories allowed by --allowed-lora-paths"


def hub_path_problem(path: str) -> str | None:
    """Why ``path`` (``org/repo`` or ``org/repo/sub/folder``) must not reach a Hub download filter, or None.

    ``allow_patterns`` are fnmatch globs: ``org/repo/*`` would download every folder of the repo."""
    if "\x00" in path or "\\" in path:
        return "contains a NUL byte or a backslash"
    if any(c in GLOB_CHARS for c in path):
        return "contains a glob character (one of * ? [ ] { })"
    if any(p in ("", ".", "..") for p in path.split("/")):
        return "has an empty, '.' or '..' path component"
    return None


def is_inside(real: str, roots) -> bool:
    """``real`` (a resolved path) is one of ``roots`` (resolved directories) or lies below one."""
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def locate(lora_path: str, roots) -> str | None:
    """Where ``lora_path`` points under allowlist ``roots``: an absolute (or ``~``) path as it is, a relative one
    joined to the first root it exists under -- never the CWD. None: a relative path found under no root."""
    path = os.path.expanduser(lora_path)
    if os.path.isabs(path):
        return path
    for root in roots:
        candidate = os.path.join(root, path)
        if os.path.lexists(candidate):
            return candidate
    return None


def _allowed_roots(lora_request: LoRARequest) -> list[str] | None:
    roots = lora_request.allowed_paths
    return None if roots is None else [os.path.realpath(os.path.expanduser(r)) for r in roots]


def _checked(path: Path | str, roots: list[str] | None, name: str, what: str) -> Path:
    """``path`` with its symlinks resolved, refused (LoRALoadError) when it leaves the allowed ``roots``."""
    if roots is None:
        return Path(path)
    real = os.path.realpath(path)
    if not is_inside(real, roots):
        raise LoRALoadError(f"adapter '{name}': {what} {_OUTSIDE}", name)
    return Path(real)


def resolve_adapter_dir(lora_request: LoRARequest) -> Path:
    """The adapter's local directory (downloaded first for a Hub id when no allowlist applies). With
    ``allowed_paths`` the directory is returned with its symlinks resolved, after checking it lies inside."""
    name, raw = lora_request.lora_name, lora_request.lora_path
    if "\x00" in raw:
        raise LoRALoadError(f"adapter '{name}': lora_path contains a NUL byte", name)
    roots = _allowed_roots(lora_request)
    if roots is not None:  # local directories under the roots only: never the CWD, never the Hub
        located = locate(raw, roots) if raw else None
        if located is None:
            raise LoRANotFoundError(f"No adapter found for {raw or '<empty path>'} (adapter '{name}')", name)
        path = _checked(located, roots, name, f"lora_path {raw}")
        if not os.path.isdir(path):
            raise LoRANotFoundError(f"No adapter found for {raw} (adapter '{name}')", name)
        return path
    path = Path(raw).expanduser()
    if raw and os.path.isdir(path):
        return path
    looks_like_repo = raw.count("/") in (1, 2) and not raw.startswith(("/", ".", "~"))
    if not raw or not looks_like_repo:
        raise LoRANotFoundError(f"No adapter found for {raw or '<empty path>'} (adapter '{name}')", name)
    bad = hub_path_problem(raw)
    if bad:
        raise LoRANotFoundError(f"No adapter found for {raw} (adapter '{name}'): as a Hugging Face Hub repo id "
                                f"it {bad}", name)
    from huggingface_hub import snapshot_download

    parts = raw.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        # The adapter's own files only: a repo may hold full checkpoints or many other adapters.
        root = Path(snapshot_download(repo, allow_patterns=[f"{sub}/{f}" if sub else f for f in ADAPTER_FILES]))
    except Exception as e:
        raise LoRANotFoundError(f"No adapter found for {lora_request.lora_path} (adapter '{name}'): {e}", name) from e
    path = root / sub if sub else root
    if not path.is_dir():
        raise LoRANotFoundError(f"No adapter found for {lora_request.lora_path} (adapter '{name}')", name)
    return path


def read_peft_dir(path: Path, name: str, allowed_paths=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT directory. With ``allowed_paths`` (resolved directories) every file is opened by its real
    path, and only when that lies inside them."""
    path = Path(path)
    roots = None if allowed_paths is None else list(allowed_paths)

    def checked(file: Path) -> Path:
        return _checked(file, roots, name, file.name) if os.path.lexists(file) else file

    config_file = checked(path / "adapter_config.json")
    if not config_file.is_file():
        raise LoRANotFoundError(f"No adapter found for {path}: adapter_config.json is missing (adapter '{name}')",
                                name)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRALoadError(f"adapter '{name}': adapter_config.json is not valid JSON: {e}", name) from e
    if not isinstance(config, dict):
        raise LoRALoadError(f"adapter '{name}': adapter_config.json must hold a JSON object", name)
    st_file, bin_file = checked(path / "adapter_model.safetensors"), checked(path / "adapter_model.bin")
    try:
        if st_file.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(st_file))
        elif bin_file.is_file():
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
        else:
            raise LoRALoadError(f"adapter '{name}': no adapter_model.safetensors or adapter_model.bin in {path}",
                                name)
    except LoRALoadError:
        raise
    except Exception as e:  # truncated or corrupt files raise many different types
        raise LoRALoadError(f"adapter '{name}': cannot read weights in {path}: {e}", name) from e
    return config, tensors


@hookimpl
def loraplex_load_adapter(lora_request: LoRARequest):
    if lora_request.tensors is not None and lora_request.config is not None:
        return dict(lora_request.config), dict(lora_request.tensors)
    return read_peft_dir(resolve_adapter_dir(lora_request), lora_request.lora_name, _allowed_roots(lora_request))


def check_allowed(lora_request: LoRARequest) -> None:
    """Run before any ``loraplex_load_adapter`` hook (plugins see the request first): an adapter read from
    storage under ``allowed_paths`` must be a local directory inside them (LoRAError otherwise)."""
    if lora_request.allowed_paths is not None and lora_request.tensors is None:
        resolve_adapter_dir(lora_request)
