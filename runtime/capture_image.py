"""Images of captured parts: the content hash that names a sample, and the (PNG) bytes kept.

    sid = sample_id_of(png_bytes, "Is the seal torn?", "yes")   # same part + question + label = one sample
    data, kind = encoded_image(rgb_array)                      # PNG/JPEG bytes kept as given

Used by the capture queue (runtime/capture.py) and the Station (runtime/station.py).
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
from PIL import Image


def sample_id_of(image_bytes: bytes, instruction: str, label: str | None) -> str:
    """The content hash naming a sample (the same part + question + label is one sample)."""
    return hashlib.sha256(b"kaizen-sample-1\0" + image_bytes + b"\0" + instruction.encode() + b"\0"
                          + (label or "").encode()).hexdigest()


def image_kind(data: bytes) -> str | None:
    """"png" / "jpeg" from the magic bytes; None for anything else (it is re-encoded as PNG)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "jpeg" if data[:3] == b"\xff\xd8\xff" else None


def encoded_image(image) -> tuple[bytes, str]:
    """(bytes, "png"|"jpeg"): PNG/JPEG bytes as given; a uint8 [H, W, 3] array, a PIL image or
    bytes of another format are encoded as PNG (deterministic: same pixels, same bytes)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        kind = image_kind(data)
        if kind:
            return data, kind
        with Image.open(io.BytesIO(data)) as img:
            image = img.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"a captured image must be bytes, a uint8 [H, W, 3] array or a PIL image, not {image!r:.80}")
    return png_of(image), "png"


def png_of(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] array: unfiltered rows, zlib level 1. zlib runs without the
    GIL (PIL's PNG encoder holds it), so the writer thread does not stall inference threads."""
    h, w, _ = rgb.shape
    raw = np.zeros((h, w * 3 + 1), np.uint8)   # each row: filter type 0, then its pixels
    raw[:, 1:] = rgb.reshape(h, w * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b""))



def _size_of(image) -> int:
    if isinstance(image, Image.Image):
        return image.width * image.height * 4
    return int(getattr(image, "nbytes", None) or len(image))
