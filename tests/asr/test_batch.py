"""asr jobs queued together run as one (`AsrHandler.batch`): one encoder call over the clips'
windows, decoders stepped together; each job gets exactly the answer it gets alone, its own
error, and the batch holds no more memory than one job may."""

from __future__ import annotations

import time

import numpy as np
import openvino as ov
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from edge import alive
from edge import constants as C
from edge.config import Config, TaskConfig
from edge.errors import EdgeError
from edge.jobs import Answer, Route
from edge.protocol import Submission
from edge.queueing import Enqueuer, queue_name
from workers import batching, perform
from workers.api import DeviceSettings, FolderBundle, Media, Request
from workers.model_store import ModelSet
from workers.worker import EdgeWorker

from .conftest import F32, LONG, SHORT

pytestmark = pytest.mark.slow
# what the worker runs by default on this CPU (bf16): the precision where the decoder's state
# once read stale encoder states in a batch (see WhisperPipeline._hold)
BF16 = DeviceSettings("CPU", {"INFERENCE_NUM_THREADS": 2})
MEDIUM = ". ".join(LONG.split(". ")[:11]) + "."  # ~37 s: two windows


@pytest.fixture(scope="module", params=[F32, BF16], ids=["f32", "bf16"])
def handler(request, prepared):
    import workers.asr

    return workers.asr.load([FolderBundle(prepared)], ov.Core(), request.param)


def _request(data: bytes, content_type: str = "audio/wav", **params) -> Request:
    return Request("asr", params, media=(Media(content_type, data),))


def _alone(handler, requests: list[Request]) -> list[dict | str]:
    out: list[dict | str] = []
    for r in requests:
        try:
            out.append(dict(handler(r, lambda _: None).result))
        except EdgeError as exc:
            out.append(exc.code)
    return out


def _together(handler, requests: list[Request]) -> list[dict | str]:
    return [o.code if isinstance(o, EdgeError) else dict(o.result)
            for o in handler.batch(requests)]


@pytest.fixture(scope="module")
def mixed(speak) -> list[Request]:
    """Clips of different lengths and settings: prompts of three layouts, silence, two windows."""
    silence = np.zeros(16000 * 3, "<i2").tobytes()
    return [
        _request(speak(SHORT[0])),
        _request(speak(MEDIUM)),
        _request(speak(SHORT[1], speed=140)),
        _request(silence, "audio/pcm", sample_rate=16000, format="s16le"),
        _request(speak(SHORT[2]), timestamps=False),
        _request(speak(SHORT[0] + " " + SHORT[2])),
        _request(speak(SHORT[1]), initial_prompt="Kitchen lights."),
        _request(speak(SHORT[2], speed=200)),
    ]


def test_a_batch_answers_each_clip_as_it_is_answered_alone(handler, mixed):
    alone = _alone(handler, mixed)
    together = _together(handler, mixed)
    assert together == alone  # ids, text, segments, language, duration
    assert all(isinstance(a, dict) for a in alone)
    assert alone[3]["text"] == "" and alone[1]["duration"] > 30 and len(alone[1]["segments"]) > 5
    # and in another order, and again: nothing of one batch leaks into the next
    assert _together(handler, mixed[::-1]) == alone[::-1]
    assert _together(handler, mixed[2:5]) == alone[2:5]


def test_one_malformed_clip_fails_alone(handler, speak):
    good = [_request(speak(text)) for text in SHORT]
    bad = {
        "bad_request": [
            _request(speak(SHORT[0])[:44]),  # a WAV header without a single frame
            _request(speak(SHORT[0]), language="de"),  # tiny.en is English-only
            _request(b"\x00\x01" * 800, "audio/pcm", format="s16le"),  # no sample_rate
            Request("asr", {}, media=()),
        ],
        "unsupported_media": [_request(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00junk")],
    }
    requests = [good[0], *bad["bad_request"][:2], good[1], *bad["bad_request"][2:], good[2],
                *bad["unsupported_media"]]
    together = _together(handler, requests)
    assert [together[i] for i in (1, 2, 4, 5, 7)] == ["bad_request"] * 4 + ["unsupported_media"]
    assert [together[i] for i in (0, 3, 6)] == _alone(handler, good)
    assert all(isinstance(together[i], dict) for i in (0, 3, 6))


def test_a_batch_over_one_jobs_memory_runs_in_parts_with_the_same_answers(prepared, speak):
    import workers.asr

    roomy = workers.asr.load([FolderBundle(prepared)], ov.Core(), F32)
    requests = [_request(speak(text)) for text in SHORT * 2]
    jobs = [roomy._open(r) for r in requests]
    # room for two clips' batch rows at once, not three
    memory = max(j.cost for j in jobs) + 2 * max(j.held for j in jobs) + 1
    tight = workers.asr.AsrHandler(roomy.pipelines, memory)
    sizes: list[int] = []
    pipeline = roomy.pipelines["whisper-tiny.en"]
    transcribe = pipeline.transcribe

    def recording(orders):
        sizes.append(len(orders))
        return transcribe(orders)

    pipeline.transcribe = recording  # type: ignore[method-assign]
    try:
        together = _together(tight, requests)
    finally:
        del pipeline.transcribe
    assert sizes == [2, 2, 2]
    assert together == _alone(roomy, requests)


def test_language_detection_runs_batched_on_a_multilingual_model(base_prepared, speak):
    import workers.asr

    from .test_multilingual import DETECTED, GERMAN

    handler = workers.asr.load([FolderBundle(base_prepared)], ov.Core(), BF16)
    requests = [_request(speak(text, voice, 140)) for voice, text in sorted(DETECTED.items())]
    requests += [_request(speak(SHORT[0])), _request(speak(GERMAN, "de", 140), language="de"),
                 _request(speak(GERMAN, "de", 140), task="translate", language="de"),
                 _request(speak(SHORT[1]), timestamps=False)]
    alone = _alone(handler, requests)
    assert _together(handler, requests) == alone
    assert [a["language"] for a in alone[:3]] == sorted(DETECTED)


# the real worker and queue: jobs enqueued as the agent enqueues them, a worker in burst mode

QUEUE = queue_name("asr", "CPU")


def _answers(conn) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for _, fields in conn.xrange(C.OUTBOX_STREAM):
        answer = Answer.from_fields(fields)
        assert answer.route.request_id not in out  # exactly one answer each
        out[answer.route.request_id] = dict(answer.body)
    return out


class _Sizes:
    def __init__(self, handler) -> None:
        self.handler, self.sizes = handler, []

    def __call__(self, request, progress):
        self.sizes.append(1)
        return self.handler(request, progress)

    def batch(self, requests):
        self.sizes.append(len(requests))
        return self.handler.batch(requests)


def _through_a_worker(conn, handler, clips: list[tuple[str, bytes]], max_batch: int):
    conn.flushdb()
    config = Config(tasks={"asr": TaskConfig(devices=("CPU",), device_limit=100,
                                             max_batch=max_batch)})
    alive.beat(conn, "w-asr", [QUEUE], {})  # the enqueue routes only to a live worker's queue
    enq = Enqueuer(conn, config)
    for i, (rid, wav) in enumerate(clips):
        device = f"dev-{i}"
        route = Route(device, rid, "asr", "envelope", f"edge/results/{device}/{rid}")
        enq.submit(Submission(route=route, params={}, media=(("audio/wav", wav),)),
                   received=time.time())
    rec = _Sizes(handler)
    runtime = perform.Runtime("w-asr", "CPU", ModelSet(handlers={"asr": rec}, unavailable={}))
    worker = EdgeWorker([Queue(QUEUE, connection=conn, serializer=JSONSerializer)],
                        runtime=runtime, connection=conn, name="w-asr",
                        batching=batching.limits_of(config.tasks))
    worker.work(burst=True, logging_level="WARNING")
    return _answers(conn), rec.sizes


@pytest.mark.integration
def test_jobs_queued_together_through_a_worker_answer_as_one_at_a_time(conn, prepared, speak):
    import workers.asr

    handler = workers.asr.load([FolderBundle(prepared)], ov.Core(), BF16)
    clips = [(f"clip-{i}", speak(text, speed=150 + 10 * i)) for i, text in enumerate(SHORT * 2)]
    clips.insert(2, ("broken", speak(SHORT[0])[:44]))  # a WAV header without a frame
    alone, sizes_alone = _through_a_worker(conn, handler, clips, 1)
    together, sizes = _through_a_worker(conn, handler, clips, 16)
    assert set(sizes_alone) == {1} and max(sizes) > 1, sizes
    assert together["broken"]["status"] == "error"
    assert together["broken"]["error"]["code"] == "bad_request"
    assert {rid: (b["status"], b.get("result")) for rid, b in together.items()} == \
        {rid: (b["status"], b.get("result")) for rid, b in alone.items()}
    assert {b["status"] for rid, b in together.items() if rid != "broken"} == {"ok"}

