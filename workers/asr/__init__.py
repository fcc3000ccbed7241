"""The `asr` task: speech (WAV or raw PCM) -> text and timed segments with Whisper.

`load` compiles every Whisper bundle the device serves; the handler decodes the audio, picks
the model named by the `model` param and reports progress after each 30 s window.
"""

from __future__ import annotations

from collections.abc import Sequence

import openvino as ov

from edge.constants import DEFAULT_JOB_MEMORY
from edge.errors import BadRequest, ModelUnavailable
from workers import budget
from workers.api import BundleLike, DeviceSettings, Progress, Request, Response
from workers.asr.audio import check_duration, describe, open_clip, pcm_format
from workers.asr.pipeline import Transcript, WhisperPipeline

__all__ = ["load", "WhisperPipeline", "Transcript"]


class AsrHandler:
    """Runs one job on the compiled pipelines (one per bundle)."""

    def __init__(self, pipelines: dict[str, WhisperPipeline],
                 job_memory: int = DEFAULT_JOB_MEMORY) -> None:
        self.pipelines = pipelines
        self.job_memory = job_memory

    def __call__(self, request: Request, progress: Progress) -> Response:
        params = request.params
        pipeline = self._pick(params.get("model"))
        if len(request.media) != 1:
            raise BadRequest("asr takes exactly one audio item")
        media = request.media[0]
        s = pipeline.settings
        # header first: rate, channels, encoding, duration and memory, before any decoding
        clip = open_clip(media.data, raw=pcm_format(media.content_type, dict(params)))
        check_duration(clip, s["max_audio_seconds"])
        rate = s["sample_rate"]
        need = clip.cost(rate) + pipeline.working_bytes(clip.frames_at(rate))
        budget.check(need, self.job_memory, f"transcribing {describe(clip)}")
        audio = clip.decode(rate)
        result = pipeline(audio, language=params.get("language"),
                          task=params.get("task", "transcribe"),
                          initial_prompt=params.get("initial_prompt"),
                          timestamps=params.get("timestamps", True), progress=progress)
        return Response(result=_to_json(pipeline.name, result))

    def _pick(self, name: str | None) -> WhisperPipeline:
        if name is None:
            return next(iter(self.pipelines.values()))
        if name not in self.pipelines:
            have = ", ".join(sorted(self.pipelines)) or "none"
            raise ModelUnavailable(f"asr model {name!r} is not loaded here (have: {have})")
        return self.pipelines[name]


def _to_json(model: str, t: Transcript) -> dict:
    return {
        "model": model,
        "text": t.text,
        "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in t.segments],
        "language": t.language,
        "duration": round(t.duration, 3),
    }


def load(bundles: Sequence[BundleLike], core: ov.Core, device: DeviceSettings) -> AsrHandler:
    """Compile every asr bundle for `device` once; the handler serves all of them."""
    pipelines = {b.name: WhisperPipeline.load(b, core, device) for b in bundles}
    return AsrHandler(pipelines, device.job_memory)
