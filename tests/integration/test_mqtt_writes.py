"""Publishing threads write their own packets (`edge.mqtt.Client`), beside paho's network thread.

Big packets leave in parts when the socket buffer is full: the bytes of two packets must never
interleave, or the broker drops the connection.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import threading
import time

import pytest

from edge.config import MqttConfig
from edge.mqtt import MqttClient
from edge.protocol import Outgoing

pytestmark = pytest.mark.integration


def test_big_packets_from_three_threads_arrive_whole(broker, spy):
    server = broker()
    got = spy(server.port, "edge/results/#")
    client = MqttClient(MqttConfig(port=server.port, session_expiry=0), "writer-test")
    client.start()
    assert client.wait_connected(10)
    # a small send buffer: every packet leaves in many parts
    client.client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
    sent: dict[str, str] = {}
    lock = threading.Lock()

    def publish(thread: int) -> None:
        for i in range(4):
            payload = os.urandom(256 << 10)
            topic = f"edge/results/dev/t{thread}-{i}"
            with lock:
                sent[topic] = hashlib.sha256(payload).hexdigest()
            msg = Outgoing(topic, payload, 1)
            assert client.publish_many([msg], timeout=30) == [True]

    try:
        threads = [threading.Thread(target=publish, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        received: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(received) < len(sent) and time.monotonic() < deadline:
            try:
                topic, payload = got.get(timeout=1)
            except queue.Empty:
                continue
            received[topic] = hashlib.sha256(payload).hexdigest()
        assert received == sent
        assert client.is_connected()  # never dropped for a malformed packet
    finally:
        client.stop()


def test_tls_and_other_transports_are_left_to_pahos_thread():
    import ssl

    from edge.mqtt import writes_directly

    plain = socket.socket()
    tls = ssl.create_default_context().wrap_socket(socket.socket(), server_hostname="gateway",
                                                   do_handshake_on_connect=False)
    try:
        assert writes_directly(plain)
        assert not writes_directly(tls)
        assert not writes_directly(None) and not writes_directly(object())  # e.g. a websocket
    finally:
        plain.close()
        tls.close()
