"""A worker killed in the middle of a batch: every job of the batch is answered exactly once
(by the reaper), none is lost, none runs again after its answer."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import start_worker
from tests.faults.helpers import (
    assert_promise,
    collect,
    rq_key,
    runs,
    wait_for,
    wait_status,
    watch_duplicates,
    worker_events,
)
from tests.faults.test_workers import REAPED

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_worker_killed_mid_batch_every_job_answered_once_none_rerun(daemon):
    victim = start_worker(daemon, fault=True)
    daemon.start_agent()
    devs = [daemon.device(f"d{i}", session_expiry=3600) for i in range(3)]
    batch = [f"b-{i}" for i in range(1, 7)]
    owner = {rid: devs[i % 3] for i, rid in enumerate(batch)}
    try:
        # the worker is busy with a slow job while the batch's jobs queue up behind it
        devs[0].publish_envelope("tokenize", {"id": "b-0", "text": "__sleep:3__"})
        wait_status(daemon, "d0", "b-0", "started")
        owner["b-1"].publish_envelope("tokenize", {"id": "b-1", "text": "__stop__"})
        for rid in batch[1:]:
            owner[rid].publish_envelope("tokenize", {"id": rid, "text": f"text of {rid}"})
        for rid in batch:  # all stored before the slow job ends
            wait_for(lambda rid=rid: daemon.conn.exists(rq_key(owner[rid].device_id, rid)),
                     10, f"{rid} enqueued")
        # b-1 heads the next batch and stops its worker inside it, the others started with it
        for rid in batch:
            wait_status(daemon, owner[rid].device_id, rid, "started")
        victim.send_signal(signal.SIGKILL)
        got: dict[str, list[str]] = {}
        for dev in devs:
            mine = [rid for rid in batch if owner[rid] is dev] + (["b-0"] if dev is devs[0]
                                                                   else [])
            got.update(collect(dev, mine, timeout=REAPED, settle=0))
        answered = time.monotonic()
        start_worker(daemon)  # a new worker must not run any of the reaped jobs again
        after = devs[1].request("tokenize", text="life goes on", request_id="after-1")
        for dev in devs:
            watch_duplicates(dev, {rid: codes for rid, codes in got.items()
                                   if (owner.get(rid) or devs[0]) is dev}, since=answered)
    finally:
        for dev in devs:
            dev.close()
    assert_promise(got)
    assert got["b-0"] == ["ok"]
    assert {rid: got[rid] for rid in batch} == dict.fromkeys(batch, ["internal"])
    assert after.ok
    assert {rid: runs(daemon)[rid] for rid in batch} == dict.fromkeys(batch, 1)
    # they did run as one batch: every job_started line of theirs says so
    sizes = {doc["job_id"]: doc.get("batch") for doc in worker_events(daemon, "job_started")}
    assert {sizes[rid] for rid in batch} == {len(batch)}
