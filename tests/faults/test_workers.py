"""Worker faults: every acknowledged job still ends in exactly one answer, run at most once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from edge.localdaemon import ROOT, write_config
from edge.reaper import REAP_AFTER
from tests.faults.conftest import QUEUE, start_worker
from tests.faults.helpers import (assert_promise, assert_ran_at_most_once, collect, rq_key,
                                  runs, wait_for, wait_status)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REAPED = REAP_AFTER + 15  # s: stale heartbeat + a reaper pass + relay, with slack for 2 cores


def _publish(dev, rid, text):
    dev.publish_envelope("tokenize", {"id": rid, "text": text})


def test_worker_killed_mid_job_is_answered_internal_once(daemon):
    victim = start_worker(daemon, fault=True)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        _publish(dev, "k-1", "__stop__")  # the worker stops itself inside the job
        wait_status(daemon, "d", "k-1", "started")
        victim.send_signal(signal.SIGKILL)
        got = collect(dev, ["k-1"], timeout=REAPED)
        start_worker(daemon)
        after = dev.request("tokenize", text="life goes on", request_id="k-2")
    finally:
        dev.close()
    assert_promise(got)
    assert got["k-1"] == ["internal"]
    assert after.ok


def test_segfault_in_a_job_is_answered_internal_once(daemon):
    victim = start_worker(daemon, fault=True)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        _publish(dev, "s-1", "__segv__")
        victim.wait(30)
        got = collect(dev, ["s-1"], timeout=REAPED)
    finally:
        dev.close()
    assert victim.returncode == -signal.SIGSEGV
    assert_promise(got)
    assert got["s-1"] == ["internal"]


def test_sigterm_during_a_job_finishes_it_and_answers_ok(daemon):
    w = start_worker(daemon, fault=True)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        _publish(dev, "w-1", "__sleep:3__")
        wait_status(daemon, "d", "w-1", "started")
        w.send_signal(signal.SIGTERM)  # warm stop: RQ finishes the job first
        got = collect(dev, ["w-1"], timeout=30)
        assert w.wait(30) == 0
    finally:
        dev.close()
    assert_promise(got)
    assert got["w-1"] == ["ok"]


def test_two_sigterms_cold_stop_and_the_job_is_answered_internal(daemon):
    w = start_worker(daemon, fault=True)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        _publish(dev, "c-1", "__sleep:20__")
        wait_status(daemon, "d", "c-1", "started")
        w.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # RQ ignores a second signal within 1 s (a pool's duplicate)
        w.send_signal(signal.SIGTERM)  # cold stop: the job is abandoned
        w.wait(30)
        got = collect(dev, ["c-1"], timeout=REAPED)
    finally:
        dev.close()
    assert_promise(got)
    assert got["c-1"] == ["internal"]


def test_hung_worker_is_routed_around_and_its_job_answered_once(daemon):
    hung = start_worker(daemon, fault=True)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        _publish(dev, "h-1", "__stop__")
        wait_status(daemon, "d", "h-1", "started")  # then it hangs (SIGSTOP)
        start_worker(daemon)
        others = [f"h-ok-{i}" for i in range(5)]
        for rid in others:
            _publish(dev, rid, rid)
        served = collect(dev, others, timeout=30, settle=0)
        hung_answer = collect(dev, ["h-1"], timeout=REAPED, settle=0)
        hung.send_signal(signal.SIGCONT)  # it wakes up, finishes the job, and must not answer
        wait_for(lambda: runs(daemon)["h-1"] == 1, 30, "the woken worker to finish h-1")
        late = collect(dev, ["h-1"], timeout=0, settle=2)
        hung.send_signal(signal.SIGKILL)
    finally:
        dev.close()
    assert_promise(served)
    assert all(codes == ["ok"] for codes in served.values())
    assert hung_answer["h-1"] == ["internal"]
    assert late["h-1"] == [], "the woken worker answered a job the reaper had answered"
    assert_ran_at_most_once(daemon, ["h-1", *others])


def test_job_popped_by_a_worker_that_died_before_starting_it_is_run(daemon):
    w = start_worker(daemon)
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    try:
        w.send_signal(signal.SIGSTOP)  # idle in BLPOP: Redis hands it the next job anyway
        _publish(dev, "l-1", "lost in a pop")
        wait_for(lambda: daemon.conn.exists(rq_key("d", "l-1")), 10, "enqueued")
        wait_for(lambda: not daemon.conn.llen(f"rq:queue:{QUEUE}"), 10, "popped")
        w.send_signal(signal.SIGKILL)
        start_worker(daemon)
        got = collect(dev, ["l-1"], timeout=REAPED + 10)
    finally:
        dev.close()
    assert_promise(got)
    assert got["l-1"] == ["ok"]
    assert_ran_at_most_once(daemon, ["l-1"])


def test_crash_looping_worker_means_model_unavailable_not_waiting_forever(daemon, tmp_path,
                                                                          keyring_file):
    w = start_worker(daemon)
    daemon.start_agent()
    empty = tmp_path / "no-bundles"
    empty.mkdir()
    broken = write_config(tmp_path / "broken.toml", node="test-gw", mqtt_port=daemon.broker.port,
                          redis_url=daemon.redis.url, bundle_dir=empty,
                          keyring_file=keyring_file, tasks=daemon.tasks)
    dev = daemon.device("d", session_expiry=3600)
    try:
        w.send_signal(signal.SIGSTOP)
        queued = [f"q-{i}" for i in range(3)]
        for rid in queued:
            _publish(dev, rid, rid)
        wait_for(lambda: all(daemon.conn.exists(rq_key("d", r)) for r in queued), 10, "queued")
        w.send_signal(signal.SIGKILL)
        for _ in range(3):  # systemd restarts it; it dies at start every time
            rc = subprocess.run([sys.executable, "-m", "workers.worker", "--device", "CPU",
                                 "--config", str(broken)], cwd=ROOT, capture_output=True,
                                timeout=120).returncode
            assert rc != 0
        got = collect(dev, queued, timeout=REAPED + 10)
        late = dev.request("tokenize", text="anyone there?", request_id="q-late", timeout=40)
    finally:
        dev.close()
    assert_promise(got)
    assert all(codes == ["model_unavailable"] for codes in got.values()), got
    assert late.body["error"]["code"] == "model_unavailable"
