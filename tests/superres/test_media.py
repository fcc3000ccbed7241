"""What clients send that is not a plain RGB PNG: bad bytes, bombs, alpha, grey, 16-bit, EXIF."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import pyvips

from edge.errors import BadRequest, ModelUnavailable, PayloadTooLarge, UnsupportedMedia
from tests.superres.conftest import decode, photo, png, request
from workers.api import no_progress


def test_empty_payload_is_unsupported_media(handler):
    with pytest.raises(UnsupportedMedia, match="empty"):
        handler(request(b""), no_progress)


def test_bytes_that_are_not_an_image_are_unsupported_media(handler):
    with pytest.raises(UnsupportedMedia, match="not a PNG, JPEG or WebP"):
        handler(request(b"hello, this is not an image at all"), no_progress)


def test_gif_is_refused(handler):
    gif = pyvips.Image.new_from_array(photo(8, 8)).gifsave_buffer()
    with pytest.raises(UnsupportedMedia):
        handler(request(gif), no_progress)


def test_truncated_png_is_unsupported_media(handler):
    data = png(photo(64, 64))
    with pytest.raises(UnsupportedMedia):
        handler(request(data[: len(data) // 2]), no_progress)


def _with_header_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size (CRC fixed), as a decompression bomb would."""
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + data[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_decompression_bomb_is_refused_from_the_header(handler):
    bomb = _with_header_size(png(photo(4, 4)), 30000, 30000)
    with pytest.raises(PayloadTooLarge, match="30000x30000"):
        handler(request(bomb), no_progress)


def test_a_one_pixel_image_gives_four_by_four(handler):
    response = handler(request(png(np.full((1, 1, 3), 200, np.uint8))), no_progress)
    out = decode(response.media[0].data)
    assert out.shape == (4, 4, 3)
    # tiny images are edge-padded before the network (zero padding alone rang by 14 levels)
    assert np.abs(out.astype(int) - 200).max() <= 2


def test_alpha_is_upscaled_and_kept(handler):
    rgba = np.dstack([photo(24, 32), np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))])
    out = decode(handler(request(png(rgba)), no_progress).media[0].data)
    assert out.shape == (96, 128, 4)
    assert out[:, :8, 3].mean() < 20 and out[:, -8:, 3].mean() > 235


def test_alpha_asked_as_jpeg_is_flattened_onto_white(handler):
    rgba = np.dstack([photo(8, 8), np.zeros((8, 8), np.uint8)])
    response = handler(request(png(rgba), format="jpeg"), no_progress)
    out = decode(response.media[0].data)
    assert out.shape == (32, 32, 3) and out.min() > 240


def test_greyscale_stays_greyscale(handler):
    grey = photo(24, 32)[..., 0]
    response = handler(request(png(grey)), no_progress)
    assert decode(response.media[0].data).shape == (96, 128, 1)


def test_sixteen_bit_input_is_answered_in_8_bit_and_says_so(handler):
    deep = (photo(16, 16).astype(np.uint16) * 257)
    data = pyvips.Image.new_from_array(deep).copy(interpretation="rgb16").pngsave_buffer()
    response = handler(request(data), no_progress)
    assert "8-bit" in " ".join(response.result["images"][0]["notes"])
    assert pyvips.Image.new_from_buffer(response.media[0].data, "").format == "uchar"


def test_exif_orientation_is_applied(handler):
    image = pyvips.Image.new_from_array(photo(20, 40)).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", 6)  # rotate 90 degrees to view
    response = handler(request(image.jpegsave_buffer()), no_progress)
    info = response.result["images"][0]
    assert (info["width"], info["height"]) == (80, 160)


@pytest.mark.parametrize("fmt,content_type", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_jpeg_and_webp_answers(handler, fmt, content_type):
    response = handler(request(png(photo(16, 20)), format=fmt, quality=70), no_progress)
    assert response.media[0].content_type == content_type
    assert response.result["images"][0]["content_type"] == content_type
    assert decode(response.media[0].data).shape == (64, 80, 3)


@pytest.mark.parametrize("quality", [70, 90, 95])
def test_jpeg_answers_subsample_chroma_at_every_quality(handler, quality):
    """4:2:0 as most encoders do (libvips alone would switch it off from Q90 up)."""
    response = handler(request(png(photo(16, 20)), format="jpeg", quality=quality), no_progress)
    image = pyvips.Image.new_from_buffer(response.media[0].data, "")
    assert image.get("jpeg-chroma-subsample").startswith("4:2:0")


def test_png_compression_changes_bytes_not_pixels(handler):
    image = png(photo(40, 60))
    stored = handler(request(image, compression=0), no_progress).media[0].data
    packed = handler(request(image, compression=6), no_progress).media[0].data
    assert len(stored) > len(packed)
    assert np.array_equal(decode(stored), decode(packed))


def test_unknown_model_is_model_unavailable(handler):
    with pytest.raises(ModelUnavailable, match="nope"):
        handler(request(png(photo(8, 8)), model="nope"), no_progress)


def test_quality_model_asked_in_fast_mode_is_a_bad_request(handler):
    with pytest.raises(BadRequest, match="quality-mode"):
        handler(request(png(photo(8, 8)), model="sr-ldm-x4-tiny", mode="fast"), no_progress)


def test_webp_input_is_accepted(handler):
    data = pyvips.Image.new_from_array(photo(12, 10)).webpsave_buffer(Q=90)
    out = decode(handler(request(data), no_progress).media[0].data)
    assert out.shape == (48, 40, 3)
