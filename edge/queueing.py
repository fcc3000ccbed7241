"""From a validated Submission to an RQ job: routing, back-pressure, blob storage, dedup."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Mapping

import redis
from rq import Queue
from rq.exceptions import DuplicateJobError
from rq.serializers import JSONSerializer

from edge import constants as C
from edge.config import Config
from edge.errors import Busy, ModelUnavailable
from edge.jobs import Job, job_key
from edge.outbox import UNANSWERED_KEY
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


class Router:
    """Picks the first device of a task whose worker is alive and whose queue has room."""

    def __init__(self, conn: redis.Redis, config: Config, cache_seconds: float = 1.0) -> None:
        self.conn, self.config, self.cache_seconds = conn, config, cache_seconds
        self._alive: dict[str, tuple[float, bool]] = {}

    def alive(self, queue: str) -> bool:
        """Whether some worker listening to `queue` has sent a heartbeat lately (cached)."""
        now = time.time()
        cached = self._alive.get(queue)
        if cached and now - cached[0] < self.cache_seconds:
            return cached[1]
        key = C.ALIVE_KEY.format(queue=queue)
        alive = bool(self.conn.zcount(key, now - C.ALIVE_WINDOW, "+inf"))
        self._alive[queue] = (now, alive)
        return alive

    def live_queues(self, task: str) -> list[str]:
        """The task's queues, in device order, that some live worker listens to."""
        return [name for name in (queue_name(task, d) for d in self.config.tasks[task].devices)
                if self.alive(name)]

    def choose(self, task: str, lengths: Mapping[str, int]) -> str:
        """The first live queue with room. Busy when every live queue is full,
        ModelUnavailable when no worker serves the task at all (`lengths` is empty)."""
        limit = self.config.tasks[task].queue_limit
        for name, length in lengths.items():
            if length < limit:
                return name
        if lengths:
            raise Busy(f"every {task} queue is full; try again later")
        raise ModelUnavailable(f"no worker serves {task} on this gateway now")


class Enqueuer:
    """Stores a job's inputs as one Redis blob and enqueues its RQ job, once per request id.

    Two round trips per new job: the duplicate check and the queue lengths together, then the
    blob (with RQ's queue registration) and RQ's atomic unique enqueue.
    """

    def __init__(self, conn: redis.Redis, config: Config, router: Router) -> None:
        self.conn, self.config, self.router = conn, config, router
        self._queues: dict[str, Queue] = {}

    def _queue(self, name: str) -> Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(name, connection=self.conn, serializer=JSONSerializer)
        return q

    def submit(self, sub: Submission, received: float) -> Enqueued:
        """Enqueue `sub`; a duplicate of a job still known to RQ is not enqueued again."""
        task = sub.route.task
        tcfg = self.config.tasks[task]
        key = job_key(sub.route.device_id, sub.route.request_id)
        deadline = received + tcfg.deadline
        if sub.deadline is not None:
            deadline = min(deadline, sub.deadline)
        job = Job(key=key, route=sub.route, params=dict(sub.params),
                  blob_key=C.BLOB_KEY.format(job_key=key), received=received,
                  deadline=deadline, batch=sub.batch)
        live = self.router.live_queues(task)
        pipe = self.conn.pipeline(transaction=False)
        pipe.exists(f"rq:job:{key}")
        for name in live:
            pipe.llen(self._queue(name).key)
        exists, *lengths = pipe.execute()
        if exists:
            return Enqueued(job, "", duplicate=True)
        queue = self._queue(self.router.choose(task, dict(zip(live, lengths))))
        self._store_blob(job.blob_key, sub, key, received, queue)
        try:
            # RQ registers the queue on the pipeline it is given, then enqueues atomically with
            # its own Lua script (a given pipeline is not used for that): the registration went
            # out with the blob, so this pipeline is left unsent.
            queue.enqueue_call(
                C.JOB_FUNCTION, args=(job.to_json(),), job_id=key, timeout=tcfg.timeout,
                result_ttl=self.config.dedup_ttl, failure_ttl=self.config.dedup_ttl,
                unique=True, description=f"{task} {sub.route.device_id}/{sub.route.request_id}",
                pipeline=self.conn.pipeline())
        except DuplicateJobError:
            return Enqueued(job, queue.name, duplicate=True)
        return Enqueued(job, queue.name, duplicate=False)

    def _store_blob(self, key: str, sub: Submission, job_id: str, received: float,
                    queue: Queue) -> None:
        fields: dict[str, bytes | str] = {"n": str(len(sub.media))}
        if sub.text is not None:
            fields["text"] = json.dumps(sub.text)
        if sub.ids is not None:
            fields["ids"] = json.dumps(sub.ids)
        for i, (ctype, data) in enumerate(sub.media):
            fields[f"t{i}"] = ctype
            fields[f"m{i}"] = data
        pipe = self.conn.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.config.blob_ttl)
        # Indexed before RQ sees it: the reaper finds it even if a worker loses it (see reaper)
        pipe.zadd(UNANSWERED_KEY, {job_id: received}, nx=True)
        pipe.sadd(queue.redis_queues_keys, queue.key)  # what RQ's enqueue would send alone
        pipe.execute()


def read_blob(conn: redis.Redis, key: str) -> Mapping[bytes, bytes] | None:
    """A job's stored inputs, or None when the blob has expired."""
    fields = conn.hgetall(key)
    return fields or None
