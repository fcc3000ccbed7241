"""From a validated Submission to an RQ job: routing, back-pressure, blob storage, dedup."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis
from rq import Queue
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer
from rq.utils import now

from edge import constants as C
from edge import scripts
from edge.config import Config
from edge.errors import Busy, ModelUnavailable
from edge.jobs import Job, Payload, job_key
from edge.protocol import Submission


def queue_name(task: str, device: str) -> str:
    """The RQ queue of one task on one device."""
    return C.QUEUE_NAME.format(task=task, device=device)


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What happened to a submission: the job, and whether it was a duplicate."""

    job: Job
    queue: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class _Step:
    """One submission's `scripts.ENQUEUE` call, and how to read its reply."""

    job: Job
    queues: tuple[str, ...]  # the candidate queues, in the task's device order
    keys: list[str]
    args: list
    config: Config

    def outcome(self, reply: Sequence[int]) -> Enqueued:
        """What the script's reply means: the job enqueued or a duplicate; else raises Busy
        (the device's quota, a full Redis, every queue full) or ModelUnavailable."""
        chosen, held = reply
        if chosen == 0:
            return Enqueued(self.job, "", duplicate=True)
        if chosen > 0:
            return Enqueued(self.job, self.queues[chosen - 1], duplicate=False)
        task, device_id = self.job.task, self.job.route.device_id
        tcfg = self.config.tasks[task]
        if chosen == -3:
            raise Busy(f"device {device_id!r} has {held} {task} jobs queued or running, its "
                       f"limit (tasks.{task}.device_limit = {tcfg.per_device}); wait for an "
                       "answer before sending more", "device_limit")
        if chosen == -4:
            raise Busy(f"the gateway's job store is full (Redis at {held}% of maxmemory; new "
                       f"jobs stop at {self.config.limits.redis_fill_percent}%, "
                       "limits.redis_fill_percent); try again later", "redis_full")
        if chosen == -1:
            raise Busy(f"every {task} queue of this gateway is full (tasks.{task}.queue_limit = "
                       f"{tcfg.queue_limit} jobs); try again later")
        raise ModelUnavailable(f"no worker serves {task} on this gateway now")


class Enqueuer:
    """Stores a job's inputs as one Redis blob and enqueues its RQ job, once per request id.

    One round trip per job (`scripts.ENQUEUE`): the duplicate check, the device's quota, the
    choice of queue (the task's devices in order, skipping those with no live worker and those
    full), the blob, the reaper's index, the device's fair list and RQ's own enqueue happen in
    one Lua step, so no other client ever sees a job without its payload or a payload without
    its job. A full Redis refuses the step whole (`redis.exceptions.OutOfMemoryError`).
    """

    def __init__(self, conn: redis.Redis, config: Config) -> None:
        self.conn, self.config = conn, config
        self._queues: dict[str, Queue] = {}
        self._script = conn.register_script(scripts.ENQUEUE)

    def _queue(self, name: str) -> Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(name, connection=self.conn, serializer=JSONSerializer)
        return q

    def submit(self, sub: Submission, received: float) -> Enqueued:
        """Enqueue `sub`; a duplicate of a job still known to RQ is not enqueued again.

        Busy when the device is at its quota for the task or every live queue of the task is
        full, ModelUnavailable when none is live.
        """
        step = self._step(sub, received)
        return step.outcome(self._script(keys=step.keys, args=step.args))

    def submit_many(self, subs: Sequence[Submission], received: float
                    ) -> list[Enqueued | Exception]:
        """Enqueue several submissions in one round trip: one `scripts.ENQUEUE` step each, as
        `submit` runs it. Returns, in order, each one's `Enqueued` or the exception `submit`
        would raise for it alone (Busy, ModelUnavailable, a Redis refusal such as
        `OutOfMemoryError`); raises only when the round trip itself failed (a lost connection:
        the steps that ran are found again as duplicates when the caller retries)."""
        steps = [self._step(sub, received) for sub in subs]
        if not steps:
            return []
        replies = self._run(steps)
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            self.conn.script_load(scripts.ENQUEUE)  # Redis restarted and lost its scripts
            replies = self._run(steps)
        out: list[Enqueued | Exception] = []
        for step, reply in zip(steps, replies, strict=True):
            if isinstance(reply, Exception):
                out.append(reply)
                continue
            try:
                out.append(step.outcome(reply))
            except (Busy, ModelUnavailable) as exc:
                out.append(exc)
        return out

    def _run(self, steps: Sequence[_Step]) -> list:
        """Every step's reply (or its error) from one pipelined round trip (EVALSHA: redis-py
        would ask whether a registered script exists before every pipeline it runs)."""
        pipe = self.conn.pipeline(transaction=False)
        for step in steps:
            pipe.evalsha(self._script.sha, len(step.keys), *step.keys, *step.args)
        return pipe.execute(raise_on_error=False)

    def _step(self, sub: Submission, received: float) -> _Step:
        """The ENQUEUE step of one submission: its job, candidate queues, keys and arguments."""
        task = sub.route.task
        tcfg = self.config.tasks[task]
        key = job_key(sub.route.device_id, task, sub.route.request_id)
        deadline = received + tcfg.deadline
        if sub.deadline is not None:
            deadline = min(deadline, sub.deadline)
        job = Job(key=key, route=sub.route, params=dict(sub.params),
                  blob_key=C.BLOB_KEY.format(job_key=key), received=received,
                  deadline=deadline, batch=sub.batch)
        queues = [self._queue(queue_name(task, d)) for d in tcfg.devices]
        rq_job = self._rq_job(queues[0], job)
        blob = [v for kv in Payload(sub.text, sub.ids, sub.media).to_fields().items()
                for v in kv]
        device_id = sub.route.device_id
        keys = [rq_job.key, job.blob_key, C.UNANSWERED_KEY, Queue.redis_queues_keys,
                C.QUOTA_KEY.format(task=task, device_id=device_id),
                *(q.key for q in queues), *(C.ALIVE_KEY.format(queue=q.name) for q in queues),
                *(C.RING_KEY.format(queue=q.name) for q in queues),
                *(C.WAITING_KEY.format(queue=q.name) for q in queues)]
        per_queue = [v for q in queues for v in (q.name, C.FAIR_PREFIX.format(queue=q.name))]
        args = [key, tcfg.queue_limit, tcfg.per_device, self.config.blob_ttl,
                rq_job.ttl if rq_job.ttl is not None else -1, C.ALIVE_WINDOW,
                tcfg.deadline + tcfg.timeout + C.QUOTA_SLACK, C.FEED_DEPTH, device_id,
                len(blob), *blob, *per_queue, *_hash_fields(rq_job),
                self.config.limits.redis_fill_percent]
        return _Step(job, tuple(q.name for q in queues), keys, args, self.config)

    def _rq_job(self, queue: Queue, job: Job):
        """The RQ job as `Queue.enqueue_call(..., unique=True)` would store it."""
        tcfg = self.config.tasks[job.task]
        route = job.route
        rq_job = queue.create_job(
            C.JOB_FUNCTION, args=(job.to_json(),), job_id=job.key, timeout=tcfg.timeout,
            result_ttl=self.config.dedup_ttl, failure_ttl=self.config.dedup_ttl,
            description=f"{job.task} {route.device_id}/{route.request_id}")
        rq_job.redis_server_version = queue.get_redis_server_version()
        rq_job.enqueued_at = now()
        return rq_job


def _hash_fields(rq_job) -> list[bytes | str]:
    """RQ's job hash as flat field/value pairs (what rq.scripts writes for a unique enqueue)."""
    out: list[bytes | str] = []
    for name, value in rq_job.to_dict().items():
        if value is not None:
            out += [name, value if isinstance(value, (bytes, str)) else str(value)]
    return out


def rq_queue_key(queue: str) -> str:
    """RQ's list of a queue (RQ names its own keys)."""
    return f"{Queue.redis_queue_namespace_prefix}{queue}"


def depth(conn: redis.Redis, queue: str) -> int:
    """Jobs waiting in `queue`: on RQ's list and in its fair lists."""
    pipe = conn.pipeline(transaction=False)
    pipe.llen(rq_queue_key(queue))
    pipe.get(C.WAITING_KEY.format(queue=queue))
    on_list, waiting = pipe.execute()
    return int(on_list) + int(waiting or 0)


class Feeder:
    """Moves waiting jobs from a queue's fair lists onto RQ's list (`scripts.FEED`)."""

    def __init__(self, conn: redis.Redis) -> None:
        self._script = conn.register_script(scripts.FEED)

    def feed(self, queue: str, pipeline: redis.client.Pipeline | None = None):
        """Top RQ's list of `queue` up; with a pipeline, as part of the caller's round trip
        (sent as EVAL: redis-py would check a registered script with a round trip of its own
        before every execute of a pipeline)."""
        keys = [rq_queue_key(queue), C.RING_KEY.format(queue=queue),
                C.WAITING_KEY.format(queue=queue)]
        args: list[str | int] = [C.FAIR_PREFIX.format(queue=queue), C.FEED_DEPTH]
        if pipeline is not None:
            return pipeline.eval(scripts.FEED, len(keys), *keys, *args)
        return self._script(keys=keys, args=args)


def drain(conn: redis.Redis, queue: str) -> list[str]:
    """Take every job id waiting in `queue`'s fair lists (none of them is on RQ's list)."""
    ids = conn.register_script(scripts.DRAIN)(
        keys=[C.RING_KEY.format(queue=queue), C.WAITING_KEY.format(queue=queue)],
        args=[C.FAIR_PREFIX.format(queue=queue)])
    return [i.decode() if isinstance(i, bytes) else i for i in ids]


def is_waiting(conn: redis.Redis, queue: str, device_id: str, job_id: str) -> bool:
    """Whether `job_id` waits in `device_id`'s fair list of `queue`."""
    return conn.lpos(C.FAIR_PREFIX.format(queue=queue) + device_id, job_id) is not None


def take(conn: redis.Redis, queue: str, n: int, head_device: str = "",
         pipeline: redis.client.Pipeline | None = None, others: Sequence[str] = (),
         burst: int | None = None) -> list[tuple[str, dict]]:
    """Take up to `n` jobs waiting in `queue` for a batch, fairly (`scripts.TAKE`): what is on
    RQ's list first, then one job per device in ring order (`head_device`, the device of the
    job the batch is for, passing its first turn), then top RQ's list up (as `Feeder.feed`);
    at most `burst` while any of the queues `others` has work (the worker's other queues: one
    task's batches must not starve them). Returns (job id, RQ's job hash) pairs; the caller
    must start the jobs. With a pipeline, queued on it (sent as EVAL): the pairs come from
    its `execute()` through `taken`."""
    if n <= 0:
        return []
    keys = [rq_queue_key(queue), C.RING_KEY.format(queue=queue),
            C.WAITING_KEY.format(queue=queue)]
    keys += [k for q in others for k in (rq_queue_key(q), C.WAITING_KEY.format(queue=q))]
    args: list[str | int] = [C.FAIR_PREFIX.format(queue=queue), n, C.FEED_DEPTH, head_device,
                             RQJob.redis_job_namespace_prefix, n if burst is None else burst]
    if pipeline is not None:
        pipeline.eval(scripts.TAKE, len(keys), *keys, *args)
        return []
    return taken(conn.register_script(scripts.TAKE)(keys=keys, args=args))


def taken(reply) -> list[tuple[str, dict]]:
    """The (job id, job hash) pairs of a `take` reply."""
    ids, hashes = reply
    return [(i.decode() if isinstance(i, bytes) else str(i),
             dict(zip(h[::2], h[1::2], strict=True))) for i, h in zip(ids, hashes, strict=True)]
