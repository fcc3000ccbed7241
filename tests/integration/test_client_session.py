"""DeviceClient against a real Mosquitto: subscriptions survive a broker that lost the session,
and a job the broker refuses fails at once instead of being sent again forever."""

from __future__ import annotations

import json
import queue
import subprocess
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from edge import constants as C
from edgectl.client import PACKET_TOO_LARGE, DeviceClient, PublishRefused
from edge.mqtt import packet_size as publish_packet_size
from tests.faults.helpers import TcpProxy

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87


def drain(q: queue.Queue, settle: float = 1.0) -> list:
    """Everything `q` holds once nothing has arrived for `settle` seconds."""
    out = []
    while True:
        try:
            out.append(q.get(timeout=settle))
        except queue.Empty:
            return out


def publish_once(port: int, topic: str, payload: str, props: PahoProperties | None) -> None:
    """One QoS 1 message from a plain paho client, as the gateway's agent would send it."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="gateway", protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def answer_until_received(port: int, dev: DeviceClient, topic: str, rid: str,
                          props: PahoProperties | None = None, timeout: float = 20.0):
    """Publish an answer to `topic` again each second until `dev` has it (the client may not
    have reconnected yet, or its SUBSCRIBE may still be on the way)."""
    body = json.dumps({"id": rid, "task": "tokenize", "status": "ok", "result": {"ids": [1]}})
    deadline = time.monotonic() + timeout
    while True:
        publish_once(port, topic, body, props)
        try:
            return dev.wait(rid, timeout=1.0)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


@pytest.mark.parametrize("session_expiry, lose_state", [
    pytest.param(3600, True, id="persistent-session-broker-state-lost"),
    pytest.param(0, False, id="clean-session-broker-restart"),
])
def test_subscriptions_come_back_after_the_broker_lost_the_session(
        broker, session_expiry, lose_state):
    server = broker()
    dev = DeviceClient("127.0.0.1", server.port, device_id="dev-resub",
                       session_expiry=session_expiry).connect()
    try:
        dev.subscribe("replies/dev-resub")
        if lose_state:  # a crash before autosave: the broker comes back knowing no session
            server.kill()
            (server.workdir / "mosquitto.db").unlink(missing_ok=True)
            server.start()
        else:
            server.restart()

        result = C.RESULT_TOPIC.format(device_id="dev-resub", request_id="after-restart")
        reply = answer_until_received(server.port, dev, result, "after-restart")
        assert reply.ok and reply.topic == result

        props = PahoProperties(PacketTypes.PUBLISH)
        props.CorrelationData = b"on-response-topic"
        reply = answer_until_received(server.port, dev, "replies/dev-resub", "on-response-topic",
                                      props)
        assert reply.ok and reply.topic == "replies/dev-resub"
    finally:
        dev.close()


def test_job_past_the_broker_packet_limit_is_refused_at_once(broker, spy):
    server = broker("max_packet_size 2048\n")
    jobs = spy(server.port, "edge/jobs/#")
    with DeviceClient("127.0.0.1", server.port, device_id="dev-big") as dev:
        topic = C.JOB_TOPIC.format(task="tokenize", device_id="dev-big")

        def envelope(rid: str, packet_size: int) -> dict:
            """An envelope whose PUBLISH packet is exactly `packet_size` bytes."""
            def size(text: str) -> int:
                return publish_packet_size(
                    topic, json.dumps({"id": rid, "text": text}).encode(), 1, None)

            text = "x" * (packet_size - size(""))
            text = text[:len(text) - (size(text) - packet_size)]  # the length field grew
            assert size(text) == packet_size
            return {"id": rid, "text": text}

        dev.publish_envelope("tokenize", envelope("at-limit", 2048))
        with pytest.raises(PublishRefused, match="at most 2048") as refused:
            dev.publish_envelope("tokenize", envelope("one-byte-over", 2049))
        assert refused.value.reason_code == PACKET_TOO_LARGE
        with pytest.raises(PublishRefused, match="'too-big'.*at most 2048"):
            dev.request("tokenize", text="y" * 100_000, request_id="too-big", timeout=30)
        assert dev.client.is_connected()

        dev.publish_envelope("tokenize", {"id": "small", "text": "fits"})
        seen = [json.loads(payload)["id"] for _, payload in drain(jobs)]
    # The refused jobs never reached the broker, so nothing is sent again on a reconnect.
    assert seen == ["at-limit", "small"]


def test_job_the_broker_refuses_fails_its_request_at_once(broker, spy, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic write edge/jobs/tokenize/dev-acl\ntopic read edge/jobs/#\n"
                   "topic read edge/results/#\ntopic read edge/progress/#\n")
    server = broker(f"acl_file {acl}\n")
    jobs = spy(server.port, "edge/jobs/#")
    with DeviceClient("127.0.0.1", server.port, device_id="dev-acl") as dev:
        with pytest.raises(PublishRefused, match="'denied'.*Not authorized") as refused:
            dev.request("lcm", text="a red bicycle", request_id="denied", timeout=30)
        assert refused.value.reason_code == NOT_AUTHORIZED
        assert dev.client.is_connected()

        dev.publish_envelope("tokenize", {"id": "allowed", "text": "fine"})
        seen = [json.loads(payload)["id"] for _, payload in drain(jobs)]
    assert seen == ["allowed"]


def test_a_refusal_after_the_publish_returned_fails_the_wait(broker, monkeypatch, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic read edge/results/#\ntopic read edge/progress/#\n")
    server = broker(f"acl_file {acl}\n")
    proxy = TcpProxy(server.port)
    monkeypatch.setattr(C, "PUBACK_TIMEOUT", 0.5)
    try:
        with DeviceClient("127.0.0.1", proxy.port, device_id="dev-late") as dev:
            proxy.pause()  # the job and its PUBACK wait in the proxy past the publish's wait
            dev.publish_envelope("tokenize", {"id": "late", "text": "held"})
            proxy.resume()
            with pytest.raises(PublishRefused, match="'late'.*Not authorized"):
                dev.wait("late", timeout=30)
    finally:
        proxy.close()


def test_refused_connection_raises_at_once(broker, tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev-pw", "right"], check=True)
    server = broker(f"allow_anonymous false\npassword_file {passwd}\n")
    dev = DeviceClient("127.0.0.1", server.port, device_id="dev-pw", username="dev-pw",
                       password="wrong")
    try:
        with pytest.raises(ConnectionRefusedError, match="Not authorized"):
            dev.connect(timeout=30)
    finally:
        dev.close()
    with DeviceClient("127.0.0.1", server.port, device_id="dev-pw", username="dev-pw",
                      password="right") as dev:
        assert dev.client.is_connected()
