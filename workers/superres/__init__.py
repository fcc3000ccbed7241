"""The `superres` task: 4x image super-resolution, fast (residual CNN) or quality (LDM-SR).

    handler = load(bundles, core, device)
    response = handler(request, progress)

Params (validated by `edge.tasks`): `mode` fast|quality, `model` (a bundle name; default: the
first bundle of that mode), `format` png|jpeg|webp, `quality` (jpeg/webp), `compression` (png
zlib level: 0 is fastest, 1 the default), and for quality mode `steps` and `seed`. Every image of a request is answered, in request order.
"""

from __future__ import annotations

from typing import Sequence

import openvino as ov

from edge.errors import BadRequest, ModelUnavailable
from workers.api import BundleLike, DeviceSettings, Media, Progress, Request, Response
from workers.superres import imageio
from workers.superres.fast import FastPipeline
from workers.superres.quality import LdmPipeline

__all__ = ["FastPipeline", "LdmPipeline", "SuperResHandler", "load"]


def _mode(bundle: BundleLike) -> str:
    return str(bundle.manifest.get("settings", {}).get("mode", "fast"))


def load(bundles: Sequence[BundleLike], core: ov.Core, device: DeviceSettings) -> SuperResHandler:
    """Compile every superres bundle for the device; fail if none is usable."""
    pipelines: dict[str, tuple[str, FastPipeline | LdmPipeline]] = {}
    for bundle in bundles:
        mode = _mode(bundle)
        cls = LdmPipeline if mode == "quality" else FastPipeline
        pipelines[bundle.name] = (mode, cls.load(bundle, core, device))
    if not pipelines:
        raise ModelUnavailable("no superres bundle is installed on this device")
    return SuperResHandler(pipelines)


class SuperResHandler:
    """Decode, upscale, encode; media in request order, one progress event per image."""

    def __init__(self, pipelines: dict[str, tuple[str, FastPipeline | LdmPipeline]]) -> None:
        self._pipelines = pipelines

    def _pick(self, mode: str, model: str | None) -> tuple[str, FastPipeline | LdmPipeline]:
        if model:
            if model not in self._pipelines:
                raise ModelUnavailable(f"superres model {model!r} is not installed here")
            found_mode, pipeline = self._pipelines[model]
            if found_mode != mode:
                raise BadRequest(f"model {model!r} is a {found_mode}-mode model, not {mode}")
            return model, pipeline
        for name, (found_mode, pipeline) in self._pipelines.items():
            if found_mode == mode:
                return name, pipeline
        raise ModelUnavailable(f"no superres model for mode={mode} is installed here")

    def __call__(self, request: Request, progress: Progress) -> Response:
        """Answer `{"model", "images": [{"width", "height", "content_type"[, "notes"]}]}`."""
        params = request.params
        if not request.media:
            raise BadRequest("superres needs at least one image")
        name, pipeline = self._pick(params.get("mode", "fast"), params.get("model"))
        decoded = [imageio.decode(m.data) for m in request.media]
        total = len(decoded)

        def image_done(index: int) -> None:
            progress({"image": index + 1, "images": total})

        if isinstance(pipeline, FastPipeline):
            outputs = pipeline([d.rgb for d in decoded], on_image=image_done)
        else:
            outputs = []
            for i, d in enumerate(decoded):
                outputs.append(pipeline(
                    d.rgb, steps=int(params.get("steps", 20)), seed=int(params.get("seed", 0)),
                    on_step=lambda step, steps, i=i: progress(
                        {"image": i + 1, "images": total, "step": step, "steps": steps})))
        media, described = [], []
        for d, out in zip(decoded, outputs):
            alpha = imageio.upscale_array(d.alpha) if d.alpha is not None else None
            item = imageio.encode(out, alpha=alpha, grey=d.grey,
                                  fmt=params.get("format", "png"),
                                  quality=int(params.get("quality", 90)),
                                  compression=int(params.get("compression", 1)))
            media.append(item)
            described.append(_describe(out, item, d))
        return Response(result={"model": name, "images": described}, media=tuple(media))


def _describe(out, item: Media, decoded: imageio.Decoded) -> dict:
    info = {"width": int(out.shape[1]), "height": int(out.shape[0]),
            "content_type": item.content_type}
    if decoded.notes:
        info["notes"] = list(decoded.notes)
    return info
