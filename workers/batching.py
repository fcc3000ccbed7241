"""Dynamic batching: a worker runs the jobs already waiting for one task as one inference.

When the worker takes a job (the *head*) of a task whose handler has a batch entry point
(`handler.batch(requests) -> list[Response | EdgeError]`), it also takes up to
`tasks.X.max_batch - 1` more jobs waiting in the same queue (`edge.queueing.take`: what is on
RQ's list, then one job per device in ring order, so one device's backlog cannot fill a batch),
waiting at most `tasks.X.batch_wait_ms` for more (default 0: never idles). Then:

* **start**: the head starts as any job does (its start transaction also takes the others);
  the others go to RQ's StartedJobRegistry under this worker, with their execution records,
  heartbeats and payloads read, in one more transaction (RQ's own calls, as
  `SimpleWorker.execute_job` makes them for one job). From here the reaper sees which jobs this
  worker holds: if it dies, each is answered `internal` once, none is run again.
* **run**, under RQ's time limit of the head (a batch is one task's jobs: one limit): each job
  is checked on its own (deadline, model, payload); the good ones of each model
  (`params["model"]` exactly as given) go through one `handler.batch` call; each job gets its
  own answer, its own timings and its own error (one bad input fails only its job; an
  inference that raises is run again one job at a time, so the job that broke it fails alone);
  a batch past the time limit answers each of its jobs `timeout`.
* **alone**: a job its handler says must not share a run (`handler.runs_alone(params)`, e.g.
  a superres quality job: seconds of diffusion steps) runs after the batch as a single job
  does: its own time limit, its own step progress, its RQ entries refreshed first.
* **finish**: every answer goes to the outbox through `Outbox.answer_once` (the exactly-once
  step a single job uses) and every job to RQ's finished registry, in one round trip.

A job taken but not started yet (the worker died between the two transactions, a few ms) is in
no list: the reaper's lost-job scan puts it back on its queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now

from edge import constants as C
from edge import metrics, queueing
from edge.errors import EdgeError, Internal, ModelUnavailable, Timeout
from edge.jobs import Answer, Job, Payload, result_body
from edge.outbox import Outbox
from workers import perform
from workers.api import Progress, Request

log = structlog.get_logger("workers.batching")

@dataclass(frozen=True, slots=True)
class BatchLimit:
    """How a task batches: at most `max_batch` jobs per inference, waiting at most `wait_ms`."""

    max_batch: int = C.DEFAULT_MAX_BATCH
    wait_ms: int = 0


def limits_of(tasks: Mapping[str, Any]) -> dict[str, BatchLimit]:
    """The batch limits of every task of a config (`Config.tasks`)."""
    return {name: BatchLimit(t.max_batch, t.batch_wait_ms) for name, t in tasks.items()}


@dataclass(slots=True)
class _Member:
    rq: RQJob
    job: Job | None  # None: its JSON could not be read (failed in RQ, never run)
    execution: Execution


def _bound(job: Job, worker: str):
    return structlog.contextvars.bound_contextvars(
        job_id=job.route.request_id, device_id=job.route.device_id, task=job.task,
        worker=worker)


class Batcher:
    """The worker's side of batching: take and start the jobs waiting with a head job, run
    them as one, answer each, and move each through RQ's registries.

    `worker` is the RQ worker (an `EdgeWorker`); `limits` the batch limits by task. The jobs
    are finished with RQ's own calls, as `SimpleWorker.perform_job` finishes one, except for
    what the daemon's jobs never have (dependents, callbacks, repeats, retries, rate limits).
    """

    def __init__(self, worker: Any, limits: Mapping[str, BatchLimit]) -> None:
        self.worker, self.limits = worker, limits
        self._members: list[_Member] = []
        self.taking = 0  # while a head starts: how many jobs its start transaction takes

    def room(self, queue: str) -> int:
        """How many more jobs to take with a job of `queue` (0: this task does not batch)."""
        task = queue.split(".")[1]
        limit = self.limits.get(task)
        handler = self.worker.runtime.models.handlers.get(task)
        # a task's dispatcher (workers.model_store.Dispatch) says whether its models batch
        batches = getattr(handler, "batches", hasattr(handler, "batch"))
        if limit is None or limit.max_batch <= 1 or not batches:
            return 0
        return limit.max_batch - 1

    @staticmethod
    def device_of(job: RQJob) -> str:
        """The device id of an RQ job of ours ("" when its arguments cannot be read)."""
        ours = _job_of(job)
        return ours.route.device_id if ours is not None else ""

    def start(self, head: RQJob, taken: Sequence[tuple[str, dict]]) -> None:
        """Start the jobs taken with `head` (from `queueing.take`, during the head's start),
        waiting up to the task's `batch_wait_ms` for more when the batch is not full: each
        goes to RQ's StartedJobRegistry under this worker, and its payload is read, in one
        transaction."""
        w = self.worker
        self._members = []
        room = self.taking
        got = list(taken)
        wait = self.limits[head.origin.split(".")[1]].wait_ms
        if wait and len(got) < room:
            time.sleep(wait / 1000)
            got += queueing.take(w.connection, head.origin, room - len(got), self.device_of(head),
                                 others=[q.name for q in w.queues if q.name != head.origin],
                                 burst=max(0, C.PRIORITY_BURST - w._streak - len(got)))
        if not got:
            return
        w.count_served(head.origin, len(got))  # the priority burst counts jobs, not batches
        pipe = w.connection.pipeline()
        for job_id, fields in got:
            if not fields:  # expired or deleted meanwhile: nothing left to run or answer
                continue
            rq_job = RQJob(job_id, connection=w.connection, serializer=JSONSerializer)
            rq_job.restore(fields)
            ttl = w.get_heartbeat_ttl(rq_job)
            execution = Execution.create(rq_job, ttl, pipeline=pipe, worker_name=w.name)
            w.executions[execution.id] = execution
            # (RQ's job.heartbeat too, but that only sets last_heartbeat, as this does)
            rq_job.prepare_for_execution(w.name, pipeline=pipe)
            pipe.persist(rq_job.key)
            self._members.append(_Member(rq_job, _job_of(rq_job), execution))
        blob_keys = [m.job.blob_key for m in self._members if m.job is not None]
        for key in blob_keys:
            pipe.hgetall(key)
        replies = pipe.execute()
        for key, blob in zip(blob_keys, replies[len(replies) - len(blob_keys):], strict=True):
            w.runtime.prefetched[key] = blob

    def execute(self, head: RQJob, queue: Any, room: int) -> None:
        """Run `head` and up to `room` jobs waiting with it (RQ's `execute_job` for a batching
        task): start them, one inference per model under the head's time limit, then every
        answer and every job's finish in RQ in one round trip."""
        w = self.worker
        execution = w.prepare_execution(head)
        self._members, self.taking = [], room
        try:
            w.prepare_job_execution(head, len(w.queues) == 1)  # takes and starts the others
        finally:
            self.taking = 0
        members = [_Member(head, _job_of(head), execution), *self._members]
        self._members = []
        rt = w.runtime
        jobs = [m.job for m in members if m.job is not None]
        for job in jobs:  # before anything can fail or hang, as perform.run does
            with _bound(job, rt.worker):
                log.info("job_started", batch=len(jobs))
        try:
            answers = self._run(head, members)
        finally:
            for j in jobs:
                rt.prefetched.pop(j.blob_key, None)
        try:
            self._finish(members, answers)
        except redis.RedisError as exc:  # Redis away past the patience: RQ's verdict, later
            log.error("batch_finish_failed", error=str(exc), batch=len(members),
                      note="the jobs stay started; the reaper answers them")
            return
        for job, answer in zip(jobs, answers, strict=True):
            metrics.observe_answer(job.task, rt.device, answer.body)
            if answer.body.get("status") == "ok":
                with _bound(job, rt.worker):
                    log.info("job_done", run_ms=round(answer.body["timings"]["run_ms"], 2),
                             batch=len(jobs))

    def _run(self, head: RQJob, members: list[_Member]) -> list[Answer]:
        """The answers of the readable members, in order: those the task's handler lets batch
        as one run under the head's time limit, then each that must run alone (`runs_alone`,
        e.g. a superres quality job) as a single job runs."""
        w, rt = self.worker, self.worker.runtime
        readable = [m for m in members if m.job is not None]
        handler = rt.models.handlers.get(head.origin.split(".")[1]) if rt.models else None
        runs_alone = getattr(handler, "runs_alone", None)
        alone = [m for m in readable if runs_alone is not None and m.job is not None
                 and runs_alone(m.job.params)]
        alone_ids = {id(m) for m in alone}
        batched = [m for m in readable if id(m) not in alone_ids]
        together = [m.job for m in batched if m.job is not None]
        answers: list[Answer] = []
        if together:
            started = time.time()
            try:
                with w.death_penalty_class(head.timeout or w.queue_class.DEFAULT_TIMEOUT,
                                           JobTimeoutException, job_id=head.id):
                    outbox = Outbox(w.connection)
                    answers = perform_batch(
                        together, rt.models, lambda j: rt.take_payload(w.connection, j.blob_key),
                        lambda j: lambda body: outbox.append(
                            Answer(j.route, "progress", dict(body))))
            except JobTimeoutException:  # outside the inference (reading inputs...)
                log.warning("batch_timeout", batch=len(together))
                answers = [_error(j, Timeout("the job ran past its time limit"), started)
                           for j in together]
        by_member = dict(zip([id(m) for m in batched], answers, strict=True))
        for m in alone:
            by_member[id(m)] = self._run_alone(m)
        return [by_member[id(m)] for m in readable]

    def _run_alone(self, m: _Member) -> Answer:
        """One job of a batch run as a single job runs: its own time limit and step progress,
        its entries in RQ's registries kept fresh first (it may start long after the batch)."""
        w, rt = self.worker, self.worker.runtime
        job = m.job
        assert job is not None
        ttl = w.get_heartbeat_ttl(m.rq)
        pipe = w.connection.pipeline()
        m.rq.heartbeat(now(), ttl, pipeline=pipe)
        m.execution.heartbeat(m.rq.started_job_registry, ttl, pipe)
        pipe.execute()
        w.progress.begin(m.rq.timeout)  # the watchdog's view: this job's own time limit
        outbox = Outbox(w.connection)
        started = time.time()
        try:
            with w.death_penalty_class(m.rq.timeout or w.queue_class.DEFAULT_TIMEOUT,
                                       JobTimeoutException, job_id=m.rq.id):
                return perform.execute(job, w.connection, rt, progress=lambda body: outbox.append(
                    Answer(job.route, "progress", dict(body))))
        except JobTimeoutException:
            return _error(job, Timeout("the job ran past its time limit"), started)

    def _finish(self, members: list[_Member], answers: list[Answer],
                patience: float = perform.ANSWER_PATIENCE) -> None:
        """Every answer once (`Outbox.answer_once`) and every job's end in RQ's registries, in
        one round trip; a retry after a lost reply is harmless (a stored answer is not stored
        again, one the reaper stored first is dropped: the device gets exactly one)."""
        w = self.worker
        outbox = Outbox(w.connection)
        deadline = time.monotonic() + patience
        delay = 0.2
        readable = [m for m in members if m.job is not None]
        while True:
            try:
                pipe = w.connection.pipeline()
                for m, answer in zip(readable, answers, strict=True):
                    assert m.job is not None
                    outbox.answer_once(m.rq.key, answer, w.runtime.worker, m.job.blob_key,
                                       pipeline=pipe)
                for m in members:
                    self._end(m, pipe)
                self._count(members, pipe)
                stored = pipe.execute()[:len(readable)]
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("answer_retry", error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        for answer, ok in zip(answers, stored, strict=True):
            if not ok:
                log.warning("job_already_answered", job_id=answer.route.request_id,
                            note="the reaper answered it first")

    def _end(self, m: _Member, pipe: redis.client.Pipeline) -> None:
        """RQ's bookkeeping of one ended job (`handle_job_success`, or `handle_job_failure`
        for one that could not be read), on `pipe`."""
        w, job, execution = self.worker, m.rq, m.execution
        job.ended_at = now()
        if m.job is not None:
            job._status = JobStatus.FINISHED
            result_ttl = job.get_result_ttl(w.default_result_ttl)
            if result_ttl != 0:
                job._handle_success(result_ttl, pipeline=pipe, worker_name=w.name,
                                    execution_id=execution.id,
                                    execution_started_at=execution.created_at,
                                    execution_ended_at=job.ended_at)
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        else:
            job._status = JobStatus.FAILED
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            job._handle_failure("the job's arguments could not be read", pipeline=pipe,
                                worker_name=w.name, execution_id=execution.id,
                                execution_started_at=execution.created_at,
                                execution_ended_at=job.ended_at)
        w.cleanup_execution(job, pipeline=pipe, execution=execution)

    def _count(self, members: list[_Member], pipe: redis.client.Pipeline) -> None:
        """The worker's statistics RQ keeps per job (counts, working time), once per batch."""
        key, ok = self.worker.key, sum(m.job is not None for m in members)
        working = sum(((m.rq.ended_at or now()) - (m.rq.started_at or now())).total_seconds()
                      for m in members)
        if ok:
            pipe.hincrby(key, "successful_job_count", ok)
        if len(members) - ok:
            pipe.hincrby(key, "failed_job_count", len(members) - ok)
        pipe.hincrbyfloat(key, "total_working_time", working)


def _job_of(rq_job: RQJob) -> Job | None:
    try:
        return Job.from_json(rq_job.args[0])
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        log.error("batch_job_unreadable", rq_job=rq_job.id, error=str(exc))
        return None


def perform_batch(jobs: Sequence[Job], models: Any, payload: Callable[[Job], Payload | None],
                  progress: Callable[[Job], Progress] | None = None) -> list[Answer]:
    """The answers to `jobs` (one task), in order: each checked on its own, the good ones of
    each model run through one `handler.batch` call; a job alone in its group runs as a single
    job does, with its `progress` sink when given. Never raises for job-level problems."""
    started = time.time()
    answers: list[Answer | None] = [None] * len(jobs)
    groups: dict[Any, list[tuple[int, Request]]] = {}
    for i, job in enumerate(jobs):
        try:
            if started > job.deadline:
                raise Timeout(f"the job waited {started - job.received:.1f} s and passed its "
                              "deadline before it could run")
            if models is None:
                raise ModelUnavailable("this worker has no models loaded")
            models.check(job.task, job.params.get("model"))
            inputs = payload(job)
            if inputs is None:
                raise Timeout("the job's payload expired before it could run")
            # looked up on the module each time: the fault tests patch it
            request = perform.to_request(job, inputs)
        except EdgeError as exc:
            answers[i] = _error(job, exc, started)
            continue
        except Exception:  # noqa: BLE001 - a bad job must never kill the worker
            log.exception("job_failed", job_id=job.route.request_id)
            answers[i] = _error(job, Internal("internal error while running the job"), started)
            continue
        groups.setdefault(job.params.get("model"), []).append((i, request))
    for model, group in groups.items():
        for i, answer in zip([i for i, _ in group],
                             _run_group(jobs, group, models, model, started, progress),
                             strict=True):
            answers[i] = answer
    return [a for a in answers if a is not None]


def _run_group(jobs: Sequence[Job], group: list[tuple[int, Request]], models: Any, model: Any,
               started: float, progress: Callable[[Job], Progress] | None = None
               ) -> list[Answer]:
    """One inference for the requests of one model; one answer per request."""
    batch_jobs = [jobs[i] for i, _ in group]
    try:
        handler = models.check(batch_jobs[0].task, model)
        if len(group) == 1 and progress is not None:  # alone: as perform.run runs it
            outs: list[Any] = [handler(group[0][1], progress(batch_jobs[0]))]
        else:
            outs = list(handler.batch([r for _, r in group]))
        if len(outs) != len(group):
            raise RuntimeError(f"handler.batch gave {len(outs)} answers to {len(group)} requests")
    except EdgeError as exc:  # the whole group: e.g. its model is unavailable
        return [_error(j, exc, started) for j in batch_jobs]
    except JobTimeoutException:
        log.warning("batch_timeout", batch=len(group))
        return [_error(j, Timeout("the job ran past its time limit"), started)
                for j in batch_jobs]
    except Exception:  # noqa: BLE001 - a bad batch must never kill the worker
        if len(group) > 1:  # one input broke the inference: run each alone, it fails alone
            log.warning("batch_failed_alone_again", batch=len(group), exc_info=True)
            return [a for member in group
                    for a in _run_group(jobs, [member], models, model, started, progress)]
        log.exception("job_failed", job_id=batch_jobs[0].route.request_id)
        return [_error(j, Internal("internal error while running the job"), started)
                for j in batch_jobs]
    answers = []
    for job, out in zip(batch_jobs, outs, strict=True):
        if isinstance(out, EdgeError):
            log.info("job_error", job_id=job.route.request_id, code=out.code, reason=out.message)
            answers.append(_error(job, out, started))
            continue
        try:
            perform.check_answer_size(out)
        except EdgeError as exc:
            answers.append(_error(job, exc, started))
            continue
        body = result_body(job.route, result=out.result, timings=_timings(job, started))
        answers.append(Answer(job.route, "result", body,
                              tuple((m.content_type, m.data) for m in out.media)))
    return answers


def _error(job: Job, error: EdgeError, started: float) -> Answer:
    return Answer(job.route, "result",
                  result_body(job.route, error=error, timings=_timings(job, started)))


def _timings(job: Job, started: float) -> dict[str, float]:
    t = time.time()
    return {"queue_ms": (started - job.received) * 1000, "run_ms": (t - started) * 1000,
            "total_ms": (t - job.received) * 1000}
