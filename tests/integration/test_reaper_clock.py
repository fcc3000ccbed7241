"""The reaper ages heartbeats in Redis' clock, and holds its judgement after an outage.

With the session's real Redis: workers' beats are written by the worker's own code, jobs are
RQ's own records, the outage is a real cut connection (a TCP proxy between the reaper and
Redis). What a device would see is the outbox: which answers, how many.
"""

from __future__ import annotations

import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from edge import alive, config
from edge import constants as C
from edge.jobs import Answer, Job, Route, job_key
from edge.reaper import REAP_AFTER, Reaper
from edge.status import node_status
from tests.faults.helpers import TcpProxy, wait_for
from workers import perform
from workers.model_store import ModelSet
from workers.worker import EdgeWorker

pytestmark = pytest.mark.integration

QUEUE = "edge.tokenize.CPU"
CONFIG = config.parse({"tasks": {"tokenize": {"devices": ["CPU"]}}})
SILENT = REAP_AFTER + 15  # s since a dead worker's last beat (Redis' clock)
GRACE = 2.0  # s: the tests' grace after an outage (the daemon's is REAP_AFTER + one beat)


def _queued(conn: redis.Redis, rid: str) -> RQJob:
    """A job as the agent leaves it: on RQ's queue and in the reaper's index."""
    key = job_key("dev", "tokenize", rid)
    job = Job(key=key, route=Route("dev", rid, "tokenize", "envelope", f"edge/results/dev/{rid}"),
              params={}, blob_key=C.BLOB_KEY.format(job_key=key), received=time.time(),
              deadline=time.time() + 600)
    queue = Queue(QUEUE, connection=conn, serializer=JSONSerializer)
    rq_job = queue.enqueue(C.JOB_FUNCTION, job.to_json(), job_id=key)
    conn.zadd(C.UNANSWERED_KEY, {key: alive.redis_time(conn)})
    return rq_job


def _started(conn: redis.Redis, rid: str, worker: str) -> RQJob:
    """A job `worker` took off the queue and started, as RQ records it."""
    rq_job = _queued(conn, rid)
    conn.lrem(Queue(QUEUE, connection=conn).key, 1, rq_job.id)
    pipe = conn.pipeline()
    Execution.create(rq_job, ttl=600, pipeline=pipe, worker_name=worker)
    rq_job.prepare_for_execution(worker, pipeline=pipe)
    pipe.execute()
    return rq_job


def _lost(conn: redis.Redis, rid: str, age: float) -> RQJob:
    """A job a worker popped and died with before starting it: queued, on no list, stored
    `age` s ago (Redis' clock)."""
    rq_job = _queued(conn, rid)
    conn.lrem(Queue(QUEUE, connection=conn).key, 1, rq_job.id)
    conn.zadd(C.UNANSWERED_KEY, {rq_job.id: alive.redis_time(conn) - age})
    return rq_job


def _fell_silent(conn: redis.Redis, worker: str, ago: float = SILENT) -> None:
    """`worker` beat last `ago` s ago, in Redis' clock."""
    conn.zadd(C.ALIVE_KEY.format(queue=QUEUE), {worker: alive.redis_time(conn) - ago})


def _worker(conn: redis.Redis, name: str) -> EdgeWorker:
    runtime = perform.Runtime(name, "CPU", ModelSet(handlers={}, unavailable={}))
    return EdgeWorker([Queue(QUEUE, connection=conn, serializer=JSONSerializer)],
                      runtime=runtime, connection=conn, name=name)


def _answers(conn: redis.Redis) -> dict[str, list[str]]:
    """Every final answer in the outbox: request id -> outcome codes, in order."""
    got: dict[str, list[str]] = {}
    for _, fields in conn.xrange(C.OUTBOX_STREAM):
        answer = Answer.from_fields(fields)
        body = answer.body
        code = "ok" if body.get("status") == "ok" else body["error"]["code"]
        got.setdefault(answer.route.request_id, []).append(code)
    return got


@pytest.fixture
def skew(monkeypatch):
    """`skew(seconds)`: this host's wall clock runs `seconds` off from here on."""
    real = time.time

    def set_skew(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    return set_skew


# -- ages in Redis' clock


def test_beats_of_a_worker_whose_clock_is_behind_are_fresh(conn, skew):
    late = _worker(conn, "w-late-clock")
    skew(-40.0)  # the worker's host is 40 s behind: by its own clock its beat is 40 s old
    late._announce()
    skew(0.0)
    _started(conn, "running", "w-late-clock")
    _started(conn, "orphan", "w-dead")
    _fell_silent(conn, "w-dead")
    Reaper(conn, CONFIG, owner="agent").tick()
    assert _answers(conn) == {"orphan": ["internal"]}


@pytest.mark.parametrize("offset", [3600.0, -3600.0], ids=["agent-ahead", "agent-behind"])
def test_an_agent_whose_clock_is_off_judges_by_redis_clock(conn, skew, offset):
    _worker(conn, "w-live")._announce()
    _started(conn, "running", "w-live")
    _started(conn, "orphan", "w-dead")
    _fell_silent(conn, "w-dead")
    skew(offset)
    reaper = Reaper(conn, CONFIG, owner="agent")
    for _ in range(3):
        reaper.tick()
    assert _answers(conn) == {"orphan": ["internal"]}


def test_status_counts_live_workers_by_redis_clock(conn, skew):
    _worker(conn, "w-live")._announce()
    _fell_silent(conn, "w-dead", ago=C.ALIVE_WINDOW + 10)
    skew(3600.0)
    doc = node_status(conn, CONFIG)
    assert doc["queues"][QUEUE]["workers"] == 1


# -- the grace after an outage


@pytest.fixture
def cut_off(redis_server, conn):
    """A Redis connection through a proxy the test can cut (`proxy.cut()` / `proxy.heal()`)."""
    proxy = TcpProxy(redis_server.port)
    far = redis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=5,
                      socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))  # fail fast
    yield proxy, far
    far.close()
    proxy.close()


def _outage(proxy: TcpProxy, reaper: Reaper) -> None:
    """Redis is out of the reaper's reach for a few passes, then back."""
    proxy.cut()
    for _ in range(3):
        assert reaper.tick() == 0
    proxy.heal()


def _until_answered(conn, reaper: Reaper, ids, timeout: float = 30.0) -> None:
    def answered() -> bool:
        reaper.tick()
        return set(ids) <= set(_answers(conn))

    wait_for(answered, timeout, f"answers to {ids}")


def test_after_an_outage_silent_workers_jobs_wait_for_the_grace_then_are_answered_once(
        conn, cut_off):
    proxy, far = cut_off
    reaper = Reaper(far, CONFIG, owner="agent", grace=GRACE)
    reaper.tick()  # a pass before the outage: all well
    _started(conn, "running", "w-1")
    _queued(conn, "queued")
    _fell_silent(conn, "w-1")  # its beats could not reach Redis during the outage
    _outage(proxy, reaper)
    reaper.tick()
    assert _answers(conn) == {}, "answered on a heartbeat age measured across the outage"
    assert conn.lrange(Queue(QUEUE, connection=conn).key, 0, -1) == [
        job_key("dev", "tokenize", "queued").encode()]
    # the worker stays silent through the grace: it really is dead
    _until_answered(conn, reaper, ["running", "queued"])
    for _ in range(3):
        reaper.tick()
    assert _answers(conn) == {"running": ["internal"], "queued": ["model_unavailable"]}


def test_a_worker_that_beats_during_the_grace_keeps_its_jobs(conn, cut_off):
    proxy, far = cut_off
    reaper = Reaper(far, CONFIG, owner="agent", grace=GRACE)
    reaper.tick()
    _started(conn, "running", "w-1")
    _queued(conn, "queued")
    _fell_silent(conn, "w-1")
    _outage(proxy, reaper)
    reaper.tick()
    _worker(conn, "w-1")._announce()  # back within a beat of Redis' return
    deadline = time.monotonic() + 2 * GRACE
    while time.monotonic() < deadline:  # through the grace and past it
        reaper.tick()
        time.sleep(0.2)
    assert _answers(conn) == {}


def test_an_agent_started_after_an_outage_holds_judgement(conn):
    """Redis was down for a minute with every agent (its data came back from disk): the last
    reaper's stamp tells the new agent's reaper, which has seen no outage itself."""
    _started(conn, "running", "w-1")
    _fell_silent(conn, "w-1", ago=60)
    conn.set(C.WATCH_KEY, alive.redis_time(conn) - 60)
    reaper = Reaper(conn, CONFIG, owner="agent", grace=GRACE)
    reaper.tick()
    assert _answers(conn) == {}
    _until_answered(conn, reaper, ["running"])
    assert _answers(conn) == {"running": ["internal"]}


def test_a_lost_job_is_not_requeued_during_the_grace(conn, cut_off):
    proxy, far = cut_off
    _worker(conn, "w-1")._announce()  # a live worker serves the queue
    reaper = Reaper(far, CONFIG, owner="agent", grace=GRACE)
    reaper.tick()
    lost = _lost(conn, "lost", age=SILENT)
    _outage(proxy, reaper)
    reaper.tick()
    reaper.tick()  # seen twice, but across an outage: the worker holding it may yet start it
    rq_list = Queue(QUEUE, connection=conn).key
    assert conn.lrange(rq_list, 0, -1) == []

    def requeued() -> bool:
        _worker(conn, "w-1")._announce()
        reaper.tick()
        return conn.lrange(rq_list, 0, -1) == [lost.id.encode()]

    wait_for(requeued, 30, "the lost job back on its queue")  # after the grace: it is lost
    assert _answers(conn) == {}


def test_failed_jobs_are_answered_during_the_grace(conn, cut_off):
    proxy, far = cut_off
    reaper = Reaper(far, CONFIG, owner="agent", grace=3600)
    reaper.tick()
    failed = _started(conn, "failed", "w-1")
    _fell_silent(conn, "w-1")
    _outage(proxy, reaper)
    pipe = conn.pipeline()
    failed.set_status("failed", pipeline=pipe)
    failed.failed_job_registry.add(failed, ttl=600, pipeline=pipe)
    pipe.execute()
    reaper.tick()
    assert _answers(conn) == {"failed": ["internal"]}  # RQ's verdict, not a heartbeat's
