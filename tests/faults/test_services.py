"""Broker and Redis faults, partitions and hostile traffic: the promise still holds."""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.faults.conftest import QUEUE, start_worker
from tests.faults.helpers import (
    TcpProxy,
    assert_promise,
    collect,
    rq_key,
    runs,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _jobs(dev, prefix, n):
    ids = [f"{prefix}-{i}" for i in range(n)]
    for rid in ids:
        dev.publish_envelope("tokenize", {"id": rid, "text": f"job {rid}"})
    return ids


def _ran_once(daemon, ids) -> None:
    """Each job was started by a worker exactly once (an `ok` answer needs one run; more is a
    rerun, even one that crashed before it answered)."""
    counts = runs(daemon)
    assert {rid: counts[rid] for rid in ids} == dict.fromkeys(ids, 1)


def _running(daemon):
    start_worker(daemon)
    daemon.start_agent()
    return daemon.device("d", session_expiry=3600)


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "kill-9"])
def test_broker_outage_with_results_in_flight(daemon, crash):
    w = start_worker(daemon)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        w.send_signal(signal.SIGSTOP)
        ids = _jobs(dev, "b", 20)
        wait_for(lambda: all(daemon.conn.exists(rq_key("d", r)) for r in ids), 10, "stored")
        # Mosquitto writes its sessions every `autosave_interval` (1 s): a kill -9 loses what
        # changed since. Let the device's subscription reach the disk first.
        time.sleep(2.5)
        (daemon.broker.kill if crash else daemon.broker.stop)()
        w.send_signal(signal.SIGCONT)  # answers pile up in the outbox while the broker is away
        wait_for(lambda: daemon.conn.xlen("edge:outbox") >= len(ids), 30, "answers in outbox")
        daemon.broker.start()
        got = collect(dev, ids, timeout=60)
    finally:
        dev.close()
    # A reconnect may repeat an answer (devices dedupe by id); it may never lose one.
    assert_promise(got, once=False, allowed={"ok"})
    _ran_once(daemon, ids)


def test_redis_kill_9_keeps_acknowledged_jobs(daemon):
    w = start_worker(daemon)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        w.send_signal(signal.SIGSTOP)  # jobs pile up, acknowledged, in Redis
        ids = _jobs(dev, "r", 10)
        wait_for(lambda: all(daemon.conn.exists(rq_key("d", r)) for r in ids), 10, "stored")
        time.sleep(0.5)  # every PUBACK has gone out: appendfsync always wrote them first
        daemon.redis.kill()
        daemon.redis.start()
        w.send_signal(signal.SIGCONT)
        got = collect(dev, ids, timeout=90)
    finally:
        dev.close()
    assert_promise(got, allowed={"ok"})
    _ran_once(daemon, ids)


def test_redis_restart_mid_job_still_answers_ok(daemon):
    start_worker(daemon, fault=True)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        dev.publish_envelope("tokenize", {"id": "m-1", "text": "__sleep:3__"})
        wait_status(daemon, "d", "m-1", "started")
        daemon.redis.restart()
        got = collect(dev, ["m-1"], timeout=60)
    finally:
        dev.close()
    assert_promise(got, allowed={"ok"})
    _ran_once(daemon, ["m-1"])


def test_jobs_sent_while_redis_is_down_are_answered_when_it_returns(daemon):
    dev = _running(daemon)
    try:
        daemon.redis.kill()
        ids = _jobs(dev, "down", 5)  # the agent cannot store them: it does not acknowledge
        time.sleep(2.0)
        daemon.redis.start()
        got = collect(dev, ids, timeout=60)
    finally:
        dev.close()
    assert_promise(got, allowed={"ok"})
    _ran_once(daemon, ids)


def test_slow_redis_loses_nothing(daemon):
    proxy = TcpProxy(daemon.redis.port, delay=0.02)  # every chunk, each way, 20 ms late
    daemon.config.write_text(daemon.config.read_text().replace(
        daemon.redis.url, f"redis://127.0.0.1:{proxy.port}/0"))
    dev = _running(daemon)
    try:
        ids = _jobs(dev, "slow", 20)
        got = collect(dev, ids, timeout=120)
    finally:
        dev.close()
        proxy.close()
    assert_promise(got, allowed={"ok"})
    _ran_once(daemon, ids)


def test_partition_between_agent_and_broker(daemon):
    proxy = TcpProxy(daemon.broker.port)
    daemon.config.write_text(daemon.config.read_text().replace(
        f"port = {daemon.broker.port}", f"port = {proxy.port}"))
    dev = _running(daemon)
    try:
        before = _jobs(dev, "p", 10)
        proxy.pause()  # packets vanish, sockets stay up
        during = _jobs(dev, "pp", 10)  # the broker keeps them for the agent's session
        time.sleep(3.0)
        proxy.cut()  # then the link drops altogether
        time.sleep(3.0)
        proxy.heal()
        got = collect(dev, before + during, timeout=90)
    finally:
        dev.close()
        proxy.close()
    assert_promise(got, once=False, allowed={"ok"})
    _ran_once(daemon, before + during)


def test_duplicate_storm_runs_each_job_once(daemon):
    dev = _running(daemon)
    try:
        ids = [f"dup-{i}" for i in range(20)]
        storm = [rid for rid in ids for _ in range(100)]
        random.Random(8).shuffle(storm)
        for rid in storm:  # QoS 1 without waiting: as fast as paho sends
            dev.client.publish("edge/jobs/tokenize/d", f'{{"id":"{rid}","text":"{rid}"}}', qos=1)
        got = collect(dev, ids, timeout=90)
    finally:
        dev.close()
    assert_promise(got, allowed={"ok"})
    _ran_once(daemon, ids)


def test_deadline_passed_in_the_queue_is_answered_timeout_not_run(daemon):
    start_worker(daemon, fault=True)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        dev.publish_envelope("tokenize", {"id": "busy", "text": "__sleep:3__"})
        wait_status(daemon, "d", "busy", "started")
        dev.publish_envelope("tokenize", {"id": "late", "text": "too late",
                                          "deadline": time.time() + 1})
        got = collect(dev, ["busy", "late"], timeout=30)
    finally:
        dev.close()
    assert_promise(got)
    assert got == {"busy": ["ok"], "late": ["timeout"]}
    assert daemon.conn.llen(f"rq:queue:{QUEUE}") == 0
