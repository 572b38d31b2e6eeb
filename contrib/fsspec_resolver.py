"""Contrib resolver: adapters on any fsspec filesystem (gs://, az://, hf://, sftp://, memory://...).

Not default-on: installed plugins load without it unless it is named, as in
``LORAPLEX_PLUGINS=lora_filesystem_resolver,lora_fsspec_resolver`` (the entry point loraplex
declares for this module), or registered by hand with
``get_plugin_manager().register(loraplex.contrib.fsspec_resolver)``. Configure

* ``LORAPLEX_LORA_RESOLVER_FSSPEC_URI``, e.g. ``gs://bucket/loras``: adapter ``NAME`` is read from
  ``<uri>/NAME/`` or ``<uri>/<served model name>/NAME/``;
* ``LORAPLEX_LORA_RESOLVER_FSSPEC_OPTIONS`` (optional): JSON storage options for that filesystem.

The adapter is copied atomically to ``<LORAPLEX_LORA_DOWNLOAD_DIR>/fsspec/<protocol>/<path>/NAME``
and a complete copy is reused. The filesystem's own package (gcsfs, adlfs...) must be installed.
"""
from __future__ import annotations

import logging

from loraplex import envs
from loraplex.errors import LoRAError, LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl
from loraplex.resolvers._download import check_name, resolve_from_store

logger = logging.getLogger("loraplex.plugins")

LORAPLEX_DEFAULT_ON = False


def open_store(uri: str, options: dict | None = None):
    """``(filesystem, root path, protocol)`` for ``uri``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, root.rstrip("/"), protocol


def resolve_from_uri(uri: str, base_model_name: str, lora_name: str, options: dict | None = None
                     ) -> LoRARequest | None:
    check_name(lora_name)
    try:
        fs, root, protocol = open_store(uri, options)
        # The mirror path keeps every store's copies apart without trusting ``root`` to be safe.
        mirror = [p for p in root.split("/") if p not in ("", ".", "..")]
        local_root = envs.lora_download_dir().joinpath("fsspec", protocol, *mirror)
        return resolve_from_store(fs, root, base_model_name, lora_name, local_root, uri)
    except LoRAError:
        raise
    except Exception as e:  # each backend raises its own types for "missing", "denied", "unreachable"
        logger.warning("fsspec LoRA resolver: adapter %r from %s: %s: %s", lora_name, uri, type(e).__name__, e)
        raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be fetched from {uri}: "
                                f"{type(e).__name__}: {e}", lora_name) from e


@hookimpl(trylast=True)
def loraplex_resolve_lora(base_model_name: str, lora_name: str) -> LoRARequest | None:
    uri = envs.lora_resolver_fsspec_uri()
    if not uri:
        return None
    return resolve_from_uri(uri, base_model_name, lora_name, envs.lora_resolver_fsspec_options())
