"""Every environment variable loraplex reads, in one place.

Each ``LORAPLEX_*`` name also answers to its ``VLLM_*`` alias so that a vLLM deployment's
environment carries over unchanged. The loraplex name wins when both are set. Values are read
at call time (not import time) so tests and long-lived processes see changes.
"""
from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def get(name: str, default: str | None = None) -> str | None:
    """Read ``LORAPLEX_<name>``, falling back to ``VLLM_<name>``, then ``default``."""
    for prefix in ("LORAPLEX_", "VLLM_"):
        value = os.environ.get(prefix + name)
        if value is not None:
            return value
    return default


def get_bool(name: str, default: bool = False) -> bool:
    value = get(name)
    if value is None:
        return default
    return value.strip().lower() in _TRUE


def is_set(name: str) -> bool:
    return get(name) is not None


def name_of(name: str) -> str:
    """The variable that ``get(name)`` reads: ``LORAPLEX_<name>`` unless only ``VLLM_<name>`` is set."""
    if os.environ.get("LORAPLEX_" + name) is None and os.environ.get("VLLM_" + name) is not None:
        return "VLLM_" + name
    return "LORAPLEX_" + name


# --- plugins ---------------------------------------------------------------------------------

def plugins() -> list[str] | None:
    """``LORAPLEX_PLUGINS``: None when unset (load every default-on plugin), [] when empty."""
    value = get("PLUGINS")
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def allow_runtime_lora_updating() -> bool:
    return get_bool("ALLOW_RUNTIME_LORA_UPDATING")


def lora_resolver_cache_dir() -> str | None:
    return get("LORA_RESOLVER_CACHE_DIR")


def lora_resolver_hf_repo_list() -> list[str]:
    value = get("LORA_RESOLVER_HF_REPO_LIST") or ""
    return [repo.strip() for repo in value.split(",") if repo.strip()]


def lora_resolver_s3_uri() -> str | None:
    """``LORAPLEX_LORA_RESOLVER_S3_URI``: e.g. ``s3://bucket/prefix``; adapters live under it."""
    return get("LORA_RESOLVER_S3_URI")


def lora_resolver_s3_endpoint_url() -> str | None:
    return get("LORA_RESOLVER_S3_ENDPOINT_URL")


def lora_resolver_fsspec_uri() -> str | None:
    """``LORAPLEX_LORA_RESOLVER_FSSPEC_URI`` for the contrib fsspec resolver (any URL scheme)."""
    return get("LORA_RESOLVER_FSSPEC_URI")


def aws_endpoint_url_s3() -> str | None:
    """botocore's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (botocore reads them itself;
    loraplex only names the endpoint in error messages)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def lora_resolver_s3_connect_timeout() -> float:
    """``LORAPLEX_LORA_RESOLVER_S3_CONNECT_TIMEOUT`` (seconds, default 5): an unreachable endpoint
    fails a resolution after roughly this long instead of hanging the request."""
    return float(get("LORA_RESOLVER_S3_CONNECT_TIMEOUT") or 5.0)


def lora_resolver_fsspec_options() -> dict:
    """``LORAPLEX_LORA_RESOLVER_FSSPEC_OPTIONS``: a JSON object of fsspec storage options
    (credentials, endpoint...) for the contrib fsspec resolver; ``{}`` when unset."""
    import json

    value = get("LORA_RESOLVER_FSSPEC_OPTIONS")
    if not value:
        return {}
    options = json.loads(value)
    if not isinstance(options, dict):
        raise ValueError("LORAPLEX_LORA_RESOLVER_FSSPEC_OPTIONS must be a JSON object")
    return options


# --- caches ----------------------------------------------------------------------------------

def cache_root() -> Path:
    """``LORAPLEX_CACHE_ROOT``: where converted models, demo adapters and downloads live."""
    value = get("CACHE_ROOT")
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraplex"


def lora_download_dir() -> Path:
    """Where remote resolvers (S3, fsspec) materialise adapters."""
    value = get("LORA_DOWNLOAD_DIR")
    return Path(value).expanduser() if value else cache_root() / "loras"


# --- server ----------------------------------------------------------------------------------

def api_key() -> str | None:
    return get("API_KEY")


def admin_api_key() -> str | None:
    return get("ADMIN_API_KEY")


def allowed_lora_paths() -> list[str]:
    """``LORAPLEX_ALLOWED_LORA_PATHS``: directories (``os.pathsep``-separated) that runtime-loaded
    adapters must live in; empty means no restriction."""
    value = get("ALLOWED_LORA_PATHS") or ""
    return [p for p in value.split(os.pathsep) if p.strip()]


def max_request_body_bytes() -> int | None:
    """``LORAPLEX_MAX_REQUEST_BODY_BYTES``: larger request bodies get a 413 (server default 10 MiB)."""
    value = get("MAX_REQUEST_BODY_BYTES")
    return int(value) if value else None


# --- server: media of multi-modal requests ----------------------------------------------------

def image_fetch_timeout() -> float:
    """``LORAPLEX_IMAGE_FETCH_TIMEOUT`` (vLLM's ``VLLM_IMAGE_FETCH_TIMEOUT``): seconds one image fetch may take
    (default 5, as vLLM)."""
    return float(get("IMAGE_FETCH_TIMEOUT") or 5.0)


def audio_fetch_timeout() -> float:
    """``LORAPLEX_AUDIO_FETCH_TIMEOUT`` (vLLM's ``VLLM_AUDIO_FETCH_TIMEOUT``): seconds one audio fetch may take
    (default 10, as vLLM)."""
    return float(get("AUDIO_FETCH_TIMEOUT") or 10.0)


def media_url_allow_redirects() -> bool:
    """``LORAPLEX_MEDIA_URL_ALLOW_REDIRECTS`` (vLLM's ``VLLM_MEDIA_URL_ALLOW_REDIRECTS``): follow redirects of media
    fetches (default on, as vLLM; each target must be http(s) and of an allowed domain all the same)."""
    return get_bool("MEDIA_URL_ALLOW_REDIRECTS", default=True)


def max_media_bytes() -> int | None:
    """``LORAPLEX_MAX_MEDIA_BYTES``: the most bytes read for one fetched or local media item (server default
    20 MiB; ``--max-media-bytes`` wins)."""
    value = get("MAX_MEDIA_BYTES")
    return int(value) if value else None


def media_loading_thread_count() -> int:
    """``LORAPLEX_MEDIA_LOADING_THREAD_COUNT`` (vLLM's ``VLLM_MEDIA_LOADING_THREAD_COUNT``): threads per API server
    that fetch and read media files (default 8, as vLLM), apart from the tokenizing threads."""
    return max(1, int(get("MEDIA_LOADING_THREAD_COUNT") or 8))


# --- kernels / device -------------------------------------------------------------------------

def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton_kernels() -> str:
    """``LORAPLEX_KERNELS``: ``auto`` (Triton on CUDA, torch on CPU), ``triton`` or ``torch``."""
    return (get("KERNELS") or "auto").lower()


def lora_shrink_k_per_split() -> int:
    """``LORAPLEX_LORA_K_PER_SPLIT``: in_dim elements per split-K program of the decode LoRA shrink (tuning knob)."""
    return max(16, int(get("LORA_K_PER_SPLIT") or 1024))


def lora_decode_max_tokens() -> int:
    """``LORAPLEX_LORA_DECODE_MAX_TOKENS``: largest batch the per-token (decode) LoRA expand takes on CUDA; larger
    batches use the grouped expand (tuning knob; 0 = always grouped)."""
    value = get("LORA_DECODE_MAX_TOKENS")
    return 32 if value is None or not value.strip() else max(0, int(value))


def async_scheduling() -> bool | None:
    """``LORAPLEX_ASYNC_SCHEDULING``: default of EngineArgs.async_scheduling when that is None; unset = on
    exactly when decode runs as CUDA graphs."""
    value = get("ASYNC_SCHEDULING")
    return None if value is None or not value.strip() else value.strip().lower() in _TRUE


def lora_side_stream() -> bool:
    """``LORAPLEX_LORA_SIDE_STREAM``: on CUDA, run each LoRA shrink on a second stream alongside the base
    projection's matmul, which reads the same input (default on; ``0`` runs it after the matmul)."""
    return get_bool("LORA_SIDE_STREAM", default=True)


def fused_ops() -> bool:
    """``LORAPLEX_FUSED_OPS``: fused Triton RMSNorm+residual, rotary+KV-cache write and SiLU·mul on CUDA
    (default on; ``0`` falls back to the eager torch ops). CPU always runs the torch ops."""
    return get_bool("FUSED_OPS", default=True)


# --- metrics ---------------------------------------------------------------------------------

# prometheus_client's own variable (not LORAPLEX_-prefixed): set by `serve --api-server-count N` for its API
# server processes, whose counters then add up in /metrics.
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def prometheus_multiproc_dir() -> str | None:
    return os.environ.get(PROMETHEUS_MULTIPROC_DIR) or None


# --- tensor parallelism ----------------------------------------------------------------------

def torch_distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK; MASTER_ADDR and
    MASTER_PORT are read by torch.distributed itself); None when they are not set."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    return int(rank), int(world), int(os.environ.get("LOCAL_RANK", rank))
