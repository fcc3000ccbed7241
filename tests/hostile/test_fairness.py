"""One device's flood against the real daemon: per-device quotas, round-robin across devices
within a task, and no task starving another on the same worker."""

from __future__ import annotations

import signal
import statistics
import threading
import time

import pytest
from rq.job import Job as RQJob

from edge import constants as C
from edge.jobs import job_key
from edgectl.localdaemon import Daemon
from tests.hostile.probe import answers, code

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _started(daemon: Daemon, device_id: str, task: str, rid: str) -> str:
    """When RQ started the job (RQ writes it before the job runs)."""
    raw = daemon.conn.hget(RQJob.key_for(job_key(device_id, task, rid)), "started_at")
    assert raw, f"{device_id}/{rid} never started"
    return raw.decode()


def _wait_stored(daemon: Daemon, task: str, device_id: str, n: int, timeout: float = 60) -> None:
    key = C.QUOTA_KEY.format(task=task, device_id=device_id)
    deadline = time.monotonic() + timeout
    while daemon.conn.zcard(key) < n:
        assert time.monotonic() < deadline, f"only {daemon.conn.zcard(key)} of {n} stored"
        time.sleep(0.05)


@pytest.fixture
def daemon(tmp_path, tokenizer_bundles, keyring_file):
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "queue_limit": 5000,
                                   "device_limit": 2000},
                      "detokenize": {"devices": ["CPU"], "queue_limit": 5000}})
    d.start()
    yield d
    d.stop()


def test_a_device_behind_a_1000_job_backlog_of_another_is_served_next(daemon):
    worker = daemon.workers[0]
    flood_ids = [f"f-{i}" for i in range(1000)]
    with daemon.device("flooder") as flooder, daemon.device("quiet") as quiet:
        worker.send_signal(signal.SIGSTOP)
        try:
            for rid in flood_ids:
                flooder.publish_envelope("tokenize", {"id": rid, "text": rid}, qos=0)
            _wait_stored(daemon, "tokenize", "flooder", len(flood_ids))
            quiet.publish_envelope("tokenize", {"id": "q-1", "text": "my turn"})
            _wait_stored(daemon, "tokenize", "quiet", 1)
        finally:
            worker.send_signal(signal.SIGCONT)
        got = answers(quiet, ["q-1"], timeout=60)
        flood = answers(flooder, flood_ids, timeout=120, settle=0.5)
    assert [code(b) for b in got["q-1"]] == ["ok"]
    assert all([code(b) for b in bodies] == ["ok"] for bodies in flood.values())
    mine = _started(daemon, "quiet", "tokenize", "q-1")
    ahead = sum(_started(daemon, "flooder", "tokenize", rid) < mine for rid in flood_ids)
    # the one the stopped worker had popped, those on RQ's list when it resumed, and one turn
    # of the flooding device (round robin)
    print(f"flood jobs started before the quiet device's job: {ahead} of {len(flood_ids)}")
    assert ahead <= 1 + C.FEED_DEPTH + 1


def test_a_flood_of_1000_jobs_leaves_another_device_served(tmp_path, tokenizer_bundles,
                                                           keyring_file):
    """One device publishes 1,000 jobs as fast as it can while another sends one a second:
    every job of the second is `ok` (never `busy`: it is under its own quota). Its latency,
    idle and under the flood, is printed (tests do not time; README has the figures)."""
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "queue_limit": 1000},
                      "detokenize": {"devices": ["CPU"]}})
    d.start()

    def latencies(dev, prefix: str, n: int) -> list[float]:
        out = []
        for i in range(n):
            t = time.perf_counter()
            reply = dev.request("tokenize", text="hello", request_id=f"{prefix}-{i}", timeout=30)
            assert reply.ok, reply.body
            out.append(reply.received - t)
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t)))
        return out

    try:
        with d.device("flooder") as flooder, d.device("quiet") as quiet:
            idle = latencies(quiet, "idle", 5)
            flood_ids = [f"x-{i}" for i in range(1000)]

            def flood() -> None:
                for rid in flood_ids:
                    flooder.publish_envelope("tokenize", {"id": rid, "text": "flood " * 20})

            thread = threading.Thread(target=flood, daemon=True)
            thread.start()
            loaded = latencies(quiet, "load", 8)
            thread.join(60)
            outcomes = answers(flooder, flood_ids, timeout=60, settle=0.5)
    finally:
        d.stop()
    codes = [code(b) for bodies in outcomes.values() for b in bodies]
    assert len(codes) == len(flood_ids)  # each flood job answered once
    assert set(codes) <= {"ok", "busy"} and codes.count("busy") > 0  # its quota held
    ratio = statistics.median(loaded) / statistics.median(idle)
    print(f"quiet device p50: idle {statistics.median(idle) * 1000:.1f} ms, during a 1,000-job "
          f"flood {statistics.median(loaded) * 1000:.1f} ms ({ratio:.2f}x); flood: "
          f"{codes.count('ok')} ok, {codes.count('busy')} busy")


def test_a_device_at_its_quota_is_busy_and_another_is_not(tmp_path, tokenizer_bundles,
                                                           keyring_file):
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "queue_limit": 100, "device_limit": 4},
                      "detokenize": {"devices": ["CPU"]}})
    d.start()
    try:
        worker = d.workers[0]
        with d.device("greedy") as greedy, d.device("modest") as modest:
            worker.send_signal(signal.SIGSTOP)
            try:
                ids = [f"g-{i}" for i in range(6)]
                for rid in ids:
                    greedy.publish_envelope("tokenize", {"id": rid, "text": rid})
                busy = answers(greedy, ids[4:], timeout=20, settle=0.2)
                modest.publish_envelope("tokenize", {"id": "m-1", "text": "hi"})
                _wait_stored(d, "tokenize", "modest", 1)
            finally:
                worker.send_signal(signal.SIGCONT)
            first = answers(greedy, ids[:4], timeout=30)
            other = answers(modest, ["m-1"], timeout=30)
            # answered jobs free the quota
            again = greedy.request("tokenize", text="again", request_id="g-again", timeout=20)
    finally:
        d.stop()
    for bodies in busy.values():
        assert [code(b) for b in bodies] == ["busy"]
        message = bodies[0]["error"]["message"]
        assert "greedy" in message and "tasks.tokenize.device_limit = 4" in message
    assert all([code(b) for b in bodies] == ["ok"] for bodies in first.values())
    assert [code(b) for b in other["m-1"]] == ["ok"]
    assert again.ok


def test_a_tokenize_flood_does_not_starve_detokenize_on_the_same_worker(daemon):
    worker = daemon.workers[0]
    ids = [f"t-{i}" for i in range(60)]
    with daemon.device("chatty") as chatty, daemon.device("other") as other:
        worker.send_signal(signal.SIGSTOP)
        try:
            for rid in ids:
                chatty.publish_envelope("tokenize", {"id": rid, "text": rid}, qos=0)
            _wait_stored(daemon, "tokenize", "chatty", len(ids))
            # many devices' tokenize jobs, so that fairness within the task does not help
            for i in range(20):
                with daemon.device(f"more-{i}") as more:
                    more.publish_envelope("tokenize", {"id": "m", "text": "m"})
            other.publish_envelope("detokenize", {"id": "d-1", "ids": [101, 102]})
            _wait_stored(daemon, "detokenize", "other", 1)
        finally:
            worker.send_signal(signal.SIGCONT)
        got = answers(other, ["d-1"], timeout=60)
        answers(chatty, ids, timeout=60, settle=0.2)
    assert [code(b) for b in got["d-1"]] == ["ok"]
    mine = _started(daemon, "other", "detokenize", "d-1")
    ahead = sum(_started(daemon, "chatty", "tokenize", rid) < mine for rid in ids)
    ahead += sum(_started(daemon, f"more-{i}", "tokenize", "m") < mine for i in range(20))
    print(f"tokenize jobs started before the detokenize job: {ahead} of {len(ids) + 20}")
    assert ahead <= C.PRIORITY_BURST + C.FEED_DEPTH
