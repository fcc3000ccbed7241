"""Fixtures shared by the integration tests."""

from __future__ import annotations

import queue

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgectl.localservices import MosquittoServer


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


@pytest.fixture
def spy():
    """`spy(port, topic)`: a plain paho subscriber; returns the queue of (topic, payload)."""
    clients = []

    def watch(port: int, topic: str) -> queue.Queue:
        got: queue.Queue = queue.Queue()
        subscribed = queue.Queue()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"spy-{len(clients)}",
                        protocol=paho.MQTTv5)
        c.on_message = lambda cl, u, msg: got.put((msg.topic, bytes(msg.payload)))
        c.on_subscribe = lambda *a: subscribed.put(True)
        c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append(c)
        subscribed.get(timeout=10)
        return got

    yield watch
    for c in clients:
        c.disconnect()
        c.loop_stop()
