"""Fast 4x super-resolution: the residual CNN on its in-graph bicubic, tiled, bounded shapes.

    pipeline = FastPipeline.load(bundle, core, device)
    [big] = pipeline([rgb_uint8_hw3])

Any image size works: images are cut into tiles of at most `tile` x `tile` low-res pixels that
overlap by `2 * margin`. The margin is wider than the network's receptive radius (5 low-res
pixels), so cutting each overlap in its middle gives exactly what one whole-image pass would:
no blending is needed. Every tile of an image larger than a tile has the same shape, so a
handful of compiled shapes (kept in a small LRU) serve any size. Memory per in-flight request
is bounded by the tile: ~(tile*4)^2 * 3 * 4 bytes per f32 tensor, ~150 MB at tile=512.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import openvino as ov

from workers.api import BundleLike, DeviceSettings, read_ir
from workers.superres.imageio import SCALE

# Receptive radius in low-res pixels: 5 for the body (5x5 conv + three 3x3), 2 for the
# in-graph bicubic base: 8 is safe.
MARGIN = 8
TILE = 512
MAX_SHAPES = 8
# Each compiled shape holds its activations (~105 MB for 500x500 on CPU), so the kept shapes
# are bounded by their total low-res area too: eight requests of eight sizes would otherwise
# grow the worker by ~900 MB for good. Two full tiles' worth; the newest shape always stays.
COMPILED_TILES = 2


@dataclass(frozen=True, slots=True)
class Span:
    """One tile along an axis: it reads [start, start + size) and writes [keep_lo, keep_hi)."""

    start: int
    size: int
    keep_lo: int
    keep_hi: int


def plan_spans(length: int, tile: int = TILE, margin: int = MARGIN) -> tuple[Span, ...]:
    """Equal-sized, evenly spread tiles covering `length`, cut in the middle of each overlap."""
    if length <= tile:
        return (Span(0, length, 0, length),)
    stride = tile - 2 * margin
    count = 1 + -(-(length - tile) // stride)
    starts = np.linspace(0, length - tile, count).round().astype(int).tolist()
    cuts = [0] + [(b + a + tile) // 2 for a, b in pairwise(starts)] + [length]
    return tuple(Span(s, tile, lo, hi) for s, (lo, hi) in zip(starts, pairwise(cuts), strict=True))


@dataclass(frozen=True, slots=True)
class _Tile:
    image: int
    y: Span
    x: Span


class FastPipeline:
    """Low-res RGB uint8 images in, 4x RGB uint8 images out, in the same order.

    One call at a time (a worker runs one job at a time); tiles of the same shape, from one
    image or several, run concurrently through one infer-request queue per compiled shape.

    Subclasses (`generic.GenericPipeline`) change the scale, the margin, the tile shape (a
    static model's native one: `fixed` axes are padded up to it, never reshaped), how a tile
    is fed (`_feed`) and how the model is shaped for a tile (`_shaped`).
    """

    scale: int = SCALE

    def __init__(self, model: ov.Model, core: ov.Core, device: DeviceSettings,
                 tile: int = TILE, max_shapes: int = MAX_SHAPES) -> None:
        self._model = model
        self._core = core
        self._device = device
        self.tile = tile
        self.margin = MARGIN
        self.tile_shape = (tile, tile)
        self.fixed = (False, False)  # axes the model cannot be reshaped along
        self.multiple = 1  # a dynamic axis' size must be divisible by it
        self._max_shapes = max_shapes
        self._compiled: OrderedDict[tuple[int, int], list[ov.InferRequest]] = OrderedDict()

    @classmethod
    def load(cls, bundle: BundleLike, core: ov.Core, device: DeviceSettings) -> FastPipeline:
        """Read the IR from the (decrypted-in-memory) bundle; shapes compile on first use."""
        settings = bundle.manifest.get("settings", {})
        model = read_ir(core, bundle, settings.get("xml", "sr_fast_x4.xml"))
        pipeline = cls(model, core, device, tile=int(settings.get("tile", TILE)))
        pipeline.warm_up(int(settings.get("warm_up_height", 270)),
                         int(settings.get("warm_up_width", 480)))
        return pipeline

    def warm_up(self, height: int, width: int) -> None:
        """Compile the most common shape before the first job."""
        th, tw = self.tile_shape
        self._pool((th if self.fixed[0] else min(height, th),
                    tw if self.fixed[1] else min(width, tw)))

    def working_bytes(self, height: int, width: int) -> int:
        """What a call on one image allocates besides its 4x output: the tile copies handed to
        the infer requests and, for an image thinner than the receptive field, its padding."""
        pads = self._pad((height, width))
        pad = (height + sum(pads[0])) * (width + sum(pads[1])) * 3 if pads else 0
        th, tw = self.tile_shape
        return 2 * th * tw * 3 + pad * (1 + self.scale * self.scale)

    def __call__(self, images: Sequence[np.ndarray],
                 on_image: Callable[[int, np.ndarray], None] | None = None) -> list[np.ndarray]:
        """Upscale every image; `on_image(i, out)` is called (in this thread) as image i
        completes, with its finished output (the array this call returns for it)."""
        pads = [self._pad(img.shape[:2]) for img in images]
        s = self.scale
        if not any(pads):
            return self._upscale(images, on_image)

        def crop(i: int, out: np.ndarray) -> np.ndarray:
            p = pads[i]
            return out[p[0][0] * s:out.shape[0] - p[0][1] * s,
                       p[1][0] * s:out.shape[1] - p[1][1] * s] if p else out

        padded = [np.pad(img, (*p, (0, 0)), mode="edge") if p else img
                  for img, p in zip(images, pads, strict=True)]
        outputs = self._upscale(padded, None if on_image is None
                                else lambda i, out: on_image(i, crop(i, out)))
        return [crop(i, out) for i, out in enumerate(outputs)]

    def _upscale(self, images: Sequence[np.ndarray],
                 on_image: Callable[[int, np.ndarray], None] | None) -> list[np.ndarray]:
        s = self.scale
        outputs = [np.empty((h * s, w * s, 3), np.uint8) for h, w, _ in
                   (img.shape for img in images)]
        th, tw = self.tile_shape
        tiles = [_Tile(i, ys, xs) for i, img in enumerate(images)
                 for ys in plan_spans(img.shape[0], th, self.margin)
                 for xs in plan_spans(img.shape[1], tw, self.margin)]
        pending = [0] * len(images)
        for t in tiles:
            pending[t.image] += 1
        busy: dict[int, tuple[ov.InferRequest, _Tile]] = {}  # id(request) -> its tile

        def collect(request: ov.InferRequest) -> None:
            # plain requests, waited and pasted on this thread: AsyncInferQueue callbacks were
            # seen to deadlock OpenVINO 2026.4 when a queue is destroyed (openvino PR #37073)
            request.wait()
            _, tile = busy.pop(id(request))
            _paste(outputs[tile.image], self._result(request), tile, s)
            pending[tile.image] -= 1
            if pending[tile.image] == 0 and on_image is not None:
                on_image(tile.image, outputs[tile.image])

        for t in tiles:
            request = self._next_request((t.y.size, t.x.size))
            if id(request) in busy:
                collect(request)
            lr = images[t.image][t.y.start:t.y.start + t.y.size, t.x.start:t.x.start + t.x.size]
            request.start_async(self._feed(np.ascontiguousarray(lr)))
            busy[id(request)] = (request, t)
        for request, _ in list(busy.values()):
            collect(request)
        return outputs

    def _next_request(self, shape: tuple[int, int]) -> ov.InferRequest:
        """The next infer request, round robin, of the model compiled for one tile shape."""
        pool = self._pool(shape)
        pool.append(pool.pop(0))
        return pool[-1]

    def _pool(self, shape: tuple[int, int]) -> list[ov.InferRequest]:
        """Infer requests of the model compiled for one low-res tile shape (LRU, bounded)."""
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        th, tw = self.tile_shape
        model = self._shaped(*shape)
        compiled = self._core.compile_model(model, self._device.name,
                                            dict(self._device.properties))
        n = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._compiled[shape] = [compiled.create_infer_request() for _ in range(n)]
        while len(self._compiled) > 1 and (len(self._compiled) > self._max_shapes
                                           or self._area() > COMPILED_TILES * th * tw):
            self._compiled.popitem(last=False)  # idle: every call waits for all it started
        return self._compiled[shape]

    def _area(self) -> int:
        return sum(h * w for h, w in self._compiled)

    def _feed(self, lr: np.ndarray) -> dict:
        """The infer request's inputs for one contiguous (h, w, 3) uint8 low-res tile."""
        return {0: lr[None]}

    def _result(self, request: ov.InferRequest) -> np.ndarray:
        """The finished request's (h * scale, w * scale, 3) uint8 output, valid until the
        request runs again."""
        return request.get_output_tensor(0).data[0]

    def _shaped(self, height: int, width: int) -> ov.Model:
        """The model reshaped for one low-res tile shape (compiled by the caller)."""
        model = self._model.clone()
        model.reshape({0: [1, height, width, 3]})
        return model

    def _pad(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
        """Edge padding for an image thinner than the receptive field (or, along a fixed axis,
        than the model's native tile; or along a dynamic one, not a multiple of `multiple`),
        else None.

        On a thin image the network sees mostly zero padding (a 1x1 grey square rang by 14
        levels); replicated edges are what the in-graph bicubic assumes anyway.
        """
        pads = []
        for n, size, fixed in zip(shape, self.tile_shape, self.fixed, strict=True):
            if fixed and n < size:
                lo = min(self.margin, (size - n) // 2)
                pads.append((lo, size - n - lo))
            elif not fixed:
                lo = hi = self.margin if n < 2 * self.margin else 0
                pads.append((lo, hi + (-(n + lo + hi)) % self.multiple))
            else:
                pads.append((0, 0))
        return tuple(pads) if any(lo or hi for lo, hi in pads) else None


def _paste(out: np.ndarray, result: np.ndarray, tile: _Tile, s: int) -> None:
    y0, x0 = tile.y.keep_lo - tile.y.start, tile.x.keep_lo - tile.x.start
    y1, x1 = tile.y.keep_hi - tile.y.start, tile.x.keep_hi - tile.x.start
    out[tile.y.keep_lo * s:tile.y.keep_hi * s, tile.x.keep_lo * s:tile.x.keep_hi * s] = \
        result[y0 * s:y1 * s, x0 * s:x1 * s]
