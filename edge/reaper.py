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

Ages are read in Redis' clock (`TIME`, see `edge.alive`), never a host's. And an age only means
"dead" while workers could beat: after an outage (`Grace`) the reaper holds every judgement made
on an age - started jobs, queued jobs, lost jobs - until workers have had `reap_after` s (plus
one beat) of a reachable Redis again. Failed jobs are still answered meanwhile: RQ's verdict.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from edge import alive
from edge import constants as C
from edge.config import Config
from edge.errors import EdgeError, Internal, ModelUnavailable
from edge.jobs import Job, error_answer
from edge.outbox import Outbox
from edge.queueing import drain, is_waiting, queue_name

log = structlog.get_logger("edge.reaper")

REAP_AFTER = 3 * C.HEARTBEAT_INTERVAL  # s without a heartbeat: the worker is gone
REAP_INTERVAL = 2.0  # s between passes
# Redis' clock may run this far from this host's monotonic clock between two passes (reply
# latency) before it counts as a step; a smaller step cannot make a beating worker look dead
# (a live worker's beat is at most one HEARTBEAT_INTERVAL old, REAP_AFTER is three).
STEP_TOLERANCE = 2.0  # s


class Grace:
    """Whether a heartbeat's age means what it says right now.

    It does not right after workers could not beat: judgement holds for `grace` s after a pass
    that saw any of
    * the previous pass failed with a Redis error (Redis down, or cut off from us);
    * the previous pass of any reaper (`alive.watch`) is more than `max_gap` s of Redis' clock
      ago, or in the future (Redis was down, or every agent was, or Redis' clock stepped);
    * Redis' clock moved more than `STEP_TOLERANCE` s unlike this host's monotonic clock since
      our previous pass (a step either way, or a fail-over to a host whose clock differs).
    `clock` is the monotonic clock (a test passes a fake one).
    """

    def __init__(self, grace: float, max_gap: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.grace, self.max_gap, self.clock = grace, max_gap, clock
        self._until = -math.inf  # monotonic time the hold ends
        self._failed = False
        self._last: tuple[float, float] | None = None  # (monotonic, Redis) of our last pass

    def failed(self) -> None:
        """A pass could not reach Redis: the next one that does starts a hold."""
        self._failed = True

    def observe(self, now: float, watched: float | None) -> str | None:
        """Take a pass's reading of Redis' clock (`now`) and of the previous pass's stamp
        (`watched`, None: no reaper ever looked); return why a hold starts now, else None."""
        mono = self.clock()
        reason = None
        if self._failed:
            reason = "redis was unreachable"
        elif watched is not None and not 0 <= now - watched <= self.max_gap:
            reason = f"no reaper looked at redis for {now - watched:.1f} s of its clock"
        elif self._last is not None and abs((now - self._last[1]) - (mono - self._last[0])
                                            ) > STEP_TOLERANCE:
            reason = (f"redis' clock moved {now - self._last[1]:.1f} s while ours moved "
                      f"{mono - self._last[0]:.1f} s")
        self._failed, self._last = False, (mono, now)
        if reason is not None:
            self._until = mono + self.grace
        return reason

    def holding(self) -> bool:
        """Whether ages must not be judged now."""
        return self.clock() < self._until


class Reaper:
    """Finds jobs of our queues that lost their worker and answers them once."""

    def __init__(self, conn: redis.Redis, config: Config, owner: str,
                 reap_after: float = REAP_AFTER, grace: float | None = None) -> None:
        self.conn, self.owner, self.reap_after = conn, owner, reap_after
        # After an outage a worker gets reap_after s of a reachable Redis, plus one beat period
        # to reconnect. Passes of a live agent are never half reap_after apart: a longer gap
        # could have kept workers from beating.
        self.grace = Grace(reap_after + C.HEARTBEAT_INTERVAL if grace is None else grace,
                           reap_after / 2)
        self._held = False
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
            self.tick()

    def tick(self) -> int:
        """One pass (`reap_once`); a Redis error is logged and starts a hold (`Grace`)."""
        try:
            return self.reap_once()
        except redis.RedisError as exc:
            self.grace.failed()
            log.warning("reaper_redis_error", error=str(exc))
            return 0

    def reap_once(self) -> int:
        """One pass over every queue, ages read in Redis' clock; return how many jobs were
        answered. While the grace holds, only failed jobs are answered."""
        now, watched = alive.watch(self.conn)
        reason = self.grace.observe(now, watched)
        if reason is not None:
            log.warning("reaper_holding", reason=reason, seconds=self.grace.grace,
                        note="workers get time to beat before a job is reaped for silence")
        judge = not self.grace.holding()
        if judge and self._held:
            log.info("reaper_judging", note="grace over: silent workers' jobs are reaped")
        self._held = not judge
        done = sum(self._reap_queue(name, now, judge) for name in self.queues)
        if judge:
            self._requeue_lost(now)
        else:
            self._lost = set()  # a sighting before or during an outage proves nothing
        return done

    def _fresh(self, beat: float, now: float) -> bool:
        """Whether a beat stamped `beat` (Redis time) is recent. One far in the future was
        stamped before Redis' clock stepped back, and its worker has not beaten since (a beat
        written while this pass runs is a little after `now`: that one is fresh)."""
        return abs(now - beat) < self.reap_after

    def _reap_queue(self, name: str, now: float, judge: bool = True) -> int:
        done = self._reap_failed(name)
        if not judge:
            return done
        beats = alive.beats(self.conn, name)
        queue = Queue(name, connection=self.conn, serializer=JSONSerializer)
        started = StartedJobRegistry(name, connection=self.conn, serializer=JSONSerializer)
        for job_id, _ in started.get_job_and_execution_ids(cleanup=False):
            if self.conn.hexists(RQJob.key_for(job_id), C.ANSWERED_FIELD):
                continue  # answered; RQ's own cleanup retires the entry later
            job = self._fetch(job_id)
            if job is None or job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            beat = beats.get(job.worker_name or "")
            if beat is not None and self._fresh(beat, now):
                continue
            done += self._answer(job, Internal("the worker running this job stopped before "
                                               "it finished (crashed or was killed)"))
        if not any(self._fresh(beat, now) for beat in beats.values()):
            done += self._orphans(queue, now)
        return done

    def _reap_failed(self, name: str) -> int:
        """Jobs RQ itself failed (no heartbeat judgement: answered even while holding)."""
        done = 0
        failed = FailedJobRegistry(name, connection=self.conn, serializer=JSONSerializer)
        for job_id in failed.get_job_ids(cleanup=False):
            if self.conn.hexists(RQJob.key_for(job_id), C.ANSWERED_FIELD):
                continue
            job = self._fetch(job_id)
            if job is not None:
                done += self._answer(job, Internal("the job failed in the worker"))
        return done

    def _orphans(self, queue: Queue, now: float) -> int:
        """Jobs queued where no worker has beaten lately: take them off and say so."""
        done = 0
        task = queue.name.split(".")[1]
        taken = drain(self.conn, queue.name)  # those waiting in the fair lists, all at once
        for key in (queue.key, queue.intermediate_queue_key):
            for raw in self._ids(self.conn.lrange(key, 0, -1)):
                job_id = raw
                if self.conn.lrem(key, 1, job_id):  # else a worker took it after all
                    taken.append(job_id)
        for job_id in taken:
            job = self._fetch(job_id)
            if job is not None:
                done += self._answer(job, ModelUnavailable(
                    f"no worker serves {task} on this gateway now"))
        return done

    def _requeue_lost(self, now: float, batch: int = 1000) -> None:
        """Push back jobs a dead worker popped but never started (seen twice, to let a live
        worker that just popped one move it to started). `now` and the index's scores are
        both Redis' clock (the enqueue stamps them with `TIME`)."""
        lost = set()
        for job_id in self._ids(self.conn.zrangebyscore(C.UNANSWERED_KEY, "-inf",
                                                        now - self.reap_after, start=0,
                                                        num=batch)):
            job = self._fetch(job_id)
            if job is None:  # expired or deleted: nothing left to answer
                self.conn.zrem(C.UNANSWERED_KEY, job_id)
                continue
            if self.conn.hexists(job.key, C.ANSWERED_FIELD):
                self.conn.zrem(C.UNANSWERED_KEY, job_id)
                continue
            if job.get_status(refresh=False) != JobStatus.QUEUED or job.origin not in self.queues:
                continue  # started / failed: the registry scans handle it
            queue = Queue(job.origin, connection=self.conn, serializer=JSONSerializer)
            if (self.conn.lpos(queue.key, job_id) is not None
                    or self.conn.lpos(queue.intermediate_queue_key, job_id) is not None
                    or self._waiting(job)):
                continue
            if job_id in self._lost:
                queue.push_job_id(job_id, at_front=True)
                log.warning("job_requeued", rq_job=job_id, queue=job.origin,
                            reason="popped by a worker that died before starting it")
            else:
                lost.add(job_id)
        self._lost = lost

    @staticmethod
    def _ids(raw: Any) -> list[str]:
        """Job ids from a Redis reply (bytes)."""
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    def _waiting(self, rq_job: RQJob) -> bool:
        """Whether the job waits in its device's fair list (not lost: its turn will come)."""
        try:
            device_id = Job.from_json(rq_job.args[0]).route.device_id
        except (IndexError, KeyError, TypeError, ValueError):
            return False
        return is_waiting(self.conn, rq_job.origin, device_id, rq_job.id)

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
