"""The reaper: answers the jobs nobody else will, so that every acknowledged job gets one answer.

RQ keeps the facts; this module only reads its registries and answers through the outbox:

* a job in a queue's StartedJobRegistry whose worker stopped beating (killed, crashed,
  segfaulted, hung, cut off) is answered `internal` - it is not run again: a job that took a
  worker down may well take the next one down too, and the device may resubmit it under a new id;
* a job in the FailedJobRegistry (a cold stop, a job entry that raised, or RQ's own
  abandoned-job cleanup) with no answer yet is answered `internal`;
* jobs waiting in a queue (or RQ's intermediate queue) that no live worker serves any more
  (a worker that crash-loops at start) are taken off it and answered `model_unavailable`;
* a job that RQ still calls queued but that is in no queue and no registry was popped by a
  worker that died before it could start it (a multi-queue worker dequeues with BLPOP, so RQ
  has no trace of it): it never ran, so it is pushed back on its queue. The agent's
  `UNANSWERED_KEY` index is what makes such a job findable at all.

Every answer goes through `Outbox.answer_once`, the same step the worker uses, so a worker that
wakes up late, a second agent's reaper or a second pass never answers a job twice.
"""

from __future__ import annotations

import threading
import time

import redis
import structlog
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from edge import constants as C
from edge.config import Config
from edge.errors import EdgeError, Internal, ModelUnavailable
from edge.jobs import Job
from edge.outbox import ANSWERED_FIELD, UNANSWERED_KEY, Outbox
from edge.protocol import error_answer
from edge.queueing import queue_name

log = structlog.get_logger("edge.reaper")

REAP_AFTER = 3 * C.HEARTBEAT_INTERVAL  # s without a heartbeat: the worker is gone
REAP_INTERVAL = 2.0  # s between passes


class Reaper:
    """Finds jobs of our queues that lost their worker and answers them once."""

    def __init__(self, conn: redis.Redis, config: Config, owner: str,
                 reap_after: float = REAP_AFTER) -> None:
        self.conn, self.owner, self.reap_after = conn, owner, reap_after
        self.outbox = Outbox(conn)
        self.queues = [queue_name(task, device)
                       for task, tcfg in config.tasks.items() for device in tcfg.devices]
        self._stop = threading.Event()
        self._lost: set[str] = set()  # seen lost on the previous pass

    def stop(self) -> None:
        self._stop.set()

    def run(self, interval: float = REAP_INTERVAL) -> None:
        """Reap every `interval` seconds until stopped; Redis outages are waited out."""
        while not self._stop.wait(interval):
            try:
                self.reap_once()
            except redis.RedisError as exc:
                log.warning("reaper_redis_error", error=str(exc))

    def reap_once(self, now: float | None = None) -> int:
        """One pass over every queue; return how many jobs were answered."""
        now = time.time() if now is None else now
        done = sum(self._reap_queue(name, now) for name in self.queues)
        self._requeue_lost(now)
        return done

    def _reap_queue(self, name: str, now: float) -> int:
        beats = {w.decode(): s for w, s in
                 self.conn.zrange(C.ALIVE_KEY.format(queue=name), 0, -1, withscores=True)}
        queue = Queue(name, connection=self.conn, serializer=JSONSerializer)
        done = 0
        started = StartedJobRegistry(name, connection=self.conn, serializer=JSONSerializer)
        for job_id, _ in started.get_job_and_execution_ids(cleanup=False):
            if self.conn.hexists(RQJob.key_for(job_id), ANSWERED_FIELD):
                continue  # answered; RQ's own cleanup retires the entry later
            job = self._fetch(job_id)
            if job is None or job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            beat = beats.get(job.worker_name or "")
            if beat is not None and now - beat < self.reap_after:
                continue
            done += self._answer(job, Internal("the worker running this job stopped before "
                                               "it finished (crashed or was killed)"))
        failed = FailedJobRegistry(name, connection=self.conn, serializer=JSONSerializer)
        for job_id in failed.get_job_ids(cleanup=False):
            if self.conn.hexists(RQJob.key_for(job_id), ANSWERED_FIELD):
                continue
            job = self._fetch(job_id)
            if job is not None:
                done += self._answer(job, Internal("the job failed in the worker"))
        if not beats or now - max(beats.values()) >= self.reap_after:
            done += self._orphans(queue, now)
        return done

    def _orphans(self, queue: Queue, now: float) -> int:
        """Jobs queued where no worker has beaten lately: take them off and say so."""
        done = 0
        task = queue.name.split(".")[1]
        for key in (queue.key, queue.intermediate_queue_key):
            for raw in self.conn.lrange(key, 0, -1):
                job_id = raw.decode()
                if not self.conn.lrem(key, 1, job_id):
                    continue  # a worker took it after all: it answers
                job = self._fetch(job_id)
                if job is not None:
                    done += self._answer(job, ModelUnavailable(
                        f"no worker serves {task} on this gateway now"))
        return done

    def _requeue_lost(self, now: float, batch: int = 1000) -> None:
        """Push back jobs a dead worker popped but never started (seen twice, to let a live
        worker that just popped one move it to started)."""
        lost = set()
        for raw in self.conn.zrangebyscore(UNANSWERED_KEY, "-inf", now - self.reap_after,
                                           start=0, num=batch):
            job_id = raw.decode()
            job = self._fetch(job_id)
            if job is None:  # expired or deleted: nothing left to answer
                self.conn.zrem(UNANSWERED_KEY, job_id)
                continue
            if self.conn.hexists(job.key, ANSWERED_FIELD):
                self.conn.zrem(UNANSWERED_KEY, job_id)
                continue
            if job.get_status(refresh=False) != JobStatus.QUEUED or job.origin not in self.queues:
                continue  # started / failed: the registry scans handle it
            queue = Queue(job.origin, connection=self.conn, serializer=JSONSerializer)
            if (self.conn.lpos(queue.key, job_id) is not None
                    or self.conn.lpos(queue.intermediate_queue_key, job_id) is not None):
                continue
            if job_id in self._lost:
                queue.push_job_id(job_id, at_front=True)
                log.warning("job_requeued", rq_job=job_id, queue=job.origin,
                            reason="popped by a worker that died before starting it")
            else:
                lost.add(job_id)
        self._lost = lost

    def _fetch(self, job_id: str) -> RQJob | None:
        try:
            return RQJob.fetch(job_id, connection=self.conn, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

    def _answer(self, rq_job: RQJob, error: EdgeError) -> int:
        try:
            job = Job.from_json(rq_job.args[0])
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            log.error("reaper_job_unreadable", rq_job=rq_job.id, error=str(exc))
            return 0
        answered = self.outbox.answer_once(rq_job.key, error_answer(job.route, error),
                                           self.owner, job.blob_key)
        if answered:
            log.warning("job_reaped", job_id=job.route.request_id,
                        device_id=job.route.device_id, task=job.task, code=error.code,
                        worker=rq_job.worker_name, reason=error.message)
        return int(answered)
