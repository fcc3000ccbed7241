"""The `superres` task: 4x image super-resolution, fast (residual CNN) or quality (LDM-SR),
or any scale through a user's own model (`generic`, a fast-mode bundle).

    handler = load(bundles, core, device)
    response = handler(request, progress)

Params (validated by `edge.tasks`): `mode` fast|quality, `model` (a bundle name; default: the
first built-in bundle of that mode, else the first user's own one), `format` png|jpeg|webp, `quality` (jpeg/webp), `compression` (png
zlib level: 0 is fastest, 1 the default), and for quality mode `steps` and `seed`. Every image
of a request is answered, in request order.

Costs are checked before they are paid: every image's header first (format, declared size),
then the whole request's decoded pixels, 4x outputs and encoded answers against the job's
memory budget; then the images are decoded, upscaled and encoded one at a time, so only one
decoded input and one 4x output live at once, and encoding stops as soon as the answer passes
the one-message limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import openvino as ov
import structlog

from edge import constants as C
from edge.errors import BadRequest, ModelUnavailable
from workers import budget
from workers.api import BundleLike, DeviceSettings, Media, Progress, Request, Response
from workers.superres import imageio
from workers.superres.fast import FastPipeline
from workers.superres.generic import GenericPipeline, is_generic
from workers.superres.quality import LdmPipeline

__all__ = ["FastPipeline", "GenericPipeline", "LdmPipeline", "SuperResHandler", "load"]

log = structlog.get_logger("workers.superres")


def _mode(bundle: BundleLike) -> str:
    return str(bundle.manifest.get("settings", {}).get("mode", "fast"))


def load(bundles: Sequence[BundleLike], core: ov.Core, device: DeviceSettings) -> SuperResHandler:
    """Compile every superres bundle for the device; fail if none is usable."""
    pipelines: dict[str, tuple[str, FastPipeline | LdmPipeline]] = {}
    for bundle in bundles:
        mode = _mode(bundle)
        cls: type[FastPipeline] | type[LdmPipeline] = LdmPipeline if mode == "quality" \
            else GenericPipeline if is_generic(bundle.manifest.get("settings", {})) \
            else FastPipeline
        try:
            pipelines[bundle.name] = (mode, cls.load(bundle, core, device))
        except RuntimeError as exc:  # OpenVINO's errors; a tampered file raises otherwise
            if cls is not GenericPipeline:
                raise
            # a user's model that this device cannot compile must not take the built-in
            # models down with it: it is left out, and asked for, it is `model_unavailable`
            log.error("superres_model_skipped", bundle=bundle.name, device=device.name,
                      error=str(exc))
    if not pipelines:
        raise ModelUnavailable("no superres bundle is installed on this device")
    return SuperResHandler(pipelines, device.job_memory)


class SuperResHandler:
    """Decode, upscale, encode; media in request order, one progress event per image."""

    def __init__(self, pipelines: dict[str, tuple[str, FastPipeline | LdmPipeline]],
                 job_memory: int = C.DEFAULT_JOB_MEMORY) -> None:
        self._pipelines = pipelines
        self.job_memory = job_memory

    def _pick(self, mode: str, model: str | None) -> tuple[str, FastPipeline | LdmPipeline]:
        if model:
            if model not in self._pipelines:
                raise ModelUnavailable(f"superres model {model!r} is not installed here")
            found_mode, pipeline = self._pipelines[model]
            if found_mode != mode:
                raise BadRequest(f"model {model!r} is a {found_mode}-mode model, not {mode}")
            return model, pipeline
        # a user's own model (`prepare superres --from`) answers by default only where no
        # built-in model of the mode is installed: installing one changes no default answer
        ordered = sorted(self._pipelines.items(),
                         key=lambda item: isinstance(item[1][1], GenericPipeline))
        for name, (found_mode, pipeline) in ordered:
            if found_mode == mode:
                return name, pipeline
        raise ModelUnavailable(f"no superres model for mode={mode} is installed here")

    def __call__(self, request: Request, progress: Progress) -> Response:
        """Answer `{"model", "images": [{"width", "height", "content_type"[, "notes"]}]}`."""
        params = request.params
        if not request.media:
            raise BadRequest("superres needs at least one image")
        name, pipeline = self._pick(params.get("mode", "fast"), params.get("model"))
        headers = [imageio.open_image(m.data) for m in request.media]  # headers only
        self._check_budget(pipeline, headers)
        total = len(headers)
        pending = deque(headers)  # each image's loader leaves with its pixels
        del headers
        room = C.MAX_ANSWER_BYTES
        media, described = [], []
        for i in range(total):
            decoded = imageio.decode_header(pending.popleft())
            out = self._upscale(pipeline, decoded, i, total, params, progress)
            alpha = imageio.upscale_array(decoded.alpha, pipeline.scale) \
                if decoded.alpha is not None else None
            item = imageio.encode(out, alpha=alpha, grey=decoded.grey,
                                  fmt=params.get("format", "png"),
                                  quality=int(params.get("quality", 90)),
                                  compression=int(params.get("compression", 1)), limit=room)
            room -= len(item.data)
            media.append(item)
            described.append(_describe(out, item, decoded))
            del decoded, out, alpha  # before the next image is decoded
        return Response(result={"model": name, "images": described}, media=tuple(media))

    def _check_budget(self, pipeline: FastPipeline | LdmPipeline,
                      headers: list[imageio.Header]) -> None:
        """The request's decoded pixels, 4x outputs, working buffers and encoded answers
        against the job's memory budget, from the headers alone."""
        if isinstance(pipeline, LdmPipeline):
            for h in headers:
                pipeline.check_size(h.height, h.width)
        need = sum(h.cost_at(pipeline.scale) + pipeline.working_bytes(h.height, h.width)
                   for h in headers)
        need += imageio.encoded_bound(headers, pipeline.scale)
        pixels = sum(h.pixels for h in headers)
        budget.check(need, self.job_memory,
                     f"upscaling {len(headers)} image(s) of {pixels / 1e6:.1f} MP in all")

    @staticmethod
    def _upscale(pipeline: FastPipeline | LdmPipeline, decoded: imageio.Decoded, index: int,
                 total: int, params: Mapping[str, Any], progress: Progress) -> np.ndarray:
        """One image's 4x RGB pixels, with its progress events."""
        if isinstance(pipeline, FastPipeline):
            (out,) = pipeline([decoded.rgb], on_image=lambda _: progress(
                {"image": index + 1, "images": total}))
            return out
        return pipeline(decoded.rgb, steps=int(params.get("steps", 20)),
                        seed=int(params.get("seed", 0)),
                        on_step=lambda step, steps: progress(
                            {"image": index + 1, "images": total, "step": step,
                             "steps": steps}))


def _describe(out, item: Media, decoded: imageio.Decoded) -> dict:
    info = {"width": int(out.shape[1]), "height": int(out.shape[0]),
            "content_type": item.content_type}
    if decoded.notes:
        info["notes"] = list(decoded.notes)
    return info
