"""Image decode, a 4x bicubic upscale and encode, all with pyvips (no PIL at runtime).

The fast model computes its own bicubic base inside the graph (`train.BicubicX4`, the same
Catmull-Rom kernel and pixel alignment as `bicubic_x4` here). `bicubic_x4` upscales alpha
channels and is the plain-bicubic baseline the model's PSNR gain is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyvips

from edge.errors import PayloadTooLarge, UnsupportedMedia
from workers.api import Media

SCALE = 4
# Decompression-bomb guard, checked on the header before any pixel is decoded. 16 MP in means
# 256 MP (768 MB RGB) out: a 4000x3000 photo fits, a 40 MP one would need ~2 GB for its answer.
MAX_INPUT_PIXELS = 16_000_000

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_INTERP = pyvips.Interpolate.new("bicubic")


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded image split the way the model wants it: RGB pixels plus what to restore."""

    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None = None  # (H, W) uint8
    grey: bool = False
    notes: tuple[str, ...] = ()


def bicubic_x4(image: pyvips.Image) -> pyvips.Image:
    """The 4x bicubic (Catmull-Rom) upscale with pixel centres aligned, evaluated lazily.

    Output pixel x samples input position (x + 0.5) / 4 - 0.5, the convention the network's
    two inputs assume; `resize(kernel="cubic")` is off by a fraction of a pixel.
    """
    offset = (SCALE - 1) / 2
    return image.affine(
        [SCALE, 0, 0, SCALE],
        interpolate=_INTERP,
        odx=offset,
        ody=offset,
        oarea=[0, 0, image.width * SCALE, image.height * SCALE],
        extend="copy",
    )


def upscale_array(pixels: np.ndarray) -> np.ndarray:
    """`bicubic_x4` of a uint8 (H, W[, C]) array, as an array of the same dtype."""
    out = bicubic_x4(pyvips.Image.new_from_array(pixels)).numpy()
    return out if out.ndim == pixels.ndim else out[..., None]


def as_vips(pixels: np.ndarray) -> pyvips.Image:
    """A uint8 array as a pyvips image (copied, so the array may be dropped)."""
    return pyvips.Image.new_from_array(np.ascontiguousarray(pixels))


def decode(data: bytes, max_pixels: int = MAX_INPUT_PIXELS) -> Decoded:
    """PNG / JPEG / WebP bytes to RGB uint8, or a client-facing error."""
    image = _open(data)
    if image.width * image.height > max_pixels:
        raise PayloadTooLarge(
            f"image is {image.width}x{image.height}, over the {max_pixels / 1e6:g} MP limit"
        )
    try:
        return _split(image)
    except pyvips.Error:
        raise UnsupportedMedia("image data is corrupt or truncated") from None


def _open(data: bytes) -> pyvips.Image:
    """Open lazily: only the header is read, so the size check costs nothing."""
    if not data:
        raise UnsupportedMedia("empty payload: expected a PNG, JPEG or WebP image")
    if not _sniff(data):  # by magic bytes: libvips itself would open far more formats
        raise UnsupportedMedia("not a PNG, JPEG or WebP image")
    try:
        return pyvips.Image.new_from_buffer(data, "", fail_on="error")
    except pyvips.Error:
        raise UnsupportedMedia("image header is corrupt") from None


def _sniff(data: bytes) -> bool:
    return (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def _split(image: pyvips.Image) -> Decoded:
    notes = []
    image = image.autorot()  # EXIF orientation: answer the image the way it is viewed
    if image.interpretation in ("cmyk", "lab", "labs", "lch", "xyz", "scrgb", "hsv"):
        image = image.colourspace("srgb")
    if image.format not in ("uchar", "char"):
        notes.append(f"{image.format} samples converted to 8-bit")
        target = "b-w" if image.bands <= 2 else "srgb"
        image = image.colourspace(target)
        if image.format != "uchar":
            image = image.cast("uchar")
    alpha = None
    if image.hasalpha():
        alpha = image[image.bands - 1].numpy()
        image = image.extract_band(0, n=image.bands - 1)
    grey = image.bands == 1
    if grey:
        image = image.bandjoin([image, image])
    elif image.bands != 3:
        raise UnsupportedMedia(f"unsupported image with {image.bands} colour bands")
    rgb = image.numpy()
    return Decoded(rgb=np.ascontiguousarray(rgb), alpha=alpha, grey=grey, notes=tuple(notes))


def encode(rgb: np.ndarray, *, alpha: np.ndarray | None = None, grey: bool = False,
           fmt: str = "png", quality: int = 90, compression: int = 1) -> Media:
    """An upscaled image back to bytes in the asked format (alpha and greyscale restored)."""
    image = as_vips(rgb).copy(interpretation="srgb")
    if grey:
        image = image.colourspace("b-w")
    if alpha is not None:
        if fmt == "jpeg":  # JPEG has no alpha: composite onto white as viewers do
            image = image.bandjoin(as_vips(alpha)).flatten(background=[255] * image.bands)
            image = image.cast("uchar")
        else:
            image = image.bandjoin(as_vips(alpha))
    if fmt == "png":
        # zlib level 1 by default: half the time of libpng's 6 for ~10% more bytes on a photo;
        # 0 stores the pixels (a 1080p answer then costs ~5 ms instead of ~30, at ~2x the bytes)
        data = image.pngsave_buffer(compression=compression, keep="none")
    elif fmt == "jpeg":
        # 4:2:0 chroma at every quality, as most encoders do (libvips turns it off from Q90 up:
        # 1.6x the encode time of a 1080p frame, for colour detail upscaling does not add)
        data = image.jpegsave_buffer(Q=quality, keep="none", subsample_mode="on")
    elif fmt == "webp":
        data = image.webpsave_buffer(Q=quality, keep="none")
    else:
        raise ValueError(fmt)
    return Media(content_type=_CONTENT_TYPES[fmt], data=bytes(data))
