"""A user's own super-resolution model (OpenVINO IR or ONNX), served by the fast pipeline's tiles.

    pipeline = GenericPipeline.load(bundle, core, device)
    [big] = pipeline([rgb_uint8_hw3])

`edgectl prepare superres --from PATH` inspects the model once (`generic_prepare`) and writes
what it found into the bundle's settings as an `Interface`; this module only reads it back.
Two interfaces:

* `single`: one image in, one image out, `scale` times larger (u8 or float, NCHW or NHWC);
* `lr+bicubic`: OMZ `single-image-super-resolution-1032`: the low-res image and its 4x bicubic
  upscale in (float NCHW, BGR, 0..255), the upscaled image out (0..1).

Layout, element type and value range are converted by a `PrePostProcessor` inside the
compiled model, so the device does it: every pipeline takes and gives RGB uint8 NHWC. BGR
models have their tiles' channels flipped on the host (see `_feed`). Tiles overlap by `2 * margin` low-res pixels as in `fast`; the cut is exact when the
model's receptive radius (plus 2 pixels of bicubic support for `lr+bicubic`) is within the
margin (`margin` setting, 16 by default), and only approximate for models that see the whole
image (attention over the full input). A static model runs at its native size only: an image
smaller than it is edge-padded up to it, a larger one is cut into native-size tiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.preprocess import PrePostProcessor

from workers.api import BundleLike, DeviceSettings, read_ir
from workers.superres import imageio
from workers.superres.fast import FastPipeline

INTERFACES = ("single", "lr+bicubic")
TILE = 256  # low-res tile of a dynamic model: a heavy model's activations grow with it
MARGIN = 16


@dataclass(frozen=True, slots=True)
class Interface:
    """How to feed and read one model; stored in the bundle's settings (`generic_prepare`).

    `native` holds the model's static low-res input size per axis (None: that axis is dynamic
    and tiles `tile` pixels wide); ranges are what 255 (white) is in the model's numbers.
    """

    xml: str
    interface: str  # one of INTERFACES
    scale: int
    layout: str  # the model's input layout, NCHW or NHWC
    output_layout: str
    input_type: str  # the model's input element type, e.g. u8, f32, f16
    output_type: str
    input_range: float  # 1: 0..1, 255: 0..255
    output_range: float
    channels: str  # rgb or bgr
    lr_index: int
    bicubic_index: int | None
    native: tuple[int | None, int | None]
    tile: int = TILE
    margin: int = MARGIN
    multiple: int = 1  # a dynamic axis' size must be divisible by it

    def to_settings(self) -> dict[str, Any]:
        """The JSON-able form written into bundle.json's settings."""
        out = asdict(self)
        out["native"] = list(self.native)
        return out

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Interface:
        """Read back what `to_settings` wrote (other settings keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in settings.items() if k in known}
        values["native"] = tuple(values.get("native", (None, None)))
        return cls(**values)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """The low-res tile: native along static axes, `tile` along dynamic ones."""
        h, w = self.native
        return (h if h is not None else self.tile, w if w is not None else self.tile)

    @property
    def effective_margin(self) -> int:
        """The margin, narrowed so that tiles still advance by at least half their size."""
        return max(1, min(self.margin, min(self.tile_shape) // 4))


def is_generic(settings: Mapping[str, Any]) -> bool:
    """True for a bundle `edgectl prepare superres --from` made."""
    return settings.get("interface") in INTERFACES


def with_io(model: ov.Model, spec: Interface) -> ov.Model:
    """The model with RGB uint8 NHWC in and out; the conversions run inside the graph."""
    ppp = PrePostProcessor(model)
    indices = [spec.lr_index] + ([spec.bicubic_index] if spec.bicubic_index is not None else [])
    for index in indices:
        port = ppp.input(index)
        port.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        port.model().set_layout(ov.Layout(spec.layout))
        pre = port.preprocess()
        if spec.input_type != "u8":
            pre.convert_element_type(ov.Type.f32)
            if spec.input_range != 255:
                pre.scale(255.0 / spec.input_range)
    port_out = ppp.output(0)
    port_out.model().set_layout(ov.Layout(spec.output_layout))
    port_out.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    post = port_out.postprocess()
    if spec.output_type != "u8":
        post.convert_element_type(ov.Type.f32)
        post.custom(lambda node: to_levels(node, 255.0 / spec.output_range))
    return ppp.build()


def to_levels(node: Any, gain: float) -> Any:
    """Model numbers to 0..255 levels, rounded half to even and clamped, still float: the
    conversion to u8 after it is then exact (a plain Convert truncates)."""
    if gain != 1.0:
        node = ops.multiply(node, ops.constant(np.float32(gain))).output(0)
    return ops.clamp(ops.round(node, "half_to_even"), 0.0, 255.0).output(0)


class GenericPipeline(FastPipeline):
    """Low-res RGB uint8 images in, `scale`x RGB uint8 images out, through a user's model."""

    def __init__(self, model: ov.Model, core: ov.Core, device: DeviceSettings,
                 spec: Interface) -> None:
        super().__init__(model, core, device, tile=spec.tile)
        self.spec = spec
        self.scale = spec.scale
        self.margin = spec.effective_margin
        self.tile_shape = spec.tile_shape
        self.fixed = (spec.native[0] is not None, spec.native[1] is not None)
        self.multiple = spec.multiple

    @classmethod
    def load(cls, bundle: BundleLike, core: ov.Core, device: DeviceSettings) -> GenericPipeline:
        """Read the IR from the bundle, add the conversions; shapes compile on first use."""
        settings = bundle.manifest.get("settings", {})
        spec = Interface.from_settings(settings)
        pipeline = cls(with_io(read_ir(core, bundle, spec.xml), spec), core, device, spec)
        pipeline.warm_up(int(settings.get("warm_up_height", 270)),
                         int(settings.get("warm_up_width", 480)))
        return pipeline

    def working_bytes(self, height: int, width: int) -> int:
        """`FastPipeline.working_bytes`, plus the in-flight bicubic tiles of `lr+bicubic`."""
        extra = 0
        if self.spec.bicubic_index is not None:
            th, tw = self.tile_shape
            extra = 2 * th * tw * 3 * self.scale * self.scale
        return super().working_bytes(height, width) + extra

    def _feed(self, lr: np.ndarray) -> dict:
        if self.spec.channels == "bgr":
            # on the host, not in the graph: with PrePostProcessor's reverse_channels (or our
            # own channel Gather) OpenVINO 2026.4 on CPU gave wrong colours in some graphs
            # (measured: a two-input model lost its low-res reversal; a 0..255 single-input
            # one with an output Gather too), likely its RIC fusion folding the Gathers into
            # the weights (openvino PR #9354). A tile flip is cheap beside the model.
            lr = np.ascontiguousarray(lr[..., ::-1])
        feed = {self.spec.lr_index: lr[None]}
        if self.spec.bicubic_index is not None:
            # per tile: the kept pixels are `margin` away from the tile's edge, farther than
            # the bicubic's 2-pixel support, so this equals a cut of the whole image's bicubic
            feed[self.spec.bicubic_index] = imageio.upscale_array(lr, self.scale)[None]
        return feed

    def _result(self, request: ov.InferRequest) -> np.ndarray:
        out = super()._result(request)
        return out[..., ::-1] if self.spec.channels == "bgr" else out  # pasting copies it

    def _shaped(self, height: int, width: int) -> ov.Model:
        model = self._model.clone()
        if not all(self.fixed):
            shapes = {self.spec.lr_index: [1, height, width, 3]}
            if self.spec.bicubic_index is not None:
                s = self.scale
                shapes[self.spec.bicubic_index] = [1, height * s, width * s, 3]
            model.reshape(shapes)
        return model
