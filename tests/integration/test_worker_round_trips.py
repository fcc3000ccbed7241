"""How many Redis round trips a worker makes between taking a job off its queue and running it.

Each one is a wake-up of Redis and of the worker on the path of every job (at 1 job/s, each
costs more than the job's own bookkeeping): RQ's worker sends a heartbeat, an execution record
and the job's start as three; ours sends one transaction that also reads the job's inputs.
"""

from __future__ import annotations

import time

import pytest
from redis.connection import Connection
from rq import Queue
from rq.serializers import JSONSerializer

from edge import constants as C
from edge.jobs import Job, Route
from edge.outbox import Outbox
from workers import perform
from workers import worker as worker_module
from workers.model_store import ModelSet
from workers.worker import EdgeWorker

pytestmark = pytest.mark.integration


def _job(request_id: str) -> Job:
    route = Route("dev", request_id, "tokenize", "envelope",
                  f"edge/results/dev/{request_id}")
    key = f"j-{request_id}"
    return Job(key=key, route=route, params={}, blob_key=C.BLOB_KEY.format(job_key=key),
               received=time.time(), deadline=time.time() + 60)


def test_a_dequeued_job_starts_after_one_round_trip(conn, monkeypatch):
    sent: list[int] = [0]
    original_send = Connection.send_packed_command

    def counting_send(self, command, check_health=True):
        sent[0] += 1
        return original_send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting_send)
    marks: dict[str, int] = {}
    original_dequeue = Queue.dequeue_any.__func__

    def dequeue_any(cls, *args, **kwargs):
        result = original_dequeue(cls, *args, **kwargs)
        if result is not None:
            marks["dequeued"] = sent[0]  # the pop and the read of RQ's job hash are done
        return result

    monkeypatch.setattr(Queue, "dequeue_any", classmethod(dequeue_any))
    original_execute = perform.execute

    def execute(job, *args, **kwargs):
        marks["started"] = sent[0]
        return original_execute(job, *args, **kwargs)

    monkeypatch.setattr(perform, "execute", execute)

    queue = Queue("edge.tokenize.CPU", connection=conn, serializer=JSONSerializer)
    job = _job("r1")
    queue.enqueue(C.JOB_FUNCTION, job.to_json(), job_id=job.key)
    runtime = perform.Runtime("w-test", "CPU", ModelSet(handlers={}, unavailable={}))
    # as at 1 job/s and slower: every heartbeat is due (none falls inside the debounce)
    monkeypatch.setattr(worker_module, "HEARTBEAT_DEBOUNCE", 0.0)
    worker = EdgeWorker([queue], runtime=runtime, connection=conn)
    worker.work(burst=True)

    assert marks["started"] - marks["dequeued"] == 1
    answer = conn.xrange(Outbox(conn).stream)
    assert len(answer) == 1  # the job ran (no models: answered model_unavailable) and answered
    # the heartbeat that was skipped after the dequeue went in the start transaction instead
    assert conn.hget(worker.key, "last_heartbeat") is not None
