"""Fast mode: quality over bicubic, tiling exactness, batches, any size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.superres.conftest import F32, decode, photo, png, request
from workers.api import DeviceSettings, FolderBundle, no_progress
from workers.superres.fast import MARGIN, FastPipeline, plan_spans


@given(length=st.integers(1, 3000), tile=st.integers(2 * MARGIN + 1, 600))
@settings(max_examples=300, deadline=None)
def test_tiles_cover_every_pixel_once_with_full_margins(length, tile):
    spans = plan_spans(length, tile)
    assert spans[0].keep_lo == 0 and spans[-1].keep_hi == length
    for a, b in zip(spans, spans[1:]):
        assert a.keep_hi == b.keep_lo
    for s in spans:
        assert s.size == min(tile, length)
        assert 0 <= s.start and s.start + s.size <= length
        # every kept pixel sees MARGIN real neighbours inside the tile, or the image border
        assert s.keep_lo == 0 or s.keep_lo - s.start >= MARGIN
        assert s.keep_hi == length or s.start + s.size - s.keep_hi >= MARGIN


def test_in_graph_bicubic_is_pyvips_bicubic():
    """The base the network adds its residual to is the aligned Catmull-Rom of pyvips."""
    import torch

    from workers.superres import imageio, train

    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (3, 7), (37, 50)):
        lr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = imageio.upscale_array(lr).astype(float)
        x = torch.from_numpy(lr.transpose(2, 0, 1)[None].astype(np.float32))
        with torch.no_grad():
            phases = train.BicubicX4()(x)
            ours = torch.nn.functional.pixel_shuffle(phases, 4)[0].numpy().transpose(1, 2, 0)
        # pyvips rounds each of its two passes to 8 bits (measured: at most 1.06 levels apart,
        # 0.3 on average); ours stays float until the model's end
        diff = np.abs(np.clip(ours, 0, 255) - expected)
        assert diff.max() <= 1.5 and diff.mean() < 0.5, (h, w, diff.max(), diff.mean())


@pytest.mark.slow
def test_fast_mode_beats_bicubic_on_held_out_images(handler, prepared):
    from workers.superres import train

    gains = []
    for name in train.HELD_OUT:
        ex = train.make_example(train.sample_dir() / name)
        response = handler(request(png(ex.lr)), no_progress)
        sr = decode(response.media[0].data)
        gains.append(train.psnr_y(sr, ex.hr) - train.psnr_y(ex.bicubic, ex.hr))
    print(f"held-out PSNR(Y) gains over bicubic (dB): {np.round(gains, 2).tolist()}")
    # The goal: at least +1.0 dB mean PSNR(Y) over the deployed bicubic on held-out photos.
    assert np.mean(gains) >= 1.0
    assert min(gains) > 0.3
    recorded = FolderBundle(prepared["sr-fast-x4"]).manifest["settings"]["psnr_gain_db"]
    assert abs(np.mean(gains) - recorded) < 0.3  # what prepare measured is what users get


@pytest.mark.slow
def test_tiled_upscale_equals_whole_image_upscale(prepared, core):
    bundle = FolderBundle(prepared["sr-fast-x4"])
    whole = FastPipeline.load(bundle, core, DeviceSettings("CPU", F32))
    tiled = FastPipeline.load(bundle, core, DeviceSettings("CPU", F32))
    tiled.tile = 48
    image = photo(130, 170)
    [a], [b] = whole([image]), tiled([image])
    assert a.shape == b.shape == (520, 680, 3)
    assert np.abs(a.astype(int) - b).max() <= 1


def test_batch_of_three_answers_three_in_request_order(handler):
    sizes = [(20, 30), (33, 17), (20, 30)]
    events = []
    response = handler(request(*(png(photo(h, w, seed=i)) for i, (h, w) in enumerate(sizes))),
                       events.append)
    assert response.result["model"] == "sr-fast-x4"
    assert [(i["height"], i["width"]) for i in response.result["images"]] == \
        [(4 * h, 4 * w) for h, w in sizes]
    for (h, w), item in zip(sizes, response.media):
        assert decode(item.data).shape == (4 * h, 4 * w, 3)
    assert sorted(e["image"] for e in events) == [1, 2, 3]
    assert all(e["images"] == 3 for e in events)
    # same input, same answer, wherever it sits in the batch
    assert response.media[0].data != response.media[1].data
    single = handler(request(png(photo(20, 30, seed=2))), no_progress)
    assert decode(single.media[0].data).tobytes() == decode(response.media[2].data).tobytes()


@pytest.mark.slow
def test_a_4000x3000_photo_is_upscaled(handler):
    from workers.api import Media, Request

    import pyvips

    data = pyvips.Image.new_from_array(photo(3000, 4000)).jpegsave_buffer(Q=90)
    media = (Media("image/jpeg", data),)
    response = handler(Request("superres", {"format": "jpeg", "quality": 80}, media=media),
                       no_progress)
    assert response.result["images"][0]["width"] == 16000
    assert response.result["images"][0]["height"] == 12000
    out = pyvips.Image.new_from_buffer(response.media[0].data, "")
    assert (out.width, out.height) == (16000, 12000)

