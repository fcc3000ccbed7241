"""What clients send that is not a plain RGB PNG: bad bytes, bombs, alpha, grey, 16-bit, EXIF."""

from __future__ import annotations

import os
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


# -- hostile requests: every cost is checked before it is paid (README, "Hostile input")


def _peak_growth(run) -> tuple[object, int]:
    """Run `run()` in this process; its result (or exception) and the peak RSS growth."""
    from tests.hostile.probe import memory, reset_peak

    pid = os.getpid()
    before = reset_peak(pid)
    try:
        result = run()
    except Exception as exc:  # noqa: BLE001 - returned for the test to assert on
        result = exc
    return result, memory(pid)["VmHWM"] - before


def _budgeted(handler, job_memory: int):
    from workers.superres import SuperResHandler

    return SuperResHandler(handler._pipelines, job_memory=job_memory)


def test_a_png_header_claiming_100000x100000_is_refused_naming_the_pixel_limit(handler):
    bomb = _with_header_size(png(photo(4, 4)), 100_000, 100_000)
    with pytest.raises(PayloadTooLarge, match="100000x100000, over the 16 MP limit"):
        handler(request(bomb), no_progress)


def test_sixteen_2000x2000_pngs_past_the_budget_are_refused_before_any_is_decoded(handler):
    black = pyvips.Image.black(2000, 2000, bands=3).pngsave_buffer()
    small = _budgeted(handler, 256 << 20)
    error, growth = _peak_growth(lambda: small(request(*[black] * 16), no_progress))
    assert isinstance(error, PayloadTooLarge)
    assert "upscaling 16 image(s) of 64.0 MP in all needs" in error.message
    assert "over the per-job budget of 256 MiB ([limits] job_memory)" in error.message
    assert growth < 32 << 20  # headers only: 16 decoded inputs alone would be 192 MB


def test_images_are_upscaled_one_at_a_time(handler):
    from workers.superres import imageio

    images = [png(photo(800, 1000, seed=i)) for i in range(4)]
    one = imageio.open_image(images[0]).cost  # 43 MiB: the 4x output is 38 MB of it
    handler(request(images[0], format="jpeg"), no_progress)  # compiles the tile shape
    response, growth = _peak_growth(lambda: handler(request(*images, format="jpeg"), no_progress))
    assert [i["width"] for i in response.result["images"]] == [4000] * 4
    # four outputs held at once would be over 4 x 38 MB; one at a time stays near one image
    assert growth < 2 * one, (growth, one)


def test_an_answer_passing_the_message_limit_stops_with_payload_too_large(handler):
    rng = np.random.default_rng(0)
    noise = png(rng.integers(0, 255, (1000, 1000, 3), dtype=np.uint8), compression=1)
    # each 4x answer stored uncompressed is 48 MB: the second passes 64 MiB while it encodes
    with pytest.raises(PayloadTooLarge, match="passed the 67108864-byte limit of one message"):
        handler(request(noise, noise, compression=0), no_progress)


def test_a_png_with_more_rows_than_its_header_declares_decodes_no_more(handler):
    lying = _with_header_size(png(photo(64, 48)), 48, 32)  # 64 rows of data, header says 32
    response = handler(request(lying), no_progress)
    assert decode(response.media[0].data).shape == (128, 192, 3)


def test_quality_mode_size_is_checked_from_the_header(handler):
    big = _with_header_size(png(photo(4, 4)), 1000, 1000)  # header only: never decoded
    with pytest.raises(PayloadTooLarge, match="quality mode takes at most"):
        handler(request(big, mode="quality"), no_progress)


def test_requests_of_many_sizes_do_not_pile_up_compiled_shapes(handler):
    """Each image size under a tile compiles its own shape (~105 MB of activations at
    500x500); eight sizes used to keep eight of them (~900 MB) for good."""
    from tests.hostile.probe import memory

    pid = os.getpid()
    before = memory(pid)["VmRSS"]
    for i in range(6):
        handler(request(png(photo(500 - i, 497 - i))), no_progress)
    grown = memory(pid)["VmRSS"] - before
    assert grown < 320 << 20, f"{grown >> 20} MiB kept after six sizes"
