"""MediaReader: the bytes of one media part (``MediaRef``), from its base64, a file or a remote URL, under the
operator's ``MediaPolicy``.

vLLM fetches any http(s) URL a request names, by default. loraplex opens no connection a request asks for unless
the operator names the domains (``--allowed-media-domains``, or ``*`` for any) and reads no file outside
``--allowed-local-media-path``: a request must not make the server reach its internal network (SSRF) or read its
disks. Every read is bounded in bytes (``--max-media-bytes``) and fetches in time (vLLM's
``VLLM_IMAGE_FETCH_TIMEOUT`` / ``VLLM_AUDIO_FETCH_TIMEOUT``); redirects are followed (``VLLM_MEDIA_URL_ALLOW_REDIRECTS``)
only to http(s) URLs of allowed domains. Every refusal is a 400 naming the part.
"""
from __future__ import annotations

import base64
import binascii
import os
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass

from loraplex import envs
from loraplex.errors import ConfigError
from loraplex.server.errors import APIError
from loraplex.server.media import MediaRef

DEFAULT_MAX_MEDIA_BYTES = 20 * 2**20
MAX_REDIRECTS = 5
ANY_DOMAIN = "*"


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read for a request's media.

    :param allowed_media_domains: hosts whose http(s) URLs are fetched (exact host names, compared without case
        and port, as vLLM compares them); ``("*",)``: any host. None or empty: no remote fetching (vLLM's default
        is to fetch any URL).
    :param allowed_local_media_path: a directory; ``file://`` URLs are read only when their real path (symlinks
        and ``..`` resolved) lies under its real path. None: no files.
    :param max_media_bytes: the most bytes read for one media item (a fetch, a file).
    :param image_fetch_timeout_s, audio_fetch_timeout_s: how long one fetch may take, in all.
    :param is_redirect_followed: follow http(s) redirects (each checked as the URL itself is); False: a redirect
        is a 400.
    """

    allowed_media_domains: tuple[str, ...] | None = None
    allowed_local_media_path: str | None = None
    max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    image_fetch_timeout_s: float = 5.0
    audio_fetch_timeout_s: float = 10.0
    is_redirect_followed: bool = True

    def __post_init__(self) -> None:
        domains = tuple(d.strip().lower() for d in self.allowed_media_domains or () if d.strip())
        object.__setattr__(self, "allowed_media_domains", domains or None)
        if self.allowed_local_media_path:
            path = os.path.realpath(self.allowed_local_media_path)
            if not os.path.isdir(path):
                raise ConfigError(f"--allowed-local-media-path {self.allowed_local_media_path} is not an existing "
                                  "directory", "allowed_local_media_path")
            object.__setattr__(self, "allowed_local_media_path", path)
        else:
            object.__setattr__(self, "allowed_local_media_path", None)
        if not isinstance(self.max_media_bytes, int) or self.max_media_bytes < 1:
            raise ConfigError(f"max_media_bytes must be a positive int, got {self.max_media_bytes!r}",
                              "max_media_bytes")
        for name in ("image_fetch_timeout_s", "audio_fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"MediaPolicy.{name} must be > 0, got {getattr(self, name)!r}", name)

    @classmethod
    def from_env(cls, allowed_media_domains=None, allowed_local_media_path: str | None = None,
                 max_media_bytes: int | None = None) -> "MediaPolicy":
        """The flags' values, with the timeouts, the redirect switch and (unless given) the byte cap from the
        environment (``loraplex.envs``)."""
        return cls(tuple(allowed_media_domains or ()) or None, allowed_local_media_path,
                   max_media_bytes or envs.max_media_bytes() or DEFAULT_MAX_MEDIA_BYTES,
                   envs.image_fetch_timeout(), envs.audio_fetch_timeout(), envs.media_url_allow_redirects())

    @property
    def is_remote_enabled(self) -> bool:
        return self.allowed_media_domains is not None

    def timeout_s(self, modality: str) -> float:
        return self.audio_fetch_timeout_s if modality == "audio" else self.image_fetch_timeout_s


class MediaReader:
    """Reads MediaRefs under a policy; ``read`` is thread-safe (one shared HTTP connection pool)."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy
        self._client = None
        self._lock = threading.Lock()  # the client is made once, by whichever fetch thread comes first

    def read(self, ref: MediaRef) -> bytes:
        if ref.url is None:
            return _base64(ref.data, ref.where)
        if ref.scheme == "data":
            return _base64(ref.url.partition(",")[2], ref.where)
        if ref.scheme == "file":
            return self._read_file(ref)
        return self._fetch(ref)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ------------------------------------------------------------------ files
    def _read_file(self, ref: MediaRef) -> bytes:
        root = self.policy.allowed_local_media_path
        if root is None:
            raise APIError(400, f"'{ref.where}': 'file' {ref.modality} URLs are not enabled on this server (it reads "
                           "no local files without --allowed-local-media-path)", param=ref.where)
        parts = urllib.parse.urlsplit(ref.url)
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"'{ref.where}': a file:// URL names no host (file:///path), got {parts.netloc!r}",
                           param=ref.where)
        path = urllib.parse.unquote(parts.path)
        # The real path: '..' and every symlink resolved, so neither leads out of the directory.
        real = os.path.realpath(path)
        if not path.startswith("/") or os.path.commonpath([root, real]) != root:
            raise APIError(400, f"'{ref.where}': the file path {path} must be a subpath of "
                           f"--allowed-local-media-path {root}", param=ref.where)
        try:
            # O_NOFOLLOW: the resolved path's last part cannot have become a symlink since; O_NONBLOCK: a FIFO
            # would otherwise block the thread in open() (it is refused as not a regular file).
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise APIError(400, f"'{ref.where}': cannot open {path}: {e.strerror}", param=ref.where) from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise APIError(400, f"'{ref.where}': {path} is not a regular file", param=ref.where)
            if info.st_size > self.policy.max_media_bytes:
                raise self._too_large(ref, info.st_size)
            data = f.read(self.policy.max_media_bytes + 1)
        if len(data) > self.policy.max_media_bytes:  # it grew while read
            raise self._too_large(ref, len(data))
        return data

    # ------------------------------------------------------------------ http(s)
    def _check_url(self, ref: MediaRef, url) -> None:
        """``url`` (an httpx.URL: the part's own, or a redirect's target) may be fetched."""
        if url.scheme not in ("http", "https"):
            raise APIError(400, f"'{ref.where}': a redirect to a {url.scheme or 'relative'!r} URL is not followed "
                           "(only http and https)", param=ref.where)
        domains = self.policy.allowed_media_domains
        if domains is None:
            raise APIError(400, f"'{ref.where}': {url.scheme!r} {ref.modality} URLs are not enabled on this server "
                           "(see --allowed-media-domains); send it inline as a data: URL", param=ref.where)
        if ANY_DOMAIN not in domains and url.host.lower() not in domains:
            raise APIError(400, f"'{ref.where}': the URL must be from one of the allowed domains: "
                           f"{list(domains)}. Input URL domain: {url.host}", param=ref.where)

    def _http(self):
        import httpx

        with self._lock:
            if self._client is None:
                # trust_env=False: no proxy, netrc credentials or CA bundle from the environment for URLs a request
                # chooses; the redirects are followed here, one by one, each checked.
                self._client = httpx.Client(trust_env=False, follow_redirects=False,
                                            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8))
            return self._client

    def _fetch(self, ref: MediaRef) -> bytes:
        import httpx

        timeout = self.policy.timeout_s(ref.modality)
        deadline = time.monotonic() + timeout
        try:
            url = httpx.URL(ref.url)
        except (httpx.InvalidURL, ValueError) as e:
            raise APIError(400, f"'{ref.where}': invalid URL: {e}", param=ref.where) from None
        self._check_url(ref, url)
        client = self._http()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise httpx.TimeoutException("deadline")
                # Identity: a compressed body would be decompressed past the byte cap before it is counted.
                with client.stream("GET", url, timeout=httpx.Timeout(left),
                                   headers={"Accept": f"{ref.modality}/*", "Accept-Encoding": "identity"}) as r:
                    if r.is_redirect:
                        if not self.policy.is_redirect_followed:
                            raise APIError(400, f"'{ref.where}': the URL answered a redirect ({r.status_code}); "
                                           "redirects are not followed on this server", param=ref.where)
                        try:
                            url = url.join(r.headers["location"])
                        except (httpx.InvalidURL, ValueError) as e:
                            raise APIError(400, f"'{ref.where}': the redirect's location is invalid: {e}",
                                           param=ref.where) from None
                        self._check_url(ref, url)
                        continue
                    if r.status_code != 200:
                        raise APIError(400, f"'{ref.where}': fetching the URL answered HTTP {r.status_code}",
                                       param=ref.where)
                    return self._body(ref, r, deadline)
        except httpx.InvalidURL as e:  # httpx builds a redirect's request (unsent) even when it does not follow it
            raise APIError(400, f"'{ref.where}': a redirect to an invalid or non-http URL is not followed: {e}",
                           param=ref.where) from None
        except httpx.TimeoutException:
            raise APIError(400, f"'{ref.where}': fetching the URL took more than {timeout:g} s", param=ref.where) \
                from None
        except httpx.HTTPError as e:
            raise APIError(400, f"'{ref.where}': cannot fetch the URL: {type(e).__name__}: {e}", param=ref.where) \
                from None
        raise APIError(400, f"'{ref.where}': more than {MAX_REDIRECTS} redirects", param=ref.where)

    def _body(self, ref: MediaRef, r, deadline: float) -> bytes:
        import httpx

        limit = self.policy.max_media_bytes
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(ref, int(declared))
        body = bytearray()
        for chunk in r.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise self._too_large(ref, len(body))
            # The read timeout bounds each wait for bytes; this bounds a body that trickles in.
            if time.monotonic() > deadline:
                raise httpx.TimeoutException("deadline")
        return bytes(body)

    def _too_large(self, ref: MediaRef, size: int) -> APIError:
        return APIError(400, f"'{ref.where}': the media has more than {self.policy.max_media_bytes} bytes "
                        f"({size} read or declared; --max-media-bytes)", param=ref.where)


def _base64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{where}': the data is not valid base64", param=where) from None
