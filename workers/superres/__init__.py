"""The `superres` task: 4x image super-resolution, fast (residual CNN) or quality (LDM-SR),
or any scale through a user's own model (`generic`, a fast-mode bundle).

    handler = load(bundles, core, device)
    response = handler(request, progress)
    answers = handler.batch(requests)   # several jobs as one run (workers/batching.py)

Params (validated by `edge.tasks`): `mode` fast|quality, `model` (a bundle name; default: the
first built-in bundle of that mode, else the first user's own one), `format` png|jpeg|webp, `quality` (jpeg/webp), `compression` (png
zlib level: 0 is fastest, 1 the default), and for quality mode `steps` and `seed`. Every image
of a request is answered, in request order.

Costs are checked before they are paid: every image's header first (format, declared size),
then the whole request's decoded pixels, 4x outputs and encoded answers against the job's
memory budget; then the images are decoded, upscaled and encoded one at a time, so only one
decoded input and one 4x output live at once, and encoding stops as soon as the answer passes
the one-message limit. A batch (`SuperResHandler.batch`) checks each request the same way, then
upscales the images of its fast-mode requests together, in waves that need at most one job's
budget together (`_waves`), and answers each request exactly as one job would be answered.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
import structlog

from edge import constants as C
from edge.errors import BadRequest, EdgeError, ModelUnavailable
from workers import budget
from workers.api import BundleLike, DeviceSettings, Media, Progress, Request, Response, no_progress
from workers.superres import imageio
from workers.superres.fast import FastPipeline
from workers.superres.generic import GenericPipeline, is_generic
from workers.superres.quality import LdmPipeline

__all__ = ["FastPipeline", "GenericPipeline", "LdmPipeline", "SuperResHandler", "load"]

log = structlog.get_logger("workers.superres")

# Threads a batch encodes its answers on: libvips' PNG / JPEG / WebP savers run on one thread,
# and a 1080p PNG answer took longer than the model's upscale of it (measured 1.2-1.7x for 16
# 480x270 jobs, LATENCY hint); so several jobs' answers are encoded at once, beside the
# pipeline's inference. A single job encodes on its own thread, as before.
ENCODERS = min(4, os.cpu_count() or 1)


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
        name, pipeline, headers = self._open(request)
        params = request.params
        total = len(headers)
        pending = deque(headers)  # each image's loader leaves with its pixels
        del headers
        room = C.MAX_ANSWER_BYTES
        media, described = [], []
        for i in range(total):
            decoded = imageio.decode_header(pending.popleft())
            out = self._upscale(pipeline, decoded, i, total, params, progress)
            item = _encode(out, decoded, pipeline.scale, params, room)
            room -= len(item.data)
            media.append(item)
            described.append(_describe(out, item, decoded))
            del decoded, out  # before the next image is decoded
        return Response(result={"model": name, "images": described}, media=tuple(media))

    def batch(self, requests: Sequence[Request]) -> list[Response | EdgeError]:
        """Several jobs as one run (workers/batching.py), one answer or error per request, in
        order, each byte for byte what `__call__` answers it.

        Each request is checked on its own (params, headers, budget: an error fails only its
        job). The fast-mode images of all of them go through one pipeline call, so the tiles
        of every job share the infer requests; waves bound what is held at once (`_waves`).
        Quality-mode (diffusion) requests run one at a time: a job is seconds of UNet steps,
        so a batch gains nothing and would multiply the latents' memory.
        """
        out: list[Response | EdgeError | None] = [None] * len(requests)
        fast: list[_Opened] = []
        for i, request in enumerate(requests):
            try:
                name, pipeline, headers = self._open(request)
            except EdgeError as exc:
                out[i] = exc
                continue
            if isinstance(pipeline, FastPipeline):
                fast.append(_Opened(i, request, name, pipeline, headers))
            else:
                del headers
                out[i] = _answer_alone(self, request)
        for wave in _waves(fast, self.job_memory):
            for opened, answer in zip(wave, _run_wave(wave), strict=True):
                out[opened.index] = answer
        return [o for o in out if o is not None]

    def runs_alone(self, params: Mapping[str, Any]) -> bool:
        """Whether a job with `params` must run on its own, not in a batch
        (workers/batching.py): a quality-mode (diffusion) job is seconds of UNet steps with
        step progress and its own time limit."""
        try:
            _, pipeline = self._pick(params.get("mode", "fast"), params.get("model"))
        except EdgeError:
            return False  # the batch answers its error
        return isinstance(pipeline, LdmPipeline)

    def _open(self, request: Request
              ) -> tuple[str, FastPipeline | LdmPipeline, list[imageio.Header]]:
        """The request's model and image headers, its whole cost checked against the budget
        before any pixel is decoded."""
        if not request.media:
            raise BadRequest("superres needs at least one image")
        params = request.params
        name, pipeline = self._pick(params.get("mode", "fast"), params.get("model"))
        headers = [imageio.open_image(m.data) for m in request.media]  # headers only
        self._check_budget(pipeline, headers)
        return name, pipeline, headers

    def _check_budget(self, pipeline: FastPipeline | LdmPipeline,
                      headers: list[imageio.Header]) -> None:
        """The request's decoded pixels, 4x outputs, working buffers and encoded answers
        against the job's memory budget, from the headers alone."""
        if isinstance(pipeline, LdmPipeline):
            for h in headers:
                pipeline.check_size(h.height, h.width)
        pixels = sum(h.pixels for h in headers)
        budget.check(_need(pipeline, headers), self.job_memory,
                     f"upscaling {len(headers)} image(s) of {pixels / 1e6:.1f} MP in all")

    @staticmethod
    def _upscale(pipeline: FastPipeline | LdmPipeline, decoded: imageio.Decoded, index: int,
                 total: int, params: Mapping[str, Any], progress: Progress) -> np.ndarray:
        """One image's 4x RGB pixels, with its progress events."""
        if isinstance(pipeline, FastPipeline):
            (out,) = pipeline([decoded.rgb], on_image=lambda _i, _out: progress(
                {"image": index + 1, "images": total}))
            return out
        return pipeline(decoded.rgb, steps=int(params.get("steps", 20)),
                        seed=int(params.get("seed", 0)),
                        on_step=lambda step, steps: progress(
                            {"image": index + 1, "images": total, "step": step,
                             "steps": steps}))


@dataclass(slots=True)
class _Opened:
    """A batched request, checked: its model and image headers, and what it may hold."""

    index: int  # in the batch
    request: Request
    name: str
    pipeline: FastPipeline
    headers: list[imageio.Header]

    @property
    def need(self) -> int:
        return _need(self.pipeline, self.headers)


def _need(pipeline: FastPipeline | LdmPipeline, headers: Sequence[imageio.Header]) -> int:
    """The most bytes a request's images make a worker hold (`_check_budget`): each image's
    decoded pixels and 4x output, the pipeline's working buffers, the encoded answers."""
    need = sum(h.cost_at(pipeline.scale) + pipeline.working_bytes(h.height, h.width)
               for h in headers)
    return need + imageio.encoded_bound(headers, pipeline.scale)


def _waves(opened: Sequence[_Opened], job_memory: int) -> list[list[_Opened]]:
    """The checked fast-mode requests in waves of one pipeline each, in order, every wave
    needing at most one job's budget together (a request always fits alone: it was checked).

    A single job holds one image's pixels at a time, a wave all of its images' at once; its
    requests' `need` counts every image's pixels and 4x output as held together, so a wave
    holds no more than `job_memory`, and no more than its jobs would one by one together.
    """
    waves: list[list[_Opened]] = []
    held = 0
    for o in opened:
        same = waves and waves[-1][0].pipeline is o.pipeline
        if same and held + o.need <= job_memory:
            waves[-1].append(o)
            held += o.need
        else:
            waves.append([o])
            held = o.need
    return waves


def _run_wave(wave: Sequence[_Opened]) -> list[Response | EdgeError]:
    """One pipeline call for every image of the wave's requests; each request's answer is
    encoded as `__call__` encodes it, on `ENCODERS` threads, as soon as its last image is
    upscaled (while the pipeline runs the others' tiles). A decode or encode error fails only
    its request."""
    pipeline = wave[0].pipeline
    decoded: list[list[imageio.Decoded] | EdgeError] = []
    for o in wave:
        try:
            decoded.append([imageio.decode_header(h) for h in o.headers])
        except EdgeError as exc:
            decoded.append(exc)
        o.headers = []  # each image's loader leaves with its pixels
    owner = [(j, k) for j, ds in enumerate(decoded) if not isinstance(ds, EdgeError)
             for k in range(len(ds))]  # image -> (request, its place in the request)
    outs: list[list[Any]] = [[None] * len(ds) if not isinstance(ds, EdgeError) else []
                             for ds in decoded]
    left = [len(o) for o in outs]
    # a decode error is its request's answer; the others' answers are their encodes
    answers: list[EdgeError | Future[Response | EdgeError] | None] = [
        ds if isinstance(ds, EdgeError) else None for ds in decoded]
    with ThreadPoolExecutor(min(ENCODERS, len(wave))) as pool:

        def upscaled(i: int, out: np.ndarray) -> None:
            j, k = owner[i]
            outs[j][k] = out
            left[j] -= 1
            if left[j] == 0:  # the request's last image: encode it beside the pipeline
                ds = decoded[j]
                assert not isinstance(ds, EdgeError)
                answers[j] = pool.submit(_respond, wave[j], ds, outs[j])

        pipeline([d.rgb for ds in decoded if not isinstance(ds, EdgeError) for d in ds],
                 on_image=upscaled)
    if None in answers:  # the pipeline skipped an image: a bug; the batch runs again alone
        raise RuntimeError("the pipeline did not report every image of the batch")
    return [a.result() if isinstance(a, Future) else a for a in answers if a is not None]


def _respond(o: _Opened, decoded: Sequence[imageio.Decoded],
             outs: list[np.ndarray]) -> Response | EdgeError:
    """One batched request's answer from its upscaled images, as `__call__` builds it (its
    images one at a time: each image's room in the answer depends on the ones before it)."""
    room = C.MAX_ANSWER_BYTES
    media, described = [], []
    try:
        for d, out in zip(decoded, outs, strict=True):
            item = _encode(out, d, o.pipeline.scale, o.request.params, room)
            room -= len(item.data)
            media.append(item)
            described.append(_describe(out, item, d))
    except EdgeError as exc:
        return exc
    finally:
        outs.clear()  # ours: once the pipeline's call has returned too, the pixels go
    return Response(result={"model": o.name, "images": described}, media=tuple(media))


def _answer_alone(handler: SuperResHandler, request: Request) -> Response | EdgeError:
    try:
        return handler(request, no_progress)
    except EdgeError as exc:
        return exc


def _encode(out: np.ndarray, decoded: imageio.Decoded, scale: int,
            params: Mapping[str, Any], room: int) -> Media:
    """One upscaled image in the asked format, its alpha upscaled beside it."""
    alpha = imageio.upscale_array(decoded.alpha, scale) if decoded.alpha is not None else None
    return imageio.encode(out, alpha=alpha, grey=decoded.grey, fmt=params.get("format", "png"),
                          quality=int(params.get("quality", 90)),
                          compression=int(params.get("compression", 1)), limit=room)


def _describe(out, item: Media, decoded: imageio.Decoded) -> dict:
    info = {"width": int(out.shape[1]), "height": int(out.shape[0]),
            "content_type": item.content_type}
    if decoded.notes:
        info["notes"] = list(decoded.notes)
    return info
