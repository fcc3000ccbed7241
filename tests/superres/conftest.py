"""Prepared superres bundles (built once, cached in the user's prepared folder) and helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyvips
import pytest

from workers.api import DeviceSettings, FolderBundle, Request

# EDGE_PREPARED_DIR points the tests at another prepared folder (e.g. a quick debug build)
PREPARED = Path(os.environ.get("EDGE_PREPARED_DIR", Path.home() / ".cache/edge-daemon/prepared"))
THREADS = {"INFERENCE_NUM_THREADS": 2}
F32 = {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="session")
def prepared() -> dict[str, Path]:
    """Both prepared folders by bundle name (a cold run trains the fast model: ~3 min)."""
    from workers.superres.prepare import prepare

    return {p.name: p for p in prepare(PREPARED)}


@pytest.fixture(scope="session")
def core():
    import openvino as ov

    return ov.Core()


@pytest.fixture(scope="session")
def handler(prepared, core):
    """The task handler exactly as a CPU worker builds it."""
    from workers.superres import load

    return load([FolderBundle(p) for p in prepared.values()], core, DeviceSettings("CPU", THREADS))


def png(pixels: np.ndarray, **kwargs) -> bytes:
    """uint8 (H, W[, C]) array -> PNG bytes."""
    return pyvips.Image.new_from_array(np.ascontiguousarray(pixels)).pngsave_buffer(**kwargs)


def request(*images: bytes, **params) -> Request:
    """A superres request carrying the given encoded images."""
    from workers.api import Media

    media = tuple(Media("image/png", data) for data in images)
    return Request(task="superres", params=params, media=media, batch=len(media) > 1)


def decode(data: bytes) -> np.ndarray:
    """Encoded image -> (H, W, bands) uint8 array."""
    image = pyvips.Image.new_from_buffer(data, "")
    out = image.numpy()
    return out if out.ndim == 3 else out[..., None]


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth synthetic photo-like RGB image with some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 53 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
