"""Image decode, a 4x bicubic upscale and encode, all with pyvips (no PIL at runtime).

The fast model computes its own bicubic base inside the graph (`train.BicubicX4`, the same
Catmull-Rom kernel and pixel alignment as `bicubic_x4` here). `bicubic_x4` upscales alpha
channels and is the plain-bicubic baseline the model's PSNR gain is measured against.

Costs are known before they are paid: `open_image` reads the header only (size, bands, alpha)
and refuses a decompression bomb from it; `Header.cost` is what decoding it and keeping its 4x
answer takes, so a handler checks a whole request against its budget before decoding any image.
Decoding is sequential (libvips streams the file into one buffer, never more than the header
declares) and `encode` stops as soon as the answer passes its size limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyvips

from edge import constants as C
from edge.errors import PayloadTooLarge, UnsupportedMedia
from workers.api import Media

SCALE = 4
# Decompression-bomb guard, checked on the header before any pixel is decoded. 16 MP in means
# 256 MP (768 MB RGB) out: a 4000x3000 photo fits, a 40 MP one would need ~2 GB for its answer.
# The per-job memory budget (`Header.cost`) is usually the tighter bound.
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


def bicubic_x4(image: pyvips.Image, scale: int = SCALE) -> pyvips.Image:
    """The 4x (or `scale`x) bicubic (Catmull-Rom) upscale with pixel centres aligned,
    evaluated lazily.

    Output pixel x samples input position (x + 0.5) / 4 - 0.5, the convention the network's
    two inputs assume; `resize(kernel="cubic")` is off by a fraction of a pixel.
    """
    offset = (scale - 1) / 2
    return image.affine(
        [scale, 0, 0, scale],
        interpolate=_INTERP,
        odx=offset,
        ody=offset,
        oarea=[0, 0, image.width * scale, image.height * scale],
        extend="copy",
    )


def upscale_array(pixels: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """`bicubic_x4` of a uint8 (H, W[, C]) array, as an array of the same dtype."""
    out = bicubic_x4(pyvips.Image.new_from_array(pixels), scale).numpy()
    return out if out.ndim == pixels.ndim else out[..., None]


def as_vips(pixels: np.ndarray) -> pyvips.Image:
    """A uint8 array as a pyvips image (copied, so the array may be dropped)."""
    return pyvips.Image.new_from_array(np.ascontiguousarray(pixels))


@dataclass(frozen=True, slots=True)
class Header:
    """An image opened lazily: what its header declares, no pixel decoded yet."""

    image: pyvips.Image
    width: int
    height: int
    alpha: bool

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def cost(self) -> int:
        """Bytes decoding it and holding its 4x answer take (the model's own buffers aside):
        the decoded pixels (twice: an EXIF rotation turns a copy), their RGB / alpha split,
        the 4x RGB array and the 4x alpha."""
        return self.cost_at(SCALE)

    @property
    def answer_bytes(self) -> int:
        """The 4x answer's raw pixel bytes (an encoded answer is rarely larger)."""
        return self.answer_bytes_at(SCALE)

    def cost_at(self, scale: int) -> int:
        """`cost` for a model that upscales `scale` times."""
        bands = 3 + self.alpha
        return self.pixels * (2 * self.image.bands + bands + scale * scale * bands)

    def answer_bytes_at(self, scale: int) -> int:
        """`answer_bytes` for a model that upscales `scale` times."""
        return self.pixels * scale * scale * (3 + self.alpha)


def decode(data: bytes, max_pixels: int = MAX_INPUT_PIXELS) -> Decoded:
    """PNG / JPEG / WebP bytes to RGB uint8, or a client-facing error."""
    return decode_header(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int = MAX_INPUT_PIXELS) -> Header:
    """The image's header, refused if it is not PNG / JPEG / WebP or declares more than
    `max_pixels` (`payload_too_large`): only the header is read, so this costs nothing."""
    if not data:
        raise UnsupportedMedia("empty payload: expected a PNG, JPEG or WebP image")
    if not _sniff(data):  # by magic bytes: libvips itself would open far more formats
        raise UnsupportedMedia("not a PNG, JPEG or WebP image")
    try:
        # sequential: pixels are decoded once, top to bottom, straight into the one buffer
        # `numpy()` asks for (random access would decode the whole file into a cache first)
        image = pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="error")
    except pyvips.Error:
        raise UnsupportedMedia("image header is corrupt") from None
    if image.width * image.height > max_pixels:
        raise PayloadTooLarge(
            f"image is {image.width}x{image.height}, over the {max_pixels / 1e6:g} MP limit"
        )
    return Header(image, image.width, image.height, bool(image.hasalpha()))


def decode_header(header: Header) -> Decoded:
    """Decode an opened image's pixels (check `Header.cost` against the budget first)."""
    try:
        return _split(header.image)
    except pyvips.Error:
        raise UnsupportedMedia("image data is corrupt or truncated") from None


def _sniff(data: bytes) -> bool:
    return (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def _split(image: pyvips.Image) -> Decoded:
    notes = []
    orientation = image.get("orientation") if image.get_typeof("orientation") else 1
    if image.interpretation in ("cmyk", "lab", "labs", "lch", "xyz", "scrgb", "hsv"):
        image = image.colourspace("srgb")
    if image.format not in ("uchar", "char"):
        notes.append(f"{image.format} samples converted to 8-bit")
        target = "b-w" if image.bands <= 2 else "srgb"
        image = image.colourspace(target)
        if image.format != "uchar":
            image = image.cast("uchar")
    colour = image.bands - image.hasalpha()
    if colour not in (1, 3):
        raise UnsupportedMedia(f"unsupported image with {colour} colour bands")
    # one sequential pass: every pixel decoded once, into one (H, W, bands) array
    pixels = image.numpy().reshape(image.height, image.width, image.bands)
    if orientation != 1:  # EXIF orientation: answer the image the way it is viewed
        pixels = _autorot(pixels, orientation)
    alpha = np.ascontiguousarray(pixels[..., colour]) if colour < pixels.shape[2] else None
    grey = colour == 1
    rgb = np.repeat(pixels[..., :1], 3, axis=2) if grey else np.ascontiguousarray(pixels[..., :3])
    return Decoded(rgb=rgb, alpha=alpha, grey=grey, notes=tuple(notes))


def _autorot(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn decoded (H, W, bands) pixels the way EXIF `orientation` says (libvips' autorot
    needs random access, which a sequential decode does not give)."""
    image = as_vips(pixels).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    out = image.autorot().numpy()
    return out.reshape(out.shape[0], out.shape[1], pixels.shape[2])


def encoded_bound(headers: Sequence[Header], scale: int = SCALE) -> int:
    """The most bytes these images' encoded answers make the worker hold: the encoded bytes
    (at most the one-message limit; PNG of incompressible pixels adds a little to the raw
    size), the copy that joins each image's chunks, and the answer's delivery to the outbox
    (measured: the Redis client's packing holds 3x the answer while it is sent)."""
    raw = sum(h.answer_bytes_at(scale) + h.answer_bytes_at(scale) // 64 + (64 << 10)
              for h in headers)
    return 4 * min(C.MAX_ANSWER_BYTES, raw)


def encode(rgb: np.ndarray, *, alpha: np.ndarray | None = None, grey: bool = False,
           fmt: str = "png", quality: int = 90, compression: int = 1,
           limit: int = C.MAX_ANSWER_BYTES) -> Media:
    """An upscaled image back to bytes in the asked format (alpha and greyscale restored).

    The encoder stops as soon as its output passes `limit` bytes (the room left in one
    answer, `MAX_ANSWER_BYTES`): `payload_too_large`, and nothing past the limit was held.
    """
    image = as_vips(rgb).copy(interpretation="srgb")
    if grey:
        image = image.colourspace("b-w")
    if alpha is not None:
        if fmt == "jpeg":  # JPEG has no alpha: composite onto white as viewers do
            image = image.bandjoin(as_vips(alpha)).flatten(background=[255] * image.bands)
            image = image.cast("uchar")
        else:
            image = image.bandjoin(as_vips(alpha))
    chunks: list[bytes] = []
    size = 0

    def write(chunk: bytes) -> int:
        nonlocal size
        size += len(chunk)
        if size > limit:
            return -1  # a write error: libvips stops encoding at once
        chunks.append(bytes(chunk))
        return len(chunk)

    target = pyvips.TargetCustom()
    target.on_write(write)
    try:
        if fmt == "png":
            # zlib level 1 by default: half the time of libpng's 6 for ~10% more bytes on a
            # photo; 0 stores the pixels (a 1080p answer then costs ~5 ms instead of ~30, at
            # ~2x the bytes)
            image.pngsave_target(target, compression=compression, keep="none")
        elif fmt == "jpeg":
            # 4:2:0 chroma at every quality, as most encoders do (libvips turns it off from
            # Q90 up: 1.6x the encode time of a 1080p frame, for colour detail upscaling does
            # not add)
            image.jpegsave_target(target, Q=quality, keep="none", subsample_mode="on")
        elif fmt == "webp":
            image.webpsave_target(target, Q=quality, keep="none")
        else:
            raise ValueError(fmt)
    except pyvips.Error:
        if size <= limit:
            raise
        raise PayloadTooLarge(f"the answer passed the {C.MAX_ANSWER_BYTES}-byte limit of one "
                              "message: send smaller or fewer images, or ask for format=jpeg"
                              ) from None
    return Media(content_type=_CONTENT_TYPES[fmt], data=b"".join(chunks))
