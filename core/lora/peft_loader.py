"""The built-in adapter loader: a PEFT directory (or hub repo) -> (adapter_config dict, state dict).

Registered as the default ``loraplex_load_adapter`` hook implementation; plugins registered later win.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from loraplex.errors import LoRALoadError, LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl


def resolve_adapter_dir(lora_request: LoRARequest) -> Path:
    path = Path(lora_request.lora_path).expanduser()
    if path.is_dir():
        return path
    name = lora_request.lora_name
    looks_like_repo = lora_request.lora_path.count("/") in (1, 2) and not lora_request.lora_path.startswith(
        ("/", ".", "~"))
    if not lora_request.lora_path or not looks_like_repo:
        raise LoRANotFoundError(f"No adapter found for {lora_request.lora_path or '<empty path>'} "
                                f"(adapter '{name}')", name)
    from huggingface_hub import snapshot_download

    parts = lora_request.lora_path.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None))
    except Exception as e:
        raise LoRANotFoundError(f"No adapter found for {lora_request.lora_path} (adapter '{name}'): {e}", name) from e
    path = root / sub if sub else root
    if not path.is_dir():
        raise LoRANotFoundError(f"No adapter found for {lora_request.lora_path} (adapter '{name}')", name)
    return path


def read_peft_dir(path: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise LoRANotFoundError(f"No adapter found for {path}: adapter_config.json is missing (adapter '{name}')",
                                name)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRALoadError(f"adapter '{name}': adapter_config.json is not valid JSON: {e}", name) from e
    if not isinstance(config, dict):
        raise LoRALoadError(f"adapter '{name}': adapter_config.json must hold a JSON object", name)
    st_file, bin_file = path / "adapter_model.safetensors", path / "adapter_model.bin"
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
    return read_peft_dir(resolve_adapter_dir(lora_request), lora_request.lora_name)
