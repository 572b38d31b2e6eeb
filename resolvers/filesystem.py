"""Built-in resolver: adapters in a local directory (vLLM's ``lora_filesystem_resolver``).

Set ``LORAPLEX_LORA_RESOLVER_CACHE_DIR`` (or ``VLLM_LORA_RESOLVER_CACHE_DIR``); without it this
plugin does nothing. A request for adapter ``NAME`` is served from the first of

* ``<dir>/NAME``
* ``<dir>/<served model name>/NAME`` (and ``<dir>/<last component of the served name>/NAME``)

that holds a PEFT LoRA (``adapter_config.json`` with ``peft_type`` LORA) trained on the served
model (see ``base_model_matches`` in ``_download``). ``NAME`` may contain ``/`` to reach a
subdirectory; absolute names, ``..`` and symlinks that lead out of ``<dir>`` are refused.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from loraplex import envs
from loraplex.errors import LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl
from loraplex.resolvers._download import (ADAPTER_CONFIG, WEIGHT_FILES, base_name_candidates, check_name,
                                          request_for_dir)

logger = logging.getLogger("loraplex.plugins")

LORAPLEX_DEFAULT_ON = True


def _inside(path: Path, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def resolve_in_dir(root: str | os.PathLike, base_model_name: str, lora_name: str) -> LoRARequest | None:
    """Resolve ``lora_name`` under ``root``; usable on its own by other resolvers."""
    parts = check_name(lora_name)
    root_path = Path(root).expanduser()
    root_real = os.path.realpath(root_path)
    layouts = [parts] + [base.split("/") + parts for base in base_name_candidates(base_model_name)]
    for rel in layouts:
        candidate = root_path.joinpath(*rel)
        if not candidate.is_dir():
            continue
        # Checked on the files we hand to the loader too: a symlinked weight file could leak any file.
        for path in (candidate, candidate / ADAPTER_CONFIG, *(candidate / w for w in WEIGHT_FILES)):
            if (path == candidate or path.exists()) and not _inside(path, root_real):
                logger.warning("refusing LoRA adapter %r: %s resolves outside %s", lora_name, path, root_path)
                raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: its path leaves the "
                                        "resolver directory", lora_name)
        request = request_for_dir(lora_name, candidate, base_model_name)
        if request is not None:
            return request
    return None


@hookimpl
def loraplex_resolve_lora(base_model_name: str, lora_name: str) -> LoRARequest | None:
    root = envs.lora_resolver_cache_dir()
    if not root:
        return None
    if not os.path.isdir(root):
        logger.warning("LORAPLEX_LORA_RESOLVER_CACHE_DIR=%s is not a directory", root)
        return None
    return resolve_in_dir(root, base_model_name, lora_name)
