"""edge.health and the per-device label policy, without a daemon."""

from __future__ import annotations

import threading
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from edge.health import run_checks, start
from edge.metrics import DeviceLabels
from edgectl.localservices import free_port
from tests.tooling.conftest import get


def test_a_check_that_raises_is_a_failed_check_with_its_reason():
    def broken() -> bool:
        raise ConnectionError("refused")

    ok, doc = run_checks({"good": lambda: True, "bad": broken})
    assert not ok
    assert doc["checks"] == {"good": True, "bad": False}
    assert doc["errors"] == {"bad": "ConnectionError: refused"}


def test_device_ids_past_the_limit_share_the_other_series():
    label = DeviceLabels(limit=2)
    assert [label(d) for d in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "other", "a",
                                                                   "other", "b"]


def test_a_device_named_other_does_not_take_a_slot():
    label = DeviceLabels(limit=1)
    assert label("other") == "other"
    assert label("x") == "x"


def test_endpoints_answer_by_their_checks():
    registry = CollectorRegistry()
    Counter("thing", "a thing", registry=registry).inc()
    state = {"live": True, "ready": False}
    port = free_port()
    server = start(port, "127.0.0.1", registry, live=lambda: state["live"],
                   ready={"x": lambda: state["ready"]})
    try:
        base = f"http://127.0.0.1:{port}"
        assert "thing_total 1.0" in get(base + "/metrics").body
        assert get(base + "/healthz").code == 200
        assert get(base + "/readyz").code == 503
        state.update(live=False, ready=True)
        assert get(base + "/healthz").code == 503
        assert get(base + "/readyz").code == 200
        req = urllib.request.Request(base + "/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    finally:
        server.shutdown()
        server.server_close()


def test_a_check_that_hangs_fails_after_the_timeout():
    release = threading.Event()
    try:
        ok, doc = run_checks({"stuck": release.wait, "fine": lambda: True}, timeout=0.2)
        assert not ok
        assert doc["checks"] == {"stuck": False, "fine": True}
        assert doc["errors"]["stuck"] == "no answer within 0.2 s"
    finally:
        release.set()
