"""A Redis at its maxmemory against the real daemon: new jobs are answered `busy`, the jobs
already accepted are still run and answered, and status says why."""

from __future__ import annotations

import signal

import pytest

from edge import config as edge_config
from edgectl.localdaemon import Daemon
from edge.status import node_status
from tests.hostile.probe import answers, code

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_full_redis_answers_busy_and_keeps_the_accepted_jobs(tmp_path, tokenizer_bundles,
                                                               keyring_file):
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "queue_limit": 1000,
                                   "device_limit": 1000, "max_bytes": 262144},
                      "detokenize": {"devices": ["CPU"]}})
    d.start()
    try:
        worker = d.workers[0]
        used = int(d.conn.info("memory")["used_memory"])
        d.conn.config_set("maxmemory", used + 4 * 1024 * 1024)
        text = "filler " * 14_000  # ~100 kB a job
        with d.device("filler") as dev:
            worker.send_signal(signal.SIGSTOP)
            try:
                sent, first_busy = [], None
                for i in range(100):
                    rid = f"fill-{i}"
                    dev.publish_envelope("tokenize", {"id": rid, "text": text})
                    sent.append(rid)
                    got = answers(dev, [rid], timeout=0.3, settle=0)[rid]
                    if got:
                        first_busy = got[0]
                        break
                status = node_status(d.conn, edge_config.load(d.config))
            finally:
                worker.send_signal(signal.SIGCONT)
            accepted = sent[:-1]
            done = answers(dev, accepted, timeout=60)
            d.conn.config_set("maxmemory", 0)
            after = dev.request("tokenize", text="room again", request_id="after-1", timeout=20)
    finally:
        d.stop()
    assert first_busy is not None, "Redis never filled up"
    assert code(first_busy) == "busy"
    assert "maxmemory" in first_busy["error"]["message"]
    assert len(accepted) >= 5
    assert all([code(b) for b in bodies] == ["ok"] for bodies in done.values()), done
    assert status["redis"]["full"] is True
    assert after.ok, after.body
