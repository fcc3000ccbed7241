"""The agent's batched enqueue (edge/queueing.py `Enqueuer.submit_many`): several job
messages stored in one round trip behave exactly as each stored alone."""

from __future__ import annotations

import time

import pytest
from rq import Queue

from edge import alive
from edge import constants as C
from edge.config import Config, TaskConfig
from edge.errors import Busy, ModelUnavailable
from edge.jobs import Route
from edge.protocol import Submission
from edge.queueing import Enqueued, Enqueuer, queue_name

QUEUE = queue_name("tokenize", "CPU")


def _sub(device: str, rid: str, text: str = "hello") -> Submission:
    route = Route(device, rid, "tokenize", "envelope", f"edge/results/{device}/{rid}")
    return Submission(route=route, params={}, batch=False, text=(text,))


def _config(device_limit: int = 3, queue_limit: int = 100) -> Config:
    return Config(tasks={"tokenize": TaskConfig(devices=("CPU",), device_limit=device_limit,
                                                queue_limit=queue_limit)})


@pytest.mark.integration
def test_a_batch_is_stored_as_each_job_alone(conn):
    """Stored jobs, a duplicate inside the batch and one of an earlier round trip, and the
    device quota counted across the batch: the outcomes `submit` gives one by one."""
    alive.beat(conn, "w-1", [QUEUE], {})
    enq = Enqueuer(conn, _config(device_limit=3))
    enq.submit(_sub("a", "r0"), time.time())
    subs = [_sub("a", "r0"), _sub("a", "r1"), _sub("a", "r1"), _sub("a", "r2"), _sub("a", "r3"),
            _sub("b", "r1")]
    out = enq.submit_many(subs, time.time())
    assert [type(o) for o in out] == [Enqueued, Enqueued, Enqueued, Enqueued, Busy, Enqueued]
    assert [o.duplicate for o in out if isinstance(o, Enqueued)] == [True, False, True, False,
                                                                    False]
    assert isinstance(out[4], Busy) and out[4].code == "busy" and out[4].limit == "device_limit"
    stored = {o.job.key for o in out if isinstance(o, Enqueued)}
    assert all(conn.exists(f"rq:job:{k}") for k in stored)
    assert conn.zcard(C.UNANSWERED_KEY) == 4  # r0, r1, r2 of a; r1 of b
    assert Queue(QUEUE, connection=conn).count + int(conn.get(C.WAITING_KEY.format(
        queue=QUEUE)) or 0) == 4


@pytest.mark.integration
def test_no_live_worker_and_a_lost_script(conn):
    enq = Enqueuer(conn, _config())
    out = enq.submit_many([_sub("a", "r1"), _sub("b", "r1")], time.time())
    assert all(isinstance(o, ModelUnavailable) for o in out)
    alive.beat(conn, "w-1", [QUEUE], {})
    conn.script_flush()  # as after a Redis restart: the script is loaded again, once
    out = enq.submit_many([_sub("a", "r1"), _sub("b", "r1")], time.time())
    assert [o.duplicate for o in out if isinstance(o, Enqueued)] == [False, False]
    assert enq.submit_many([], time.time()) == []
