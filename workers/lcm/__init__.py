"""The `lcm` task: prompt -> image with a Latent Consistency Model.

    handler = load(bundles, core, DeviceSettings("CPU"))
    response = handler(Request("lcm", {"steps": 4, "seed": 7}, text="a red fox"), no_progress)

Params (validated by the agent, see `edge.tasks`): model, steps (1-8), seed, guidance_scale,
width/height (multiples of the bundle's `size_multiple`: 16 for lcm-tiny, 64 for SD1.5-class
UNets exported by optimum; default the bundle's size), lora/lora_weight, format.
Result: {"model", "width", "height", "seed", "steps", "truncated"} and one image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import openvino as ov

from edge.constants import DEFAULT_JOB_MEMORY
from edge.errors import BadRequest, ModelUnavailable
from workers import budget
from workers.api import BundleLike, DeviceSettings, Media, Progress, Request, Response
from workers.lcm._image import CONTENT_TYPES, encode
from workers.lcm.pipeline import LCMPipeline, LCMResult

__all__ = ["LCMHandler", "LCMPipeline", "LCMResult", "load"]

# bytes per output pixel a job holds: the VAE's float32 output and the float32 copies its
# post-processing makes (~60), the uint8 image and its encoded copies (~10); latents are 1/64
PIXEL_BYTES = 80


def load(bundles: Sequence[BundleLike], core: ov.Core, device: DeviceSettings) -> LCMHandler:
    """Compile every `lcm` bundle for the device; the first is the default model."""
    if not bundles:
        raise ModelUnavailable("no lcm model bundle is installed")
    return LCMHandler({b.name: LCMPipeline.load(b, core, device) for b in bundles},
                      device.job_memory)


class LCMHandler:
    """Adapts a job's params to `LCMPipeline` calls and its image to a `Response`."""

    def __init__(self, pipelines: Mapping[str, LCMPipeline],
                 job_memory: int = DEFAULT_JOB_MEMORY) -> None:
        self.pipelines = dict(pipelines)
        self.default = next(iter(self.pipelines))
        self.job_memory = job_memory

    def __call__(self, request: Request, progress: Progress) -> Response:
        """Run one job; raises `BadRequest` / `ModelUnavailable` for what the client must fix."""
        params = request.params
        name = params.get("model") or self.default
        pipe = self.pipelines.get(name)
        if pipe is None:
            raise ModelUnavailable(f"lcm model {name!r} is not installed here "
                                   f"(have: {', '.join(self.pipelines)})")
        prompt = _prompt(request.text)
        width, height = check_size(pipe.settings, params.get("width"), params.get("height"))
        budget.check(width * height * PIXEL_BYTES, self.job_memory, f"a {width}x{height} image")
        steps = int(params.get("steps", 4))
        if not 1 <= steps <= 8:
            raise BadRequest("param 'steps' must be between 1 and 8")
        lora = params.get("lora") or None
        if lora is not None and lora not in pipe.lora_names:
            known = ", ".join(pipe.lora_names) or "none"
            raise BadRequest(f"unknown lora {lora!r} for model {name!r} (have: {known})")
        seed = int(params.get("seed", 0))
        result = pipe(prompt, steps=steps, seed=seed,
                      guidance_scale=float(params.get("guidance_scale", 8.0)),
                      width=width, height=height, lora=lora,
                      lora_weight=float(params.get("lora_weight", 1.0)),
                      on_step=lambda i, n, *_: progress({"step": i + 1, "steps": n}))
        fmt = params.get("format", "png")
        media = Media(CONTENT_TYPES[fmt], encode(result.pixels, fmt))
        return Response(result={"model": name, "width": width, "height": height, "seed": seed,
                                "steps": steps, "truncated": result.truncated},
                        media=(media,))


def _prompt(text: Any) -> str:
    if text is None:
        return ""  # an empty prompt is an unconditioned image, as in diffusers
    if isinstance(text, tuple):
        if len(text) != 1:
            raise BadRequest("lcm takes one prompt per job")
        text = text[0]
    if not isinstance(text, str):
        raise BadRequest("the prompt must be text")
    return text


def check_size(settings: Mapping[str, Any], width: Any, height: Any) -> tuple[int, int]:
    """(width, height) with the bundle's defaults, or `BadRequest` if not a valid multiple."""
    multiple = int(settings.get("size_multiple", 8))
    out = []
    for label, value, default in (("width", width, settings["default_width"]),
                                  ("height", height, settings["default_height"])):
        value = int(default if value is None else value)
        if not 64 <= value <= int(settings.get("max_side", 1024)):
            raise BadRequest(f"param {label!r} must be between 64 and "
                             f"{int(settings.get('max_side', 1024))}")
        if value % multiple:
            raise BadRequest(f"param {label!r} must be a multiple of {multiple} for this model")
        out.append(value)
    return out[0], out[1]
