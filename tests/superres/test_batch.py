"""Batched superres (`SuperResHandler.batch`): several jobs' images through one pipeline call,
each job answered byte for byte as it is answered alone; a bad input fails only its own job."""

from __future__ import annotations

import time

import numpy as np
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
from tests.superres import srmodels
from tests.superres.conftest import F32, THREADS, photo, png, request
from workers import batching, perform
from workers.api import DeviceSettings, FolderBundle, Request, Response, no_progress
from workers.model_store import ModelSet
from workers.superres import SuperResHandler, _need, load
from workers.superres.fast import FastPipeline
from workers.superres.prepare import prepare_from
from workers.worker import EdgeWorker


def _rgba(h: int, w: int, seed: int) -> np.ndarray:
    return np.dstack([photo(h, w, seed=seed), np.linspace(0, 255, h * w, dtype=np.uint8)
                      .reshape(h, w)])


def _mixed() -> list[Request]:
    """Requests of every shape a batch may hold: same-size photos, several sizes (one of
    several tiles, one thinner than the receptive field), alpha, grey, several images in one
    request, every output format."""
    return [
        request(png(photo(270, 480, seed=1))),
        request(png(photo(270, 480, seed=2)), format="jpeg", quality=80),
        request(png(photo(75, 50, seed=3)), png(photo(270, 480, seed=4))),
        request(png(photo(530, 610, seed=5)), compression=0),
        request(png(_rgba(40, 64, seed=6)), format="webp"),
        request(png(photo(5, 9, seed=7)[..., 0])),
        request(png(photo(270, 480, seed=8))),
    ]


def _same(got: Response | EdgeError, want: Response | EdgeError) -> None:
    """The same answer: result and every image's bytes, or the same error."""
    if isinstance(want, EdgeError):
        assert isinstance(got, type(want)) and got.message == want.message, (got, want)
        return
    assert isinstance(got, Response), got
    assert got.result == want.result
    assert [(m.content_type, m.data) for m in got.media] == \
        [(m.content_type, m.data) for m in want.media]


def _alone(handler, r: Request) -> Response | EdgeError:
    try:
        return handler(r, no_progress)
    except EdgeError as exc:
        return exc


@pytest.fixture(scope="module")
def fast_handlers(prepared, core):
    """The fast model under both performance hints: one infer request (LATENCY), or several
    running tiles of different jobs at once (THROUGHPUT)."""
    bundle = FolderBundle(prepared["sr-fast-x4"])
    return {hint: load([bundle], core, DeviceSettings("CPU", {**THREADS,
                                                              "PERFORMANCE_HINT": hint}))
            for hint in ("LATENCY", "THROUGHPUT")}


@pytest.mark.parametrize("hint", ["LATENCY", "THROUGHPUT"])
def test_a_batch_answers_every_job_byte_for_byte_as_alone(fast_handlers, hint):
    handler = fast_handlers[hint]
    requests = _mixed()
    alone = [_alone(handler, r) for r in requests]
    assert all(isinstance(a, Response) for a in alone)
    for got, want in zip(handler.batch(requests), alone, strict=True):
        _same(got, want)


def test_the_installed_handler_batches_both_modes_as_alone(handler):
    """Fast and quality (LDM) requests in one batch: the quality one runs alone, and every
    answer is what the job gets alone."""
    requests = [request(png(photo(270, 480, seed=1))),
                request(png(photo(32, 40, seed=2)), mode="quality", steps=2, seed=3),
                request(png(photo(64, 64, seed=4)))]
    alone = [_alone(handler, r) for r in requests]
    for got, want in zip(handler.batch(requests), alone, strict=True):
        _same(got, want)


def test_one_malformed_input_fails_only_its_own_job(handler):
    good = png(photo(270, 480, seed=1))
    corrupt = good[:len(good) // 2]  # its header reads; its pixels end halfway
    requests = [request(good),
                Request(task="superres", params={}),  # no image
                request(corrupt),
                request(png(photo(40, 50, seed=2)), model="sr-ldm-x4-tiny"),  # wrong mode
                request(b"GIF89a not an image we take"),
                request(png(photo(60, 30, seed=3)), format="jpeg")]
    alone = [_alone(handler, r) for r in requests]
    got = handler.batch(requests)
    assert [a.code if isinstance(a, EdgeError) else "ok" for a in got] == [
        "ok", "bad_request", "unsupported_media", "bad_request", "unsupported_media", "ok"]
    for g, want in zip(got, alone, strict=True):
        _same(g, want)


def test_a_batch_past_one_jobs_budget_runs_in_waves(fast_handlers, monkeypatch):
    """Together the jobs need more than one job may hold: their images go through the
    pipeline in several calls, each within the budget; a job over it alone fails alone."""
    base = fast_handlers["LATENCY"]
    requests = [request(png(photo(270, 480, seed=i))) for i in range(5)]
    _, pipeline, headers = base._open(requests[0])
    need = _need(pipeline, headers)  # what one of these jobs may hold
    tight = SuperResHandler(base._pipelines, job_memory=2 * need + need // 2)  # two per wave
    big = request(png(photo(540, 960, seed=9)))  # four times the pixels: over the budget
    calls: list[int] = []
    original = FastPipeline.__call__

    def spy(self, images, on_image=None):
        calls.append(len(images))
        return original(self, images, on_image)

    alone = [_alone(tight, r) for r in [*requests, big]]
    monkeypatch.setattr(FastPipeline, "__call__", spy)
    got = tight.batch([*requests, big])
    assert calls == [2, 2, 1]
    assert got[-1].code == "payload_too_large"
    for g, want in zip(got, alone, strict=True):
        _same(g, want)


def test_a_users_own_model_batches_as_alone(tmp_path, core):
    """A generic (user) model, BGR with a bicubic second input, small tiles: many tiles of
    several jobs in flight together, the same bytes as one job at a time."""
    src = srmodels.save(srmodels.lr_bicubic(hw=None), tmp_path / "src" / "mine")
    folder = prepare_from(src, tmp_path / "prepared", name="mine", options={"tile": "32"})
    handler = load([FolderBundle(folder)], core, DeviceSettings("CPU", F32))
    requests = [request(png(photo(70, 90, seed=s))) for s in range(3)]
    requests += [request(png(photo(33, 20, seed=5)), png(photo(70, 90, seed=6)))]
    alone = [_alone(handler, r) for r in requests]
    for got, want in zip(handler.batch(requests), alone, strict=True):
        _same(got, want)


# Through the real worker and queue (as tests/tokenize/test_batching.py): jobs queued together
# are taken as one batch and each job's answer in the outbox is the one it gets alone.

QUEUE = queue_name("superres", "CPU")


def _config(max_batch: int) -> Config:
    return Config(tasks={"superres": TaskConfig(devices=("CPU",), device_limit=100,
                                                max_batch=max_batch)})


def _submit_all(conn, max_batch: int) -> None:
    alive.beat(conn, "w-sr", [QUEUE], {})  # the enqueue routes only to queues a live worker serves
    enq = Enqueuer(conn, _config(max_batch))
    good = png(photo(270, 480, seed=1))
    inputs = [(good, {}), (png(photo(270, 480, seed=2)), {"format": "jpeg"}),
              (good[:len(good) // 2], {}), (png(photo(99, 61, seed=3)), {}),
              (png(photo(270, 480, seed=4)), {"compression": 0})]
    for i, (data, params) in enumerate(inputs):
        route = Route(f"dev-{i}", f"r-{i}", "superres", "envelope", f"edge/results/dev-{i}/r-{i}")
        enq.submit(Submission(route=route, params=params, media=(("image/png", data),)),
                   received=time.time())


def _run(conn, handler, max_batch: int) -> tuple[list[int], dict[str, tuple]]:
    sizes: list[int] = []

    class Recorder:
        def __call__(self, request, progress):
            sizes.append(1)
            return handler(request, progress)

        def batch(self, requests):
            sizes.append(len(requests))
            return handler.batch(requests)

    _submit_all(conn, max_batch)
    runtime = perform.Runtime("w-sr", "CPU", ModelSet(handlers={"superres": Recorder()},
                                                      unavailable={}))
    worker = EdgeWorker([Queue(QUEUE, connection=conn, serializer=JSONSerializer)],
                        runtime=runtime, connection=conn, name="w-sr",
                        batching=batching.limits_of(_config(max_batch).tasks))
    worker.work(burst=True, logging_level="WARNING")
    answers = {}
    for _, fields in conn.xrange(C.OUTBOX_STREAM):
        a = Answer.from_fields(fields)
        if a.kind == "result":
            assert a.route.request_id not in answers  # exactly one answer a job
            answers[a.route.request_id] = (a.body["status"], a.body.get("result"),
                                           a.body.get("error", {}).get("code"), a.media)
    return sizes, answers


@pytest.mark.integration
def test_jobs_queued_together_run_as_one_batch_through_the_worker(conn, fast_handlers):
    handler = fast_handlers["THROUGHPUT"]
    sizes, alone = _run(conn, handler, 1)
    assert set(sizes) == {1}
    conn.flushdb()
    sizes, together = _run(conn, handler, 16)
    assert sizes == [5]
    assert together == alone
    assert {rid: a[0] for rid, a in together.items()} == {
        "r-0": "ok", "r-1": "ok", "r-2": "error", "r-3": "ok", "r-4": "ok"}
    assert together["r-2"][2] == "unsupported_media"


def test_superres_batches_8_jobs_by_default():
    from edge.config import parse

    assert parse({"tasks": {"superres": {}}}).tasks["superres"].max_batch == 8
    assert parse({"tasks": {"superres": {"max_batch": 2}}}).tasks["superres"].max_batch == 2
    assert parse({"tasks": {"tokenize": {}}}).tasks["tokenize"].max_batch == C.DEFAULT_MAX_BATCH
