"""Running a job: Job -> its task's handler -> Answer; RQ's entry point and `edgectl run` alike.

`run` is what the agent enqueues (by name, with JSON arguments): it reads the job's payload,
calls `perform` and stores the answer in the outbox. `edgectl run` calls `perform` too, with the
payload in hand, so a job in-process meets the same checks, errors and answer as in a worker.
Neither ever raises for anything a client may be told: every job ends in exactly one answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import structlog
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from edge import constants as C
from edge import metrics
from edge.errors import BadRequest, EdgeError, Internal, ModelUnavailable, PayloadTooLarge, Timeout
from edge.jobs import Answer, Job, Payload, Route, result_body
from edge.outbox import Outbox
from workers.api import Media, Progress, Request, Response
from workers.model_store import ModelSet

log = structlog.get_logger("workers.perform")

ANSWER_PATIENCE = 60.0  # s a finished job keeps trying to store its answer while Redis is away


@dataclass(slots=True)
class Runtime:
    """What a worker holds for all its jobs (built once, before the first job)."""

    worker: str
    device: str
    models: ModelSet
    # blob key -> the blob as the worker read it while starting the job (see EdgeWorker)
    prefetched: dict[str, Mapping[bytes, bytes]] = field(default_factory=dict)

    def take_payload(self, conn: redis.Redis, key: str) -> Payload | None:
        """A job's inputs (the copy read while the job started, else from Redis); None when
        they expired; BadRequest when they are incomplete."""
        # the worker's connections keep decode_responses=False: a hash comes back as bytes
        blob = self.prefetched.pop(key, None) or cast("Mapping[bytes, bytes]", conn.hgetall(key))
        if not blob:
            return None
        try:
            return Payload.from_fields(blob)
        except (KeyError, ValueError):
            raise BadRequest("the job's stored payload is incomplete") from None


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    """Make `runtime` the one jobs in this process use (the worker calls it at start-up)."""
    global _runtime
    _runtime = runtime


def run(job_json: str) -> None:
    """RQ's entry point: run one job and append its answer to the outbox."""
    job = Job.from_json(job_json)
    current = get_current_job()
    if current is None:
        raise RuntimeError("workers.perform.run is RQ's entry point: it needs a current RQ job")
    conn = current.connection
    rt = _runtime
    with structlog.contextvars.bound_contextvars(
            job_id=job.route.request_id, device_id=job.route.device_id, task=job.task,
            worker=rt.worker if rt else None):
        # before anything can fail or hang: tests count executions (a rerun that crashes
        # or times out too) from this line, and an operator sees what a dead worker was doing
        log.info("job_started")
        outbox = Outbox(conn)
        answer = execute(job, conn, rt, progress=lambda body: outbox.append(
            Answer(job.route, "progress", dict(body))))
        _deliver(outbox, current.key, answer, rt.worker if rt else "worker", job.blob_key)
        # after the answer is stored: the device is not kept waiting for our bookkeeping
        metrics.observe_answer(job.task, rt.device if rt else "?", answer.body)
        if answer.body.get("status") == "ok":
            log.info("job_done", run_ms=round(answer.body["timings"]["run_ms"], 2))


def execute(job: Job, conn: redis.Redis, rt: Runtime | None, progress: Progress) -> Answer:
    """A worker's answer to `job`, its inputs read from Redis."""
    return perform(job, rt.models if rt else None,
                   lambda: rt.take_payload(conn, job.blob_key) if rt else None, progress)


def perform(job: Job, models: ModelSet | None, payload: Callable[[], Payload | None],
            progress: Progress) -> Answer:
    """The answer to `job`: its models checked, then its inputs (`payload()`; None: expired)
    run through its task's handler. Never raises for job-level problems."""
    started = time.time()
    try:
        if started > job.deadline:
            raise Timeout(f"the job waited {started - job.received:.1f} s and passed its "
                          "deadline before it could run")
        if models is None:
            raise ModelUnavailable("this worker has no models loaded")
        models.check(job.task, job.params.get("model"))
        inputs = payload()
        if inputs is None:
            raise Timeout("the job's payload expired before it could run")
        response = models.handle(to_request(job, inputs), progress)
        check_answer_size(response)
        body = result_body(job.route, result=response.result, timings=_timings(job, started))
        return Answer(job.route, "result", body,
                      tuple((m.content_type, m.data) for m in response.media))
    except EdgeError as exc:
        log.info("job_error", code=exc.code, reason=exc.message)
        return _error(job, exc, started)
    except JobTimeoutException:
        log.warning("job_timeout")
        return _error(job, Timeout("the job ran past its time limit"), started)
    except Exception:  # noqa: BLE001 - a bad job must never kill the worker
        log.exception("job_failed")
        return _error(job, Internal("internal error while running the job"), started)


def to_request(job: Job, payload: Payload) -> Request:
    """The task's view of a job: its params and inputs."""
    return Request(task=job.task, params=dict(job.params), text=payload.text, ids=payload.ids,
                   media=tuple(Media(t, d) for t, d in payload.media), batch=job.batch)


def check_answer_size(response: Response, limit: int = C.MAX_ANSWER_BYTES) -> None:
    """Refuse an answer too big for one MQTT message (say how to ask for a smaller one)."""
    size = sum(len(m.data) for m in response.media)
    if size > limit:
        raise PayloadTooLarge(f"the answer would be {size} bytes, over the {limit}-byte limit of "
                              "one message: send a smaller input or ask for format=jpeg")


def in_process(route: Route, params: Mapping[str, Any], *, batch: bool = False) -> Job:
    """A job that never went through Redis (`edgectl run`): no blob, no deadline."""
    return Job(key="", route=route, params=dict(params), blob_key="", received=time.time(),
               deadline=math.inf, batch=batch)


def _deliver(outbox: Outbox, rq_key: str, answer: Answer, owner: str, blob_key: str,
             patience: float = ANSWER_PATIENCE) -> None:
    """Store the answer once, riding out a Redis restart (the answer is all the job was for).

    A retry after a lost reply is harmless: `answer_once` refuses a second answer. When the
    agent's reaper answered first (this worker looked dead: stopped, hung, partitioned), ours
    is dropped so that the device gets exactly one.
    """
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            if not outbox.answer_once(rq_key, answer, owner, blob_key):
                log.warning("job_already_answered", note="the reaper answered it first")
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("answer_retry", error=str(exc))
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _error(job: Job, error: EdgeError, started: float) -> Answer:
    return Answer(job.route, "result",
                  result_body(job.route, error=error, timings=_timings(job, started)))


def _timings(job: Job, started: float) -> dict[str, float]:
    now = time.time()
    return {"queue_ms": (started - job.received) * 1000, "run_ms": (now - started) * 1000,
            "total_ms": (now - job.received) * 1000}
