"""Media in chat content parts: which part types carry which modality, what the served model takes, and the
inline (data: URL) image bytes of an ``image_url`` part. Remote URLs are refused: the server opens no connection a
request asks for."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from loraplex.server.errors import APIError

MEDIA_PARTS = ("image_url", "input_audio", "audio_url", "video_url", "image", "audio", "file")
PART_MODALITY = {"image_url": "image", "image": "image", "input_audio": "audio", "audio_url": "audio",
                 "audio": "audio", "video_url": "video", "file": "file"}


@dataclass(frozen=True)
class MediaSpec:
    """What the served model takes besides text: its modalities and the text of its image placeholder (the
    processor expands each into the image's tokens)."""

    modalities: tuple[str, ...] = ()
    image_placeholder: str | None = None


def image_bytes(where: str, part: dict) -> bytes:
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise APIError(400, f"'{where}.image_url.url' must be a string", param=where)
    if not url.startswith("data:"):
        # Fetching (http, https, file) is not enabled: the server opens no connection a request asks for.
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise APIError(400, f"'{where}': {scheme!r} image URLs are not enabled on this server; send the image "
                       "inline as a data: URL (data:image/png;base64,...)", param=where)
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise APIError(400, f"'{where}': a data: URL must be data:image/<format>;base64,<data>", param=where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{where}': the data: URL is not valid base64", param=where) from None
