"""Worker faults: every acknowledged job still ends in exactly one answer, run at most once."""

from __future__ import annotations

import signal
import time

import pytest

from edge import constants as C
from edge.reaper import REAP_AFTER
from tests.faults.conftest import QUEUE, spawn_worker, start_worker, worker_name
from tests.faults.fault_worker import CRASH_AFTER_BEAT
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
        got = collect(dev, ["k-1"], timeout=REAPED, settle=0)
        answered = time.monotonic()
        start_worker(daemon)  # a new worker must not run the reaped job again
        after = dev.request("tokenize", text="life goes on", request_id="k-2")
        watch_duplicates(dev, got, since=answered)
    finally:
        dev.close()
    assert_promise(got)
    assert got["k-1"] == ["internal"]
    assert after.ok
    assert runs(daemon)["k-1"] == 1


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
    assert runs(daemon)["s-1"] == 1


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
    assert runs(daemon)["w-1"] == 1


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
    assert runs(daemon)["c-1"] == 1


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
        wait_for(lambda: any(doc.get("job_id") == "h-1" for doc in
                             worker_events(daemon, "job_already_answered")),
                 30, "the woken worker to finish h-1 and find it answered")
        woken = time.monotonic()
        got = {**served, **hung_answer}
        watch_duplicates(dev, got, since=woken)
        hung.send_signal(signal.SIGKILL)
    finally:
        dev.close()
    assert hung_answer["h-1"], "the reaper never answered the hung job"
    assert got["h-1"] == ["internal"], "the woken worker answered a job the reaper had answered"
    assert_promise(got)
    assert all(got[rid] == ["ok"] for rid in others)
    counts = runs(daemon)
    assert {rid: counts[rid] for rid in ["h-1", *others]} == dict.fromkeys(["h-1", *others], 1)


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
    assert runs(daemon)["l-1"] == 1


RESTARTS = 5  # StartLimitBurst of systemd/edge-worker@.service: then systemd gives up
RESTART_PAUSE = 1.0  # s; the unit's RestartSec=5, shortened (the beats come sooner, not later)


def test_worker_crash_looping_at_start_answers_waiting_jobs_once_and_the_agent_lives(daemon):
    daemon.start_agent()
    dev = daemon.device("d", session_expiry=3600)
    queued = [f"q-{i}" for i in range(3)]
    alive = C.ALIVE_KEY.format(queue=QUEUE)
    try:
        crashed = []
        for n in range(RESTARTS):  # as systemd's Restart=on-failure would
            proc = spawn_worker(daemon, True, CRASH_AFTER_BEAT)
            crashed.append((proc.wait(120), daemon.conn.zscore(alive, worker_name(proc))))
            if n == 0:  # it beat, so the agent takes jobs for it; they wait while it loops
                for rid in queued:
                    _publish(dev, rid, rid)
                wait_for(lambda: all(daemon.conn.exists(rq_key("d", r)) for r in queued), 10,
                         "queued")
            time.sleep(RESTART_PAUSE)
        got = collect(dev, queued, timeout=REAPED, settle=0)
        answered = time.monotonic()
        late = dev.request("tokenize", text="anyone there?", request_id="q-late", timeout=60)
        start_worker(daemon)  # the fault is fixed: the gateway serves again
        healed = dev.request("tokenize", text="back again", request_id="q-healed", timeout=30)
        watch_duplicates(dev, got, since=answered)
    finally:
        dev.close()
    # every start reached Redis (its beat is there) and then died
    assert all(rc == 1 and beat is not None for rc, beat in crashed), crashed
    assert_promise(got)
    assert all(codes == ["model_unavailable"] for codes in got.values()), got
    assert late.body["error"]["code"] == "model_unavailable"
    assert healed.ok, healed.body
    assert daemon.agent.poll() is None, "the agent died"
    counts = runs(daemon)
    assert not any(counts[rid] for rid in queued), "a job answered model_unavailable ran"
