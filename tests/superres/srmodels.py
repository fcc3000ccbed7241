"""Tiny super-resolution models built in-test (OpenVINO opset), and a direct run of them.

Each model is a nearest-neighbour upscale plus a small random 3x3-conv residual (receptive
radius 1 low-res pixel), so that its output looks like its input (the output-range detection
sees a real mean) while every output pixel still depends on its neighbours (tiling errors
would show).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from tests.superres.conftest import F32
from workers.superres import imageio


def _conv_up(x, scale: int, *, centre: float, seed: int):
    """(1, 3, h, w) f32 -> (1, 3, h*s, w*s): depth_to_space of a 3x3 conv."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.04, (3 * scale * scale, 3, 3, 3)).astype(np.float32)
    for c in range(3):
        w[c * scale * scale:(c + 1) * scale * scale, c, 1, 1] += centre
    y = ops.convolution(x, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1])
    return ops.depth_to_space(y, "depth_first", scale)


def single(scale: int, *, layout: str = "NCHW", dtype: str = "f32",
           hw: tuple[int, int] | None = None, seed: int = 0) -> ov.Model:
    """One image in, one out (same layout); u8 models clamp and round to u8 at the end."""
    h, w = hw or (-1, -1)
    shape = [1, 3, h, w] if layout == "NCHW" else [1, h, w, 3]
    x = ops.parameter(shape, ov.Type.u8 if dtype == "u8" else ov.Type.f32, name="lr")
    t = ops.convert(x, ov.Type.f32) if dtype == "u8" else x
    if layout == "NHWC":
        t = ops.transpose(t, ops.constant(np.array([0, 3, 1, 2], np.int64)))
    y = _conv_up(t, scale, centre=1.0, seed=seed)
    if layout == "NHWC":
        y = ops.transpose(y, ops.constant(np.array([0, 2, 3, 1], np.int64)))
    if dtype == "u8":
        y = ops.convert(ops.clamp(ops.round(y, "half_to_even"), 0.0, 255.0), ov.Type.u8)
    return ov.Model([y], [x], "sr-single")


def needs_multiple(scale: int, multiple: int) -> ov.Model:
    """A dynamic f32 NCHW model that only runs on sizes divisible by `multiple` (a
    space-to-depth and back, as strided encoders and window attention need), otherwise
    `single`'s convolution: translation-equivariant, so tiles stay exact."""
    x = ops.parameter([1, 3, -1, -1], ov.Type.f32, name="lr")
    t = ops.depth_to_space(ops.space_to_depth(x, "depth_first", multiple), "depth_first",
                           multiple)
    return ov.Model([_conv_up(t, scale, centre=1.0, seed=5)], [x], "sr-multiple")


def lr_bicubic(hw: tuple[int, int] | None = (24, 32), seed: int = 0) -> ov.Model:
    """The OMZ 1032 form: "0" low-res (1, 3, h, w) and "1" its 4x bicubic, BGR 0..255 in,
    0..1 out: (bicubic + conv residual of the low-res image) / 255."""
    h, w = hw or (-1, -1)
    lr = ops.parameter([1, 3, h, w], ov.Type.f32, name="0")
    bic = ops.parameter([1, 3, h * 4 if h > 0 else -1, w * 4 if w > 0 else -1], ov.Type.f32,
                        name="1")
    y = ops.add(bic, _conv_up(lr, 4, centre=0.0, seed=seed))
    y = ops.multiply(y, ops.constant(np.float32(1 / 255)))
    return ov.Model([y], [lr, bic], "sr-1032-like")


def save(model: ov.Model, folder: Path, name: str = "model") -> Path:
    """The model as an IR in `folder` (uncompressed weights); returns the .xml path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.xml"
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def direct(model: ov.Model, rgb: np.ndarray, *, scale: int, layout: str = "NCHW",
           input_range: float = 1.0, output_range: float | None = None,
           bgr: bool = False, two: bool = False) -> np.ndarray:
    """The whole image through the bare model in one run, pre/post-processed in numpy:
    the reference the pipeline (PrePostProcessor + tiles) must reproduce."""

    def as_input(img: np.ndarray) -> np.ndarray:
        x = img[..., ::-1] if bgr else img
        if model.inputs[0].get_element_type() != ov.Type.u8:
            x = x.astype(np.float32) / np.float32(255.0 / input_range)
        x = x[None]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)

    inputs = [as_input(rgb)]
    if two:
        inputs.append(as_input(imageio.upscale_array(rgb, scale)))
    shaped = model.clone()
    shaped.reshape({i: list(x.shape) for i, x in enumerate(inputs)})
    out = np.asarray(ov.Core().compile_model(shaped, "CPU", F32)(inputs)[0])[0]
    if layout == "NCHW":
        out = out.transpose(1, 2, 0)
    if out.dtype != np.uint8:
        gain = np.float32(255.0 / (output_range or input_range))
        out = np.clip(np.rint(out * gain), 0, 255).astype(np.uint8)
    return out[..., ::-1] if bgr else out
