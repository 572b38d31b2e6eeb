"""Built-in resolver: adapters in an S3 bucket (or any S3-compatible store), through s3fs.

Not default-on: load it with ``LORAPLEX_PLUGINS=lora_s3_resolver,...`` and set
``LORAPLEX_LORA_RESOLVER_S3_URI=s3://bucket/prefix``. Adapter ``NAME`` is read from
``s3://bucket/prefix/NAME/`` or ``s3://bucket/prefix/<served model name>/NAME/`` and copied to
``<LORAPLEX_LORA_DOWNLOAD_DIR>/s3/bucket/prefix/...`` atomically (see ``_download``); a complete
copy there is reused. Credentials come from the usual AWS variables / files; the endpoint from
``LORAPLEX_LORA_RESOLVER_S3_ENDPOINT_URL`` or botocore's ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``. Needs ``pip install loraplex[s3]``.
"""
from __future__ import annotations

import logging

from loraplex import envs
from loraplex.errors import LoRAError, LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl
from loraplex.resolvers._download import resolve_from_store

logger = logging.getLogger("loraplex.plugins")

LORAPLEX_DEFAULT_ON = False


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    rest = uri[len("s3://"):] if uri.startswith("s3://") else uri
    bucket, _, prefix = rest.strip("/").partition("/")
    if not bucket:
        raise LoRANotFoundError(f"LORAPLEX_LORA_RESOLVER_S3_URI={uri!r} names no bucket")
    return bucket, prefix.strip("/")


def make_filesystem():
    try:
        import s3fs
    except ImportError as e:
        raise LoRANotFoundError("the S3 LoRA resolver needs s3fs: pip install 'loraplex[s3]'") from e
    timeout = envs.lora_resolver_s3_connect_timeout()
    # Few, short retries: a request waits on this, and a dead endpoint should fail in seconds.
    fs = s3fs.S3FileSystem(
        endpoint_url=envs.lora_resolver_s3_endpoint_url(), skip_instance_cache=True,
        config_kwargs={"connect_timeout": timeout, "read_timeout": max(timeout, 60.0),
                       "retries": {"max_attempts": 2, "mode": "standard"}})
    fs.retries = 2
    return fs


def _describe(e: Exception, bucket: str, where: str) -> str:
    text = str(e)
    kind = type(e).__name__
    if "Connect" in kind or "Timeout" in kind or "EndpointConnection" in kind:
        return f"cannot reach the S3 endpoint {where} ({text})"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Credentials" in kind:
        return f"access to s3://{bucket} was denied ({kind}: {text})"
    return f"{kind}: {text}"


@hookimpl(trylast=True)
def loraplex_resolve_lora(base_model_name: str, lora_name: str) -> LoRARequest | None:
    uri = envs.lora_resolver_s3_uri()
    if not uri:
        return None
    bucket, prefix = parse_s3_uri(uri)
    root = f"{bucket}/{prefix}" if prefix else bucket
    # Mirrors the key layout; "." and ".." in a configured prefix must not move the copy elsewhere.
    local_root = envs.lora_download_dir().joinpath(
        "s3", *[p for p in root.split("/") if p not in ("", ".", "..")])
    where = envs.lora_resolver_s3_endpoint_url() or envs.aws_endpoint_url_s3() or "AWS S3"
    try:
        fs = make_filesystem()

        def check_bucket() -> None:
            try:
                fs.info(bucket)
            except FileNotFoundError:
                raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be fetched: the S3 bucket "
                                        f"'{bucket}' does not exist at {where}", lora_name) from None

        return resolve_from_store(fs, root, base_model_name, lora_name, local_root, f"s3://{root}", check_bucket)
    except LoRAError:
        raise
    except Exception as e:  # botocore and aiohttp raise many types; all mean "not available now"
        reason = _describe(e, bucket, where)
        logger.warning("S3 LoRA resolver: adapter %r: %s", lora_name, reason)
        raise LoRANotFoundError(f"The lora adapter '{lora_name}' cannot be fetched from s3://{root}: {reason}",
                                lora_name) from e
