"""Decoding a media item's bytes, bounded: an image to a PIL RGB image, audio to ``(float32 mono array, rate)``.

Both run in the front end's threads. A small file can claim a huge canvas or hours of audio, so each is checked
against a cap from its header before its pixels or samples are decoded. Every failure is a 400 naming the part.
"""
from __future__ import annotations

import io

from loraplex.server.errors import APIError

# Decoded images may have at most this many pixels (a small PNG can claim a huge canvas).
MAX_IMAGE_PIXELS = 64 * 2**20
# Decoded audio may have at most this many samples (frames x channels): 128 MiB as float32, 35 min of 16 kHz mono.
MAX_AUDIO_SAMPLES = 32 * 2**20
# The containers served (soundfile's names); a declared format is a hint, the bytes decide.
AUDIO_CONTAINERS = ("WAV", "WAVEX", "FLAC", "MP3")


def decode_image(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise APIError(400, f"'{where}': the image has {img.width}x{img.height} pixels; at most "
                           f"{MAX_IMAGE_PIXELS} are accepted", param=where)
        img.load()
        return img.convert("RGB")
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise APIError(400, f"'{where}': the image could not be decoded: {type(e).__name__}: {e}",
                       param=where) from None


def decode_audio(data: bytes, where: str):
    """WAV, FLAC or MP3 bytes -> ``(np.ndarray float32 mono, sample_rate)``; channels are averaged."""
    try:
        import soundfile
    except ImportError:  # the server's set-up, not the request, is at fault
        raise APIError(500, "decoding audio needs the soundfile package (pip install 'loraplex[mm]')") from None
    if not data:
        raise APIError(400, f"'{where}': the audio is empty", param=where)
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise APIError(400, f"'{where}': the audio could not be decoded: {type(e).__name__}: {e}",
                       param=where) from None
    if info.format not in AUDIO_CONTAINERS:
        raise APIError(400, f"'{where}': audio in {info.format} is not supported; send WAV, FLAC or MP3",
                       param=where)
    if info.channels < 1 or info.frames * info.channels > MAX_AUDIO_SAMPLES:
        raise APIError(400, f"'{where}': the audio has {info.frames} frames of {info.channels} channel(s); at most "
                       f"{MAX_AUDIO_SAMPLES} samples are accepted", param=where)
    try:
        # frames bounds what is decoded even where the header's count is an estimate (MP3).
        array, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True,
                                     frames=MAX_AUDIO_SAMPLES // info.channels + 1)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise APIError(400, f"'{where}': the audio could not be decoded: {type(e).__name__}: {e}",
                       param=where) from None
    if array.shape[0] * array.shape[1] > MAX_AUDIO_SAMPLES:
        raise APIError(400, f"'{where}': the audio has more than {MAX_AUDIO_SAMPLES} samples", param=where)
    if array.shape[0] == 0:
        raise APIError(400, f"'{where}': the audio holds no samples", param=where)
    mono = array[:, 0] if array.shape[1] == 1 else array.mean(axis=1)
    return mono.astype("float32", copy=False), int(rate)
