"""Encode generated pixels with pyvips."""

from __future__ import annotations

import numpy as np
import pyvips

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(pixels: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless, no metadata: same pixels give the same bytes), JPEG or WebP."""
    h, w, bands = pixels.shape
    image = pyvips.Image.new_from_memory(np.ascontiguousarray(pixels).tobytes(), w, h, bands,
                                         "uchar")
    if fmt == "png":
        return image.write_to_buffer(".png", compression=6, strip=True)
    if fmt == "jpeg":
        return image.write_to_buffer(".jpg", Q=quality, strip=True)
    if fmt == "webp":
        return image.write_to_buffer(".webp", Q=quality, strip=True)
    raise ValueError(f"unknown format {fmt!r}")
