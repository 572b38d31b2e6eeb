"""Built-in resolver: adapters in Hugging Face Hub repos (vLLM's ``lora_hf_hub_resolver``).

Not default-on: load it with ``LORAPLEX_PLUGINS=lora_hf_hub_resolver,...`` and list the repos
it may download from in ``LORAPLEX_LORA_RESOLVER_HF_REPO_LIST=org/repo,org/other``. An adapter
name is ``org/repo`` (the adapter is at the repo root) or ``org/repo/sub/path`` (the adapter is
in that folder; only that folder's adapter files are downloaded). Names of repos not in the list
are left to other resolvers. Names of listed repos with glob characters (``* ? [ ] { }``: the
download filter is a glob), ``..``, NUL or backslashes are refused (not found). Downloads go
through ``huggingface_hub.snapshot_download``, so ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``
and ``HF_TOKEN`` apply as usual.
"""
from __future__ import annotations

import logging
from pathlib import Path

from loraplex import envs
from loraplex.errors import LoRANotFoundError
from loraplex.lora.peft_loader import hub_path_problem
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl
from loraplex.resolvers._download import ADAPTER_CONFIG, WEIGHT_FILES, check_name, request_for_dir

logger = logging.getLogger("loraplex.plugins")

LORAPLEX_DEFAULT_ON = False


def split_name(lora_name: str, repos: list[str]) -> tuple[str, str] | None:
    """``(repo_id, subpath)`` if ``lora_name`` lies in one of ``repos``; subpath may be ''."""
    parts = check_name(lora_name)
    if len(parts) < 2:
        return None
    repo_id = "/".join(parts[:2])
    if repo_id not in repos:
        return None
    bad = hub_path_problem(lora_name)
    if bad:  # "org/repo/*" would download every folder of the repo
        logger.warning("refusing LoRA adapter name %r: it %s", lora_name, bad)
        raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: the name {bad}", lora_name)
    return repo_id, "/".join(parts[2:])


def resolve_from_hub(repo_id: str, subpath: str, base_model_name: str, lora_name: str) -> LoRARequest | None:
    from huggingface_hub import snapshot_download

    # Only the adapter's own files: a repo may also hold full checkpoints or many other adapters.
    names = [ADAPTER_CONFIG, *WEIGHT_FILES]
    if hub_path_problem(f"{repo_id}/{subpath}" if subpath else repo_id):  # callers other than split_name
        raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: '{subpath}' is not a plain "
                                f"folder of '{repo_id}'", lora_name)
    # The folder's adapter files only: `sub/*` would match files in its sub-folders too (fnmatch's * matches /).
    patterns = [f"{subpath}/{n}" for n in names] if subpath else names
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline cache miss, missing repo, auth, network: all "cannot get it"
        raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be downloaded from the Hugging Face Hub "
                                f"repo '{repo_id}': {type(e).__name__}: {e}", lora_name) from e
    path = root / subpath if subpath else root
    if not (path / ADAPTER_CONFIG).is_file():
        raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be found: the Hugging Face Hub repo "
                                f"'{repo_id}' has no {ADAPTER_CONFIG} in '{subpath or '/'}'", lora_name)
    return request_for_dir(lora_name, path, base_model_name)


@hookimpl(trylast=True)
def loraplex_resolve_lora(base_model_name: str, lora_name: str) -> LoRARequest | None:
    repos = envs.lora_resolver_hf_repo_list()
    if not repos:
        return None
    found = split_name(lora_name, repos)
    if found is None:
        return None
    return resolve_from_hub(*found, base_model_name, lora_name)
