"""Media in chat content parts: which part types carry which modality, what the served model takes, and the
``MediaRef`` each media part becomes. Parsing runs in the event loop, so it only checks a part's shape; reading
(base64, files, remote URLs) and decoding happen later in the front end's threads (``MediaReader``,
``media_decode``)."""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.server.errors import APIError

MEDIA_PARTS = ("image_url", "input_audio", "audio_url", "video_url", "image", "audio", "file")
PART_MODALITY = {"image_url": "image", "image": "image", "input_audio": "audio", "audio_url": "audio",
                 "audio": "audio", "video_url": "video", "file": "file"}
# The part types that are served; the others of MEDIA_PARTS are refused by name.
SERVED_PARTS = ("image_url", "input_audio", "audio_url")
# input_audio formats (OpenAI's "wav" and "mp3", and flac); soundfile decodes each from its content.
AUDIO_FORMATS = ("wav", "mp3", "flac")
URL_SCHEMES = ("data", "http", "https", "file")


@dataclass(frozen=True)
class MediaSpec:
    """What the served model takes besides text: its modalities and the text of each modality's placeholder
    (the processor expands each into the item's tokens)."""

    modalities: tuple[str, ...] = ()
    image_placeholder: str | None = None
    audio_placeholder: str | None = None

    def placeholder(self, modality: str) -> str | None:
        return {"image": self.image_placeholder, "audio": self.audio_placeholder}.get(modality)


@dataclass(frozen=True)
class MediaRef:
    """One media part, not yet read: a URL (``data:``, ``http(s):``, ``file:``) or ``input_audio``'s base64
    ``data`` with its ``format``. ``where`` names the part in error messages."""

    modality: str
    where: str
    url: str | None = None
    data: str | None = None
    format: str | None = None

    @property
    def scheme(self) -> str:
        return "data" if self.url is None else self.url.split(":", 1)[0].lower()

    @property
    def is_read_from_outside(self) -> bool:
        """A file or a remote URL: read with I/O (in the front end's fetch threads), not from the body."""
        return self.scheme in ("http", "https", "file")


def _url(part: dict, kind: str, where: str) -> str:
    url = part.get(kind)
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise APIError(400, f"'{where}.{kind}.url' must be a string", param=where)
    return url


def media_ref(part: dict, kind: str, where: str) -> MediaRef:
    """The MediaRef of a served media part (``kind`` in SERVED_PARTS); a malformed part is a 400 naming it."""
    modality = PART_MODALITY[kind]
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str) \
                or not isinstance(audio.get("format"), str):
            raise APIError(400, f"'{where}.input_audio' must be an object with string 'data' (base64) and "
                           "'format'", param=where)
        if audio["format"].lower() not in AUDIO_FORMATS:
            raise APIError(400, f"'{where}.input_audio.format' {audio['format']!r} is not supported; use one of "
                           f"{', '.join(AUDIO_FORMATS)}", param=where)
        return MediaRef(modality, where, data=audio["data"], format=audio["format"].lower())
    url = _url(part, kind, where)
    ref = MediaRef(modality, where, url=url)
    if ":" not in url or ref.scheme not in URL_SCHEMES:
        raise APIError(400, f"'{where}': the URL must be either a HTTP, data or file URL", param=where)
    if ref.scheme == "data":
        head, sep, _ = url.partition(",")
        if not sep or not head.lower().endswith(";base64") or not head[5:].lower().startswith(f"{modality}/"):
            raise APIError(400, f"'{where}': a data: URL must be data:{modality}/<format>;base64,<data>",
                           param=where)
    return ref
