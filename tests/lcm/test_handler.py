"""The lcm task as a worker runs it: params in, image + result JSON out."""

from __future__ import annotations

import numpy as np
import pytest
import pyvips

from edge.errors import BadRequest, ModelUnavailable
from edge.tasks import TASKS
from workers.api import Request, no_progress

pytestmark = pytest.mark.slow


def _run(handler, text="a red fox", progress=no_progress, **params):
    spec = TASKS["lcm"]
    return handler(Request("lcm", spec.validate_params(params), text=text), progress)


def _pixels(media) -> np.ndarray:
    image = pyvips.Image.new_from_buffer(media.data, "")
    return np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8,
                      shape=(image.height, image.width, image.bands))


def test_result_names_model_size_seed_steps(handler):
    response = _run(handler, seed=3, steps=2)
    assert response.result == {"model": "lcm-tiny", "width": 64, "height": 64, "seed": 3,
                               "steps": 2, "truncated": False}
    (media,) = response.media
    assert media.content_type == "image/png"
    assert media.data.startswith(b"\x89PNG")
    assert _pixels(media).shape == (64, 64, 3)


def test_same_seed_gives_identical_png(handler):
    assert _run(handler, seed=42).media[0].data == _run(handler, seed=42).media[0].data


def test_different_seed_gives_different_image(handler):
    a, b = _pixels(_run(handler, seed=1).media[0]), _pixels(_run(handler, seed=2).media[0])
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2


def test_different_prompt_gives_different_image(handler):
    a = _pixels(_run(handler, text="a red fox", seed=1).media[0])
    b = _pixels(_run(handler, text="a blue whale", seed=1).media[0])
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1


def test_width_and_height_set_the_image_size(handler):
    response = _run(handler, width=128, height=80)
    assert (response.result["width"], response.result["height"]) == (128, 80)
    assert _pixels(response.media[0]).shape == (80, 128, 3)


def test_progress_reports_every_step(handler):
    seen = []
    _run(handler, steps=3, progress=seen.append)
    assert seen == [{"step": 1, "steps": 3}, {"step": 2, "steps": 3}, {"step": 3, "steps": 3}]


def test_long_prompt_is_truncated_and_says_so(handler):
    assert _run(handler, text="word " * 100).result["truncated"] is True
    assert _run(handler, text="word " * 10).result["truncated"] is False


@pytest.mark.parametrize("text", [None, ""])
def test_empty_prompt_makes_an_unconditioned_image(handler, text):
    response = _run(handler, text=text)
    assert _pixels(response.media[0]).shape == (64, 64, 3)


@pytest.mark.parametrize("fmt,content_type", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_format_param_picks_the_encoding(handler, fmt, content_type):
    (media,) = _run(handler, format=fmt).media
    assert media.content_type == content_type
    assert _pixels(media).shape == (64, 64, 3)


def test_lora_changes_the_image_and_weight_zero_does_not(handler):
    base = _pixels(_run(handler, seed=4).media[0])
    styled = _pixels(_run(handler, seed=4, lora="demo").media[0])
    zero = _pixels(_run(handler, seed=4, lora="demo", lora_weight=0.0).media[0])
    assert np.abs(base.astype(int) - styled.astype(int)).mean() > 2
    assert np.abs(base.astype(int) - zero.astype(int)).max() <= 1


@pytest.mark.parametrize("params,message", [
    ({"width": 72}, "multiple of 16"),
    ({"height": 100}, "multiple of 16"),
    ({"width": 32}, ">= 64"),
    ({"height": 2048}, "<= 1024"),
    ({"steps": 0}, ">= 1"),
    ({"steps": 9}, "<= 8"),
    ({"lora": "nope"}, "unknown lora"),
    ({"format": "gif"}, "one of"),
])
def test_bad_params_are_bad_requests(handler, params, message):
    with pytest.raises(BadRequest, match=message):
        _run(handler, **params)


def test_steps_out_of_range_is_refused_by_the_handler_too(handler):
    with pytest.raises(BadRequest, match="between 1 and 8"):
        handler(Request("lcm", {"steps": 20}, text="x"), no_progress)


def test_unknown_model_is_model_unavailable(handler):
    with pytest.raises(ModelUnavailable, match="not installed"):
        _run(handler, model="sdxl")


def test_compiled_shapes_stay_bounded(lcm_folder, core):
    from workers.api import DeviceSettings, FolderBundle
    from workers.lcm import LCMPipeline

    pipe = LCMPipeline.load(FolderBundle(lcm_folder), core,
                            DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 1}), cache_size=2)
    for size in (64, 80, 96, 112):
        assert pipe("x", steps=1, width=size, height=64).pixels.shape == (64, size, 3)
    assert len(pipe._unets) == 2 and len(pipe._vaes) == 2
