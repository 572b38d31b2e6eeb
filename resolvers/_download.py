"""Helpers shared by the resolvers: name checks, adapter checks, atomic downloads from fsspec stores.

Base-model rule (``base_model_matches``): an adapter matches the served model when its
``base_model_name_or_path`` equals the served name, or when their last path components agree
(``/models/Llama-3.1-8B`` matches ``meta-llama/Llama-3.1-8B``), because a served model is often a
local copy of the hub repo the adapter was trained on. Comparison is case-sensitive; an adapter
without ``base_model_name_or_path`` matches nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraplex.errors import LoRANotFoundError
from loraplex.lora.request import LoRARequest

logger = logging.getLogger("loraplex.plugins")

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a relative path under a root, or None if it can."""
    if not isinstance(name, str) or not name.strip():
        return "is empty"
    if "\x00" in name or "\\" in name:
        return "contains a NUL or backslash"
    if name.startswith("/") or os.path.isabs(name):
        return "is an absolute path"
    if any(p in ("", ".", "..") for p in name.split("/")):
        return "has an empty, '.' or '..' path component"
    return None


def check_name(lora_name: str) -> list[str]:
    """Split an adapter name into path components, refusing anything that could leave a root."""
    bad = name_problem(lora_name)
    if bad:
        logger.warning("refusing LoRA adapter name %r: it %s", lora_name, bad)
        raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: the name {bad}",
                                lora_name or None)
    return lora_name.split("/")


def base_name_candidates(base_model_name: str) -> list[str]:
    """Safe relative forms of the served model name for the ``<root>/<base model>/<adapter>`` layout."""
    out = []
    stripped = (base_model_name or "").rstrip("/")
    for cand in (stripped, stripped.rsplit("/", 1)[-1]):
        if name_problem(cand) is None and cand not in out:
            out.append(cand)
    return out


def stable_lora_id(lora_name: str) -> int:
    """A positive id that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(lora_name.encode()).digest()[:7], "big") + 1


def base_model_matches(adapter_base: str | None, served: str) -> bool:
    if not adapter_base or not served:
        return False
    a, s = adapter_base.rstrip("/"), served.rstrip("/")
    return a == s or a.rsplit("/", 1)[-1] == s.rsplit("/", 1)[-1]


def read_lora_config(path: Path) -> dict | None:
    """The adapter_config.json of a PEFT LoRA directory, or None if ``path`` is not one."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        logger.debug("no readable %s in %s: %s", ADAPTER_CONFIG, path, e)
        return None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if str(peft_type).upper() != "LORA":
        logger.warning("%s is not a LoRA adapter (peft_type=%r)", path, peft_type)
        return None
    return config


def request_for_dir(lora_name: str, path: Path, base_model_name: str) -> LoRARequest | None:
    """A LoRARequest for the PEFT LoRA at ``path`` if it was trained on ``base_model_name``."""
    config = read_lora_config(path)
    if config is None:
        return None
    adapter_base = config.get("base_model_name_or_path")
    if not base_model_matches(adapter_base, base_model_name):
        logger.warning("LoRA adapter %r at %s is for base model %r, not the served %r; skipping it", lora_name,
                       path, adapter_base, base_model_name)
        return None
    return LoRARequest(lora_name=lora_name, lora_int_id=stable_lora_id(lora_name), lora_path=str(path),
                       base_model_name=base_model_name)


def is_complete_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


def _install(staging: Path, target: Path) -> None:
    """Move a verified download into place; whoever renames first wins, the others discard theirs."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if is_complete_adapter(target):
            return
    # A leftover that is not a complete adapter (never one of ours): move it aside atomically first.
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
    try:
        try:
            os.rename(target, trash / "old")
        except FileNotFoundError:
            pass  # another process cleared it first
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete_adapter(target):
                raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def download_atomically(fs, remote_dir: str, remote_files: list[str], target: Path, lora_name: str) -> Path:
    """Copy the files of ``remote_files`` that lie directly in ``remote_dir`` (on fsspec ``fs``) to ``target``.

    Files land in a staging directory beside ``target`` and are renamed into place only once
    adapter_config.json and the weights are there, so readers never see a half-written adapter.
    A complete adapter already at ``target`` is reused without contacting the store.
    """
    if is_complete_adapter(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        prefix = remote_dir.rstrip("/") + "/"
        rpaths, lpaths = [], []
        for rpath in remote_files:
            rel = rpath[len(prefix):] if rpath.startswith(prefix) else ""
            # Only the folder's own files: a PEFT adapter is flat, and a name like "a/../b" or a
            # nested checkpoint must neither escape the staging directory nor be downloaded.
            if not rel or "/" in rel or name_problem(rel):
                continue
            rpaths.append(rpath)
            lpaths.append(str(staging / rel))
        if rpaths:
            fs.get(rpaths, lpaths)
        if not is_complete_adapter(staging):
            raise LoRANotFoundError(f"The lora adapter '{lora_name}' at {remote_dir} is incomplete: it needs "
                                    f"{ADAPTER_CONFIG} and one of {', '.join(WEIGHT_FILES)}", lora_name)
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_from_store(fs, root: str, base_model_name: str, lora_name: str, local_root: Path,
                       store: str, before_remote: Callable[[], None] | None = None) -> LoRARequest | None:
    """Look for ``<root>/<name>`` then ``<root>/<base model>/<name>`` on ``fs``; download the first found.

    ``store`` names the store in messages; ``before_remote`` runs once before the store is first
    contacted (e.g. to check that a bucket exists, since listing a missing one may just be empty).
    Errors other than "no such adapter" propagate for the caller to word (each store fails in its
    own way).
    """
    parts = check_name(lora_name)
    root = root.rstrip("/")
    layouts = [parts] + [base.split("/") + parts for base in base_name_candidates(base_model_name)]
    for rel in layouts:
        # A finished download is served without contacting the store (which may be down).
        local = local_root.joinpath(*rel)
        if is_complete_adapter(local):
            request = request_for_dir(lora_name, local, base_model_name)
            if request is not None:
                return request
    if before_remote is not None:
        before_remote()
    # Instances are cached by fsspec, listings with them: an adapter uploaded after a miss must show.
    fs.invalidate_cache()
    for rel in layouts:
        remote_dir = "/".join([root, *rel])
        files = fs.find(remote_dir, maxdepth=1)
        if f"{remote_dir}/{ADAPTER_CONFIG}" not in files:
            continue
        logger.info("downloading LoRA adapter %r from %s/%s", lora_name, store, "/".join(rel))
        local = download_atomically(fs, remote_dir, files, local_root.joinpath(*rel), lora_name)
        request = request_for_dir(lora_name, local, base_model_name)
        if request is not None:
            return request
    return None
