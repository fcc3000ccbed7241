"""Redis goes away for longer than the reaper's patience while a job runs and another waits.

The worker is fine all along: it keeps running its job and beats again as soon as Redis is
back. Its last beat before the outage is older than `REAP_AFTER` when Redis returns, so a
reaper that judged ages right away would answer the running job `internal` and the waiting one
`model_unavailable`. With the real daemon (agent, worker, Redis, Mosquitto as processes), every
job must get exactly one answer, and it must be `ok`.
"""

from __future__ import annotations

import time

import pytest

from edge import constants as C
from edgectl.localdaemon import Daemon
from edge.reaper import REAP_AFTER
from tests.faults.conftest import start_worker
from tests.faults.helpers import (DUPLICATE_WATCH, assert_promise, collect, rq_key, runs,
                                  wait_for, wait_status)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE = REAP_AFTER + 5.0  # s Redis is down: longer than the reaper waits for a silent worker
JOB_SECONDS = OUTAGE + 10.0  # the running job outlives the outage
# After the last answer, watch for a late second one for as long as the reaper could still
# answer: its grace after the outage (REAP_AFTER + one beat) and a pass, plus the margin.
SETTLE = DUPLICATE_WATCH + C.HEARTBEAT_INTERVAL


@pytest.fixture
def daemon(tmp_path, tokenizer_bundles, keyring_file):
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file)
    try:
        yield d
    finally:
        d.stop()


def test_a_long_redis_outage_reaps_no_job_of_a_live_worker(daemon):
    start_worker(daemon, fault=True)  # a real worker whose `__sleep:N__` jobs take N s
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    ids = ["running", "waiting"]
    try:
        dev.publish_envelope("tokenize", {"id": "running", "text": f"__sleep:{JOB_SECONDS}__"})
        wait_status(daemon, "d", "running", "started")
        dev.publish_envelope("tokenize", {"id": "waiting", "text": "behind the long one"})
        wait_for(lambda: daemon.conn.exists(rq_key("d", "waiting")), 10, "the second job stored")
        daemon.redis.stop()  # a clean stop: everything acknowledged is on disk
        time.sleep(OUTAGE)
        daemon.redis.start()
        got = collect(dev, ids, timeout=JOB_SECONDS + 60, settle=SETTLE)
    finally:
        dev.close()
    assert_promise(got, allowed={"ok"})
    counts = runs(daemon)
    assert {rid: counts[rid] for rid in ids} == dict.fromkeys(ids, 1)
    assert daemon.agent.poll() is None, "the agent died"
