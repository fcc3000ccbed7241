"""The `asr` task: speech (WAV or raw PCM) -> text and timed segments with Whisper.

`load` compiles every Whisper bundle the device serves; the handler decodes the audio, picks
the model named by the `model` param and reports progress after each 30 s window. Jobs queued
together run as one (`batch`): their clips go through the encoder in one call and their
decoders step together (`WhisperPipeline.transcribe`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import openvino as ov

from edge.constants import DEFAULT_JOB_MEMORY
from edge.errors import BadRequest, EdgeError, ModelUnavailable
from workers import budget
from workers.api import BundleLike, DeviceSettings, Progress, Request, Response
from workers.asr.audio import Clip, check_duration, describe, open_clip, pcm_format
from workers.asr.pipeline import ClipRequest, Transcript, WhisperPipeline

__all__ = ["load", "WhisperPipeline", "Transcript", "ClipRequest"]


@dataclass(frozen=True, slots=True)
class _Job:
    """A request checked from its header: its pipeline, its clip (undecoded), its params and
    its memory: `cost` at its peak alone, `held` while it runs with others."""

    pipeline: WhisperPipeline
    clip: Clip
    params: dict[str, Any]
    cost: int
    held: int

    def order(self, progress: Progress | None = None) -> ClipRequest:
        """Decode the audio (its cost was checked) into what the pipeline transcribes."""
        p = self.params
        audio = self.clip.decode(self.pipeline.settings["sample_rate"])
        return ClipRequest(audio, p.get("language"), p.get("task", "transcribe"),
                           p.get("initial_prompt"), p.get("timestamps", True), progress)


class AsrHandler:
    """Runs jobs on the compiled pipelines (one per bundle), one or several at a time."""

    def __init__(self, pipelines: dict[str, WhisperPipeline],
                 job_memory: int = DEFAULT_JOB_MEMORY) -> None:
        self.pipelines = pipelines
        self.job_memory = job_memory

    def __call__(self, request: Request, progress: Progress) -> Response:
        job = self._open(request)
        (result,) = job.pipeline.transcribe([job.order(progress)])
        return Response(result=_to_json(job.pipeline.name, result))

    def batch(self, requests: Sequence[Request]) -> list[Response | EdgeError]:
        """Several jobs (workers/batching.py): each checked on its own (a bad one gets its own
        error, the others run), then the clips of one model transcribed together, in runs
        whose memory fits one job's budget (`_runs`). Each answer is the one the job gets alone."""
        out: list[Response | EdgeError | None] = [None] * len(requests)
        by_model: dict[str, list[tuple[int, _Job]]] = {}
        for i, request in enumerate(requests):
            try:
                job = self._open(request)
            except EdgeError as exc:
                out[i] = exc
                continue
            by_model.setdefault(job.pipeline.name, []).append((i, job))
        for name, jobs in by_model.items():
            for run in _runs(jobs, self.job_memory):
                orders = [(i, job.order()) for i, job in run]
                results = self.pipelines[name].transcribe([o for _, o in orders])
                for (i, _), result in zip(orders, results, strict=True):
                    out[i] = Response(result=_to_json(name, result))
        return [o for o in out if o is not None]

    def _open(self, request: Request) -> _Job:
        """Check a request before decoding anything: model, media, header (rate, channels,
        encoding), duration, language and memory."""
        params = dict(request.params)
        pipeline = self._pick(params.get("model"))
        if len(request.media) != 1:
            raise BadRequest("asr takes exactly one audio item")
        media = request.media[0]
        s = pipeline.settings
        clip = open_clip(media.data, raw=pcm_format(media.content_type, params))
        check_duration(clip, s["max_audio_seconds"])
        pipeline.language(params.get("language"))
        rate = s["sample_rate"]
        samples = clip.frames_at(rate)
        cost = clip.cost(rate) + pipeline.working_bytes(samples)
        budget.check(cost, self.job_memory, f"transcribing {describe(clip)}")
        return _Job(pipeline, clip, params, cost, pipeline.held_bytes(samples))

    def _pick(self, name: str | None) -> WhisperPipeline:
        if name is None:
            return next(iter(self.pipelines.values()))
        if name not in self.pipelines:
            have = ", ".join(sorted(self.pipelines)) or "none"
            raise ModelUnavailable(f"asr model {name!r} is not loaded here (have: {have})")
        return self.pipelines[name]


def _runs(jobs: list[tuple[int, _Job]], memory: int) -> Iterator[list[tuple[int, _Job]]]:
    """The jobs in runs that each fit one job's budget: what all of a run's clips hold at
    once (signal, log-mel, batch row) plus the largest one's peak while it is decoded. A
    batch then holds no more memory than one job may; a job alone always fits (checked)."""
    run: list[tuple[int, _Job]] = []
    held = peak = 0
    for member in jobs:
        job = member[1]
        if run and held + job.held + max(peak, job.cost) > memory:
            yield run
            run, held, peak = [], 0, 0
        run.append(member)
        held, peak = held + job.held, max(peak, job.cost)
    if run:
        yield run


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
