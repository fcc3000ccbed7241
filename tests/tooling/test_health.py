"""/healthz, /readyz and the process and per-device metrics, against a live daemon."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.tooling.conftest import get, start_daemon

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def samples(port: int) -> dict[tuple[str, tuple], float]:
    text = get(f"http://127.0.0.1:{port}/metrics").body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(probe, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_both_daemons_are_live_and_ready(live):
    _, agent, worker = live
    for port in (agent, worker):
        h = get(f"http://127.0.0.1:{port}/healthz")
        assert (h.code, h.body) == (200, "ok\n")
    a = get(f"http://127.0.0.1:{agent}/readyz")
    assert a.code == 200, a.body
    assert json.loads(a.body)["checks"] == {"redis": True, "mqtt": True}
    w = get(f"http://127.0.0.1:{worker}/readyz")
    assert w.code == 200, w.body
    assert json.loads(w.body)["checks"] == {"models": True, "redis": True}


def test_unknown_path_is_404(live):
    _, agent, _ = live
    assert get(f"http://127.0.0.1:{agent}/nope").code == 404


def test_process_metrics_are_exported_by_both_daemons(live):
    d, agent, worker = live
    for port, pid in ((agent, d.agent.pid), (worker, d.workers[0].pid)):
        s = samples(port)
        rss = s[("process_resident_memory_bytes", ())]
        with open(f"/proc/{pid}/status") as f:
            vmrss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
        assert 0.5 * vmrss < rss < 2 * vmrss  # the daemon's own process, not the test's
        assert s[("process_open_fds", ())] > 3
        assert ("process_cpu_seconds_total", ()) in s


def test_jobs_are_counted_per_device(live):
    d, agent, _ = live
    with d.device("dev-count") as dev:
        for i in range(3):
            assert dev.request("tokenize", text="hi", request_id=f"c-{i}",
                               params={"model": "all-minilm-l6-v2"}).ok
        bad = dev.request("nosuchtask", text="hi", request_id="c-bad")
    assert not bad.ok
    key = ("edge_device_jobs_total",
           (("device_id", "dev-count"), ("outcome", "submitted"), ("task", "tokenize")))
    assert samples(agent)[key] == 3
    rejected = [k for k, v in samples(agent).items() if k[0] == "edge_device_jobs_total"
                and ("device_id", "dev-count") in k[1] and ("outcome", "rejected") in k[1]]
    assert rejected


def test_agent_is_not_ready_without_redis_and_ready_again_after(tmp_path, tokenizer_bundles,
                                                                keyring_file):
    d, port = start_daemon(tmp_path, tokenizer_bundles, keyring_file)
    try:
        d.redis.stop()
        r = wait_for(lambda: (x := get(f"http://127.0.0.1:{port}/readyz")).code == 503 and x)
        assert r, "agent stayed ready with Redis down"
        doc = json.loads(r.body)
        assert doc["checks"]["redis"] is False and doc["checks"]["mqtt"] is True
        assert doc["errors"]["redis"]
        w = get(f"http://127.0.0.1:{port + 1}/readyz")
        assert w.code == 503 and json.loads(w.body)["checks"]["redis"] is False
        # not ready is not dead: liveness stays up, nobody should restart it for Redis
        assert get(f"http://127.0.0.1:{port}/healthz").code == 200
        d.redis.start()
        assert wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz").code == 200)
        d.broker.stop()
        r = wait_for(lambda: (x := get(f"http://127.0.0.1:{port}/readyz")).code == 503 and x)
        assert r and json.loads(r.body)["checks"]["mqtt"] is False
    finally:
        d.stop()
