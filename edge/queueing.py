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

    def pick(self, task: str) -> str:
        """The queue to use: Busy when every live queue is full, ModelUnavailable when no
        worker serves the task at all."""
        tcfg = self.config.tasks[task]
        full = False
        for device in tcfg.devices:
            name = queue_name(task, device)
            if not self.alive(name):
                continue
            if self.conn.llen(f"rq:queue:{name}") < tcfg.queue_limit:
                return name
            full = True
        if full:
            raise Busy(f"every {task} queue is full; try again later")
        raise ModelUnavailable(f"no worker serves {task} on this gateway now")


class Enqueuer:
    """Stores a job's inputs as one Redis blob and enqueues its RQ job, once per request id."""

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
        if self.conn.exists(f"rq:job:{key}"):
            return Enqueued(job, "", duplicate=True)
        name = self.router.pick(task)
        self._store_blob(job.blob_key, sub, key, received)
        try:
            self._queue(name).enqueue_call(
                C.JOB_FUNCTION, args=(job.to_json(),), job_id=key, timeout=tcfg.timeout,
                result_ttl=self.config.dedup_ttl, failure_ttl=self.config.dedup_ttl,
                unique=True, description=f"{task} {sub.route.device_id}/{sub.route.request_id}")
        except DuplicateJobError:
            return Enqueued(job, name, duplicate=True)
        return Enqueued(job, name, duplicate=False)

    def _store_blob(self, key: str, sub: Submission, job_id: str, received: float) -> None:
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
        pipe.execute()


def read_blob(conn: redis.Redis, key: str) -> Mapping[bytes, bytes] | None:
    """A job's stored inputs, or None when the blob has expired."""
    fields = conn.hgetall(key)
    return fields or None
