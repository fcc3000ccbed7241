"""Dynamic batching (workers/batching.py): jobs queued together run as one inference, each
answered on its own, through RQ's registries, fairly across devices.

A real worker (`EdgeWorker`, in process, burst mode) on the session's Redis, with the real
tokenizer handler; jobs are enqueued the way the agent enqueues them (`Enqueuer`).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from edge import alive
from edge import constants as C
from edge.config import Config, TaskConfig
from edge.jobs import Answer, Route
from edge.protocol import Submission
from edge.queueing import Enqueuer, queue_name
from workers import batching, perform
from workers.api import Request, Response
from workers.batching import BatchLimit
from workers.model_store import ModelSet
from workers.worker import EdgeWorker

pytestmark = pytest.mark.integration

QUEUE = queue_name("tokenize", "CPU")
DQUEUE = queue_name("detokenize", "CPU")


def _config(max_batch: int) -> Config:
    task = TaskConfig(devices=("CPU",), device_limit=100, max_batch=max_batch)
    return Config(tasks={"tokenize": task, "detokenize": task})


def _submit(enq: Enqueuer, device: str, rid: str, task: str = "tokenize", **inputs) -> None:
    route = Route(device, rid, task, "envelope", f"edge/results/{device}/{rid}")
    batch = isinstance(inputs.get("text"), tuple) or (
        isinstance(inputs.get("ids"), tuple) and inputs["ids"]
        and isinstance(inputs["ids"][0], tuple))
    enq.submit(Submission(route=route, params=inputs.pop("params", {}), batch=bool(batch),
                          **inputs), received=time.time())


def _answers(conn) -> dict[str, list[dict]]:
    """Every final answer in the outbox, by request id."""
    out: dict[str, list[dict]] = {}
    for _, fields in conn.xrange(C.OUTBOX_STREAM):
        answer = Answer.from_fields(fields)
        out.setdefault(answer.route.request_id, []).append(dict(answer.body))
    return out


class Recorder:
    """Wraps a handler: records the size of every batch it is given."""

    def __init__(self, handler) -> None:
        self.handler, self.sizes = handler, []

    def __call__(self, request, progress):
        self.sizes.append(1)
        return self.handler(request, progress)

    def batch(self, requests):
        self.sizes.append(len(requests))
        return self.handler.batch(requests)


def _run_worker(conn, handler, config: Config) -> Recorder:
    rec = Recorder(handler)
    models = ModelSet(handlers={"tokenize": rec, "detokenize": rec}, unavailable={})
    runtime = perform.Runtime("w-batch", "CPU", models)
    queues = [Queue(q, connection=conn, serializer=JSONSerializer) for q in (QUEUE, DQUEUE)]
    worker = EdgeWorker(queues, runtime=runtime, connection=conn, name="w-batch",
                        batching=batching.limits_of(config.tasks))
    worker.work(burst=True, logging_level="WARNING")
    return rec


@pytest.fixture
def enq(conn):
    def make(max_batch: int) -> Enqueuer:
        # the enqueue routes only to queues a live worker serves
        alive.beat(conn, "w-batch", [QUEUE, DQUEUE], {})
        return Enqueuer(conn, _config(max_batch))
    return make


TEXTS = ["hello world", ("a short one", "and another"), "Zürich café naïve",
         ("one", "two", "three"), "the quick brown fox", ("ΑΣ Σίσυφος",), "", "edge devices"]


def _jobs(enq: Enqueuer, *, malformed: bool = False) -> None:
    models = ("all-minilm-l6-v2", "clip-vit-b32", "whisper-tiny.en")
    for i, text in enumerate(TEXTS):
        _submit(enq, f"dev-{i % 3}", f"t-{i}", text=text, params={"model": models[i % 3]})
    _submit(enq, "dev-0", "d-0", task="detokenize", ids=((101, 7592, 102), (101, 102)),
            params={"model": "all-minilm-l6-v2"})
    _submit(enq, "dev-1", "d-1", task="detokenize", ids=(101, 2088, 102),
            params={"model": "all-minilm-l6-v2", "skip_special_tokens": True})
    if malformed:
        _submit(enq, "dev-2", "bad-ids", task="detokenize", ids=(101, 10**9),
                params={"model": "all-minilm-l6-v2"})
        _submit(enq, "dev-2", "bad-model", text="hi", params={"model": "no-such-model"})


def _results(answers: dict[str, list[dict]]) -> dict[str, tuple]:
    return {rid: (bodies[0]["status"], json.dumps(bodies[0].get("result")),
                  bodies[0].get("error", {}).get("code")) for rid, bodies in answers.items()}


def test_a_batched_run_answers_like_one_job_at_a_time(conn, enq, handler):
    _jobs(enq(1))
    one = _run_worker(conn, handler, _config(1))
    alone = _answers(conn)
    assert set(one.sizes) == {1}
    conn.flushdb()
    _jobs(enq(16))
    rec = _run_worker(conn, handler, _config(16))
    together = _answers(conn)
    assert max(rec.sizes) > 1, rec.sizes  # they did run together
    assert all(len(bodies) == 1 for bodies in together.values())
    assert _results(together) == _results(alone)
    assert {s for s, _, _ in _results(together).values()} == {"ok"}
    # each job has its own timings
    assert all(set(b[0]["timings"]) == {"queue_ms", "run_ms", "total_ms"}
               for b in together.values())


def test_one_malformed_input_fails_only_its_own_job(conn, enq, handler):
    _jobs(enq(16), malformed=True)
    rec = _run_worker(conn, handler, _config(16))
    got = _answers(conn)
    assert max(rec.sizes) > 2
    codes = {rid: b[0]["error"]["code"] if b[0]["status"] == "error" else "ok"
             for rid, b in got.items()}
    assert codes.pop("bad-ids") == "bad_request"
    assert codes.pop("bad-model") == "bad_request"
    assert set(codes.values()) == {"ok"} and len(codes) == len(TEXTS) + 2


def test_every_job_of_a_batch_goes_through_rqs_registries(conn, enq, handler):
    e = enq(16)
    for i in range(10):
        _submit(e, f"dev-{i}", f"r-{i}", text=f"text number {i}")
    rec = _run_worker(conn, handler, _config(16))
    assert rec.sizes == [10]
    finished = FinishedJobRegistry(QUEUE, connection=conn, serializer=JSONSerializer)
    assert len(finished.get_job_ids()) == 10
    assert StartedJobRegistry(QUEUE, connection=conn).get_job_ids() == []
    assert FailedJobRegistry(QUEUE, connection=conn).get_job_ids() == []
    for job_id in finished.get_job_ids():
        fields = conn.hgetall(f"rq:job:{job_id}")
        assert fields[b"status"] == b"finished"
        assert fields[b"worker_name"] == b"w-batch"
        assert fields[C.ANSWERED_FIELD.encode()] == b"w-batch"
    assert conn.zcard(C.UNANSWERED_KEY) == 0
    assert not conn.keys(C.BLOB_KEY.format(job_key="*"))  # every payload dropped once answered


def test_a_batch_takes_one_job_of_each_waiting_device_first(conn, enq, handler, monkeypatch):
    e = enq(4)
    for i in range(12):  # one device's backlog...
        _submit(e, "hog", f"h-{i}", text=f"hog text {i}")
    for d in ("a", "b", "c"):  # ...and three devices with one job each, sent after it
        _submit(e, d, f"{d}-0", text=f"text of {d}")
    order: list[list[str]] = []
    original = batching.perform_batch

    def spy(jobs, *args, **kwargs):
        order.append([j.route.device_id for j in jobs])
        return original(jobs, *args, **kwargs)

    monkeypatch.setattr(batching, "perform_batch", spy)
    _run_worker(conn, handler, _config(4))
    assert [len(b) for b in order] == [4, 4, 4, 3]
    assert Counter(order[0]) == Counter(["hog", "a", "b", "c"])  # not four of the hog's
    assert len(_answers(conn)) == 15


def test_max_batch_limits_the_batch_and_one_turns_batching_off(conn, enq, handler):
    e = enq(3)
    for i in range(7):
        _submit(e, f"dev-{i}", f"m-{i}", text="x")
    rec = _run_worker(conn, handler, _config(3))
    assert rec.sizes == [3, 3, 1]
    assert BatchLimit().max_batch == C.DEFAULT_MAX_BATCH


def test_batch_wait_ms_waits_once_for_more_jobs_when_the_batch_is_not_full(conn, enq, handler,
                                                                           monkeypatch):
    e = enq(8)
    _submit(e, "dev-0", "w-0", text="first")
    waits: list[float] = []

    def arriving(seconds: float) -> None:  # jobs that come in while the worker waits
        waits.append(seconds)
        for i in range(1, 4):
            _submit(e, f"dev-{i}", f"w-{i}", text=f"late {i}")

    monkeypatch.setattr(batching.time, "sleep", arriving)
    task = TaskConfig(devices=("CPU",), device_limit=100, max_batch=8, batch_wait_ms=20)
    rec = _run_worker(conn, handler, Config(tasks={"tokenize": task, "detokenize": task}))
    assert waits == [0.02]
    assert rec.sizes == [4]
    assert set(_answers(conn)) == {"w-0", "w-1", "w-2", "w-3"}


def test_no_wait_by_default(conn, enq, handler, monkeypatch):
    e = enq(8)
    _submit(e, "dev-0", "n-0", text="alone")
    monkeypatch.setattr(batching.time, "sleep", lambda s: pytest.fail("the worker idled"))
    rec = _run_worker(conn, handler, _config(8))
    assert rec.sizes == [1]


@pytest.mark.parametrize("raw,field", [
    ({"tasks": {"tokenize": {"max_batch": 0}}}, "tasks.tokenize.max_batch"),
    ({"tasks": {"tokenize": {"batch_wait_ms": -1}}}, "tasks.tokenize.batch_wait_ms"),
    ({"tasks": {"tokenize": {"max_batch": "8"}}}, "tasks.tokenize.max_batch"),
])
def test_bad_batch_settings_are_refused_naming_the_field(raw, field):
    from edge.config import ConfigError, parse

    with pytest.raises(ConfigError) as exc:
        parse(raw)
    assert str(exc.value).startswith(field + ":")


def test_batch_settings_parse_with_their_defaults():
    from edge.config import parse

    cfg = parse({"tasks": {"tokenize": {"max_batch": 4, "batch_wait_ms": 2}, "detokenize": {}}})
    assert (cfg.tasks["tokenize"].max_batch, cfg.tasks["tokenize"].batch_wait_ms) == (4, 2)
    assert (cfg.tasks["detokenize"].max_batch, cfg.tasks["detokenize"].batch_wait_ms) == (
        C.DEFAULT_MAX_BATCH, 0)
    assert batching.limits_of(cfg.tasks)["tokenize"] == BatchLimit(4, 2)


def test_batches_count_against_the_priority_burst_so_other_tasks_are_not_starved(
        conn, enq, handler, monkeypatch):
    e = enq(16)
    for i in range(40):
        _submit(e, f"dev-{i % 20}", f"f-{i}", text=f"flood {i}")
    _submit(e, "other", "d-1", task="detokenize", ids=(101, 102))
    order: list[tuple[str, int]] = []
    original = batching.perform_batch

    def spy(jobs, *args, **kwargs):
        order.append((jobs[0].task, len(jobs)))
        return original(jobs, *args, **kwargs)

    monkeypatch.setattr(batching, "perform_batch", spy)
    _run_worker(conn, handler, _config(16))
    ahead = 0
    for task, n in order:
        if task == "detokenize":
            break
        ahead += n
    assert ahead <= C.PRIORITY_BURST, order  # jobs, not batches, count
    assert order[0] == ("tokenize", C.PRIORITY_BURST)
    assert sum(n for _, n in order) == 41


class _Batching:
    """A model version's handler that batches: records each batch, echoes its version."""

    def __init__(self, version: str, calls: list) -> None:
        self.version, self.calls = version, calls

    def __call__(self, request, progress):
        return self.batch([request])[0]

    def batch(self, requests):
        self.calls.append((self.version, len(requests)))
        return [Response({"model": r.params["model"], "echo": self.version}) for r in requests]


def test_a_dispatcher_batches_per_version_and_fails_only_the_unknown_model():
    from edge.errors import ModelUnavailable
    from workers.model_store import Dispatch, Version

    calls: list = []

    def version(name: str, v: str) -> Version:
        return Version("tokenize", name, v, _Batching(f"{name}@{v}", calls), (name, v), {}, 0.1)

    loaded = {"b": {"1": version("b", "1"), "2": version("b", "2")}}
    dispatch = Dispatch("tokenize", loaded, {"b": "2"}, ["b"], None, {})
    asks = ["b", "b@1", None, "zz", "b@2", "b@1"]
    out = dispatch.batch([Request("tokenize", {"model": m} if m else {}, text="x") for m in asks])
    assert dispatch.batches
    assert sorted(calls) == [("b@1", 2), ("b@2", 3)]  # one call per version
    assert isinstance(out[3], ModelUnavailable)
    assert [(o.result["version"], o.result["echo"]) for i, o in enumerate(out) if i != 3] == [
        ("2", "b@2"), ("1", "b@1"), ("2", "b@2"), ("2", "b@2"), ("1", "b@1")]


class SlowAlone:
    """A handler whose jobs with params `alone` must not share a run (as superres quality
    jobs): those report step progress and are called one at a time."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def runs_alone(self, params) -> bool:
        return bool(params.get("alone"))

    def __call__(self, request, progress):
        self.calls.append([request.text])
        for step in (1, 2):
            progress({"step": step, "steps": 2})
        return Response({"text": request.text})

    def batch(self, requests):
        assert not any(r.params.get("alone") for r in requests), "an alone job was batched"
        self.calls.append([r.text for r in requests])
        return [Response({"text": r.text}) for r in requests]


def test_a_job_that_must_run_alone_runs_after_the_batch_with_its_progress(conn, enq):
    e = enq(8)
    for i in range(4):
        _submit(e, f"dev-{i}", f"f-{i}", text=f"fast {i}")
    _submit(e, "dev-9", "slow-0", text="slow", params={"alone": True})
    fake = SlowAlone()
    models = ModelSet(handlers={"tokenize": fake, "detokenize": fake}, unavailable={})
    queues = [Queue(q, connection=conn, serializer=JSONSerializer) for q in (QUEUE, DQUEUE)]
    EdgeWorker(queues, runtime=perform.Runtime("w-batch", "CPU", models), connection=conn,
               name="w-batch", batching=batching.limits_of(_config(8).tasks)
               ).work(burst=True, logging_level="WARNING")
    assert fake.calls == [["fast 0", "fast 1", "fast 2", "fast 3"], ["slow"]]
    got = _answers(conn)
    assert {rid: b[0]["status"] for rid, b in got.items()} == {
        "f-0": "ok", "f-1": "ok", "f-2": "ok", "f-3": "ok", "slow-0": "ok"}
    progress = [Answer.from_fields(f) for _, f in conn.xrange(C.PROGRESS_STREAM)]
    assert [(p.route.request_id, p.body["step"]) for p in progress] == [("slow-0", 1),
                                                                        ("slow-0", 2)]
    finished = FinishedJobRegistry(QUEUE, connection=conn, serializer=JSONSerializer)
    assert len(finished.get_job_ids()) == 5
