"""From a validated Submission to an RQ job: routing, back-pressure, blob storage, dedup."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Mapping

import redis
from rq import Queue
from rq.serializers import JSONSerializer
from rq.utils import now

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


# One atomic step per job, one round trip: RQ's unique enqueue (rq.scripts'
# UNIQUE_ENQUEUE_SCRIPT: refuse an existing job hash, write it, set its TTL, push its id), with
# the routing and the payload folded in. The first candidate queue with a live worker (one that
# sent a heartbeat in the last ALIVE_WINDOW seconds) and under the limit takes the job.
_ENQUEUE = """
-- KEYS: job hash, blob, unanswered index, RQ's queue set, then the candidate queues (the task's
--       devices in order) and, in the same order, their workers' alive sets
-- ARGV: job id, queue limit, received, blob TTL, job TTL (-1: none), alive since, nblob,
--       blob field/values, queue names (one per candidate), job hash field/values
-- Returns the chosen candidate (1-based), 0 for a duplicate, -1 when every live queue is
-- full, -2 when no candidate has a live worker.
if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
local nq = (#KEYS - 4) / 2
local nblob = tonumber(ARGV[7])
local live, chosen = 0, nil
for i = 1, nq do
  if redis.call("ZCOUNT", KEYS[4 + nq + i], ARGV[6], "+inf") > 0 then
    live = live + 1
    if redis.call("LLEN", KEYS[4 + i]) < tonumber(ARGV[2]) then chosen = i break end
  end
end
if chosen == nil then
  if live > 0 then return -1 end
  return -2
end
redis.call("DEL", KEYS[2])
redis.call("HSET", KEYS[2], unpack(ARGV, 8, 7 + nblob))
redis.call("EXPIRE", KEYS[2], ARGV[4])
redis.call("ZADD", KEYS[3], "NX", ARGV[3], ARGV[1])
redis.call("SADD", KEYS[4], KEYS[4 + chosen])
redis.call("HSET", KEYS[1], unpack(ARGV, 8 + nblob + nq))
redis.call("HSET", KEYS[1], "origin", ARGV[7 + nblob + chosen])
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call("EXPIRE", KEYS[1], ttl) end
redis.call("RPUSH", KEYS[4 + chosen], ARGV[1])
return chosen
"""


class Enqueuer:
    """Stores a job's inputs as one Redis blob and enqueues its RQ job, once per request id.

    One round trip per job (`_ENQUEUE`): the duplicate check, the choice of queue (the task's
    devices in order, skipping those with no live worker and those full), the blob, the reaper's
    index and RQ's own enqueue happen in one Lua step, so no other client ever sees a job
    without its payload or a payload without its job.
    """

    def __init__(self, conn: redis.Redis, config: Config) -> None:
        self.conn, self.config = conn, config
        self._queues: dict[str, Queue] = {}
        self._script = conn.register_script(_ENQUEUE)

    def _queue(self, name: str) -> Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(name, connection=self.conn, serializer=JSONSerializer)
        return q

    def submit(self, sub: Submission, received: float) -> Enqueued:
        """Enqueue `sub`; a duplicate of a job still known to RQ is not enqueued again.

        Busy when every live queue of the task is full, ModelUnavailable when none is live.
        """
        task = sub.route.task
        tcfg = self.config.tasks[task]
        key = job_key(sub.route.device_id, sub.route.request_id)
        deadline = received + tcfg.deadline
        if sub.deadline is not None:
            deadline = min(deadline, sub.deadline)
        job = Job(key=key, route=sub.route, params=dict(sub.params),
                  blob_key=C.BLOB_KEY.format(job_key=key), received=received,
                  deadline=deadline, batch=sub.batch)
        queues = [self._queue(queue_name(task, d)) for d in tcfg.devices]
        rq_job = self._rq_job(queues[0], job)
        blob = _blob_fields(sub)
        keys = [rq_job.key, job.blob_key, UNANSWERED_KEY, Queue.redis_queues_keys,
                *(q.key for q in queues), *(C.ALIVE_KEY.format(queue=q.name) for q in queues)]
        args = [key, tcfg.queue_limit, received, self.config.blob_ttl,
                rq_job.ttl if rq_job.ttl is not None else -1, time.time() - C.ALIVE_WINDOW,
                len(blob), *blob, *(q.name for q in queues), *_hash_fields(rq_job)]
        chosen = self._script(keys=keys, args=args)
        if chosen == 0:
            return Enqueued(job, "", duplicate=True)
        if chosen > 0:
            return Enqueued(job, queues[chosen - 1].name, duplicate=False)
        if chosen == -1:
            raise Busy(f"every {task} queue is full; try again later")
        raise ModelUnavailable(f"no worker serves {task} on this gateway now")

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


def _blob_fields(sub: Submission) -> list[bytes | str]:
    """The payload as flat field/value pairs of the blob hash."""
    fields: list[bytes | str] = ["n", str(len(sub.media))]
    if sub.text is not None:
        fields += ["text", json.dumps(sub.text)]
    if sub.ids is not None:
        fields += ["ids", json.dumps(sub.ids)]
    for i, (ctype, data) in enumerate(sub.media):
        fields += [f"t{i}", ctype, f"m{i}", data]
    return fields


def _hash_fields(rq_job) -> list[bytes | str]:
    """RQ's job hash as flat field/value pairs (what rq.scripts writes for a unique enqueue)."""
    out: list[bytes | str] = []
    for name, value in rq_job.to_dict().items():
        if value is not None:
            out += [name, value if isinstance(value, (bytes, str)) else str(value)]
    return out


def read_blob(conn: redis.Redis, key: str) -> Mapping[bytes, bytes] | None:
    """A job's stored inputs, or None when the blob has expired."""
    fields = conn.hgetall(key)
    return fields or None
