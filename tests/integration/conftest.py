"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from edge.localservices import MosquittoServer


@pytest.fixture
def broker(tmp_path):
    """`broker(extra_conf)`: a private Mosquitto for one test (it may be restarted or wiped)."""
    started = []

    def start(extra_conf: str = "") -> MosquittoServer:
        server = MosquittoServer(tmp_path / f"mosquitto-{len(started)}", extra_conf=extra_conf)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()
