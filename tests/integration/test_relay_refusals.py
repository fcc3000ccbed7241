"""The relay against a real Mosquitto and Redis: a PUBACK that refuses an answer is not a
delivery, and an answer past the broker's packet limit is never sent.

A scripted broker (a few lines of MQTT 5 over a socket) stands in for Mosquitto where Mosquitto
cannot be made to answer a given reason code (quota exceeded, payload format invalid).
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time

import pytest
import redis

from edge import constants as C
from edge import mqtt as mqtt_module
from edge import relay as relay_module
from edge.config import MqttConfig
from edge.jobs import Answer, Route, result_body
from edge.metrics import REGISTRY
from edge.mqtt import (
    NOT_AUTHORIZED,
    PAYLOAD_FORMAT_INVALID,
    QUOTA_EXCEEDED,
    MqttClient,
    Refused,
    publish_packet_size,
)
from edge.outbox import Outbox
from edge.protocol import Outgoing, render
from edge.relay import OutboxRelay
from tests.integration.fakes import FakePublisher

pytestmark = pytest.mark.integration


# -- helpers


@pytest.fixture
def device(spy):
    """`device(port)`: a subscriber to every answer; returns the queue of (topic, payload)."""
    return lambda port: spy(port, "edge/results/#")


@pytest.fixture
def agent():
    """`agent(port)`: the agent's MQTT client, connected."""
    clients = []

    def connect(port: int) -> MqttClient:
        client = MqttClient(MqttConfig(port=port, session_expiry=0),
                            f"agent-{len(clients)}-{time.monotonic_ns()}")
        client.start()
        clients.append(client)
        assert client.wait_connected(10)
        return client

    yield connect
    for client in clients:
        client.stop()


class Recorder:
    """Stands in for the relay's logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **kw: self.lines.append((level, event, kw))


@pytest.fixture
def relay_log(monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(relay_module, "log", recorder)
    return recorder


@pytest.fixture
def mqtt_log(monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(mqtt_module, "log", recorder)
    return recorder


def refused(task: str, reason: str, action: str) -> float:
    return REGISTRY.get_sample_value("edge_answers_refused_total",
                                     {"task": task, "reason": reason, "action": action}) or 0.0


def envelope_answer(device_id: str, rid: str, media: bytes = b"") -> Answer:
    route = Route(device_id, rid, "superres", "envelope",
                  C.RESULT_TOPIC.format(device_id=device_id, request_id=rid))
    return Answer(route, "result", result_body(route, result={"n": 1},
                                               timings={"total_ms": 5.0}),
                  (("image/png", media),) if media else ())


def raw_answer(device_id: str, rid: str, media: bytes) -> Answer:
    route = Route(device_id, rid, "superres", "raw",
                  C.RESULT_TOPIC.format(device_id=device_id, request_id=rid), rid.encode().hex())
    return Answer(route, "result", result_body(route, result={"n": 1}),
                  (("image/png", media),))


def receive(got: queue.Queue, count: int, timeout: float = 15.0) -> dict[str, list[bytes]]:
    """`count` answers by request id (later ones, if any, are left in the queue)."""
    out: dict[str, list[bytes]] = {}
    deadline = time.monotonic() + timeout
    for _ in range(count):
        topic, payload = got.get(timeout=max(0.1, deadline - time.monotonic()))
        out.setdefault(topic.rsplit("/", 1)[-1], []).append(payload)
    return out


def relay_in_background(relay: OutboxRelay) -> threading.Thread:
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    return t


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def settled(conn: redis.Redis) -> bool:
    return (conn.xlen(C.OUTBOX_STREAM) == 0
            and conn.xpending(C.OUTBOX_STREAM, C.OUTBOX_GROUP)["pending"] == 0)


# -- a real Mosquitto


def test_an_answer_the_acl_denies_is_logged_counted_and_settled_and_the_rest_flow(
        conn, broker, device, agent, relay_log, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic read edge/#\ntopic write edge/results/dev-ok/#\n")
    server = broker(f"acl_file {acl}\n")
    got = device(server.port)
    client = agent(server.port)
    before = refused("superres", "0x87", "dropped")
    outbox = Outbox(conn)
    outbox.append(envelope_answer("dev-denied", "denied", b"png"))
    for rid in ("a", "b"):
        outbox.append(envelope_answer("dev-ok", rid, b"png"))
    relay = OutboxRelay(conn, client, consumer="agent-acl")
    t = relay_in_background(relay)
    try:
        answers = receive(got, 2)
        assert wait_until(lambda: settled(conn))
    finally:
        relay.stop()
        t.join(5)
    assert sorted(answers) == ["a", "b"]
    assert all(json.loads(p)["status"] == "ok" for p in answers["a"] + answers["b"])
    assert got.empty()  # nothing for the denied one: not an answer of another shape either
    assert refused("superres", "0x87", "dropped") == before + 1
    errors = [kw for level, event, kw in relay_log.lines
              if level == "error" and event == "answer_refused"]
    assert len(errors) == 1
    assert errors[0]["device_id"] == "dev-denied" and errors[0]["request_id"] == "denied"
    assert errors[0]["reason"] == "0x87" and errors[0]["action"] == "dropped"
    assert client.is_connected()


def test_an_answer_past_the_broker_packet_limit_becomes_payload_too_large(
        conn, broker, device, agent, relay_log, mqtt_log):
    limit = 4096
    server = broker(f"max_packet_size {limit}\n")
    got = device(server.port)
    client = agent(server.port)
    assert client.max_packet_size == limit  # announced in CONNACK
    before = refused("superres", "0x95", "replaced")

    def raw_of_packet_size(rid: str, size: int) -> Answer:
        """A raw answer whose PUBLISH packet is exactly `size` bytes."""
        def packet(n: int) -> int:
            return publish_packet_size(render(raw_answer("dev", rid, b"\x89" * n)))

        n = size - packet(0)
        n -= packet(n) - size  # the length field grew
        assert packet(n) == size
        return raw_answer("dev", rid, b"\x89" * n)

    outbox = Outbox(conn)
    outbox.append(raw_of_packet_size("at-limit", limit))
    outbox.append(raw_of_packet_size("one-over", limit + 1))
    outbox.append(envelope_answer("dev", "huge", b"\0" * 100_000))
    outbox.append(envelope_answer("dev", "after", b"png"))
    relay = OutboxRelay(conn, client, consumer="agent-size")
    t = relay_in_background(relay)
    try:
        answers = receive(got, 4)
        assert wait_until(lambda: settled(conn))
        # The agent never lost its connection, and answers keep flowing.
        assert client.is_connected()
        assert [e for _, e, _ in mqtt_log.lines] == ["mqtt_connected"]  # once, never dropped
        outbox.append(envelope_answer("dev", "later", b"png"))
        later = receive(got, 1)
    finally:
        relay.stop()
        t.join(5)
    assert sorted(answers) == ["after", "at-limit", "huge", "one-over"]
    assert answers["at-limit"][0] == render(raw_of_packet_size("at-limit", limit)).payload
    huge = publish_packet_size(render(envelope_answer("dev", "huge", b"\0" * 100_000)))
    for rid, size in (("one-over", limit + 1), ("huge", huge)):
        body = json.loads(answers[rid][0])
        assert body["id"] == rid and body["status"] == "error"
        assert body["error"]["code"] == "payload_too_large"
        assert (f"the answer was {size} bytes as an MQTT packet; the broker accepts at most "
                f"{limit}") in body["error"]["message"]
    assert json.loads(answers["after"][0])["status"] == "ok"
    assert json.loads(later["later"][0])["status"] == "ok"
    assert refused("superres", "0x95", "replaced") == before + 2
    assert not [e for level, e, _ in relay_log.lines if level == "warning"]


# -- a scripted broker, for the codes Mosquitto will not send on demand


HOLD = -1  # a script step: no PUBACK until `release()`


class ScriptedBroker:
    """Speaks just enough MQTT 5 for one client: CONNACK, PINGRESP and a PUBACK per PUBLISH
    whose reason code comes from `script[request id]` (one per attempt, then success). With
    `receive_maximum`, its CONNACK announces that Receive Maximum."""

    def __init__(self, script: dict[str, list[int]], receive_maximum: int | None = None) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.receive_maximum = receive_maximum
        self.unacked = self.peak_unacked = 0  # PUBLISH packets not yet answered by a PUBACK
        self.published: list[tuple[str, bytes, int, float]] = []  # topic, payload, reason, at
        self.held: list[tuple[socket.socket, bytes]] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def release(self) -> None:
        """Send the PUBACKs held back so far (success)."""
        with self.lock:
            held, self.held = self.held, []
            self.unacked -= len(held)
        for sock, puback in held:
            sock.sendall(puback)

    def attempts(self, rid: str) -> list[tuple[str, bytes, int, float]]:
        with self.lock:
            return [p for p in self.published if p[0].rsplit("/", 1)[-1] == rid]

    def close(self) -> None:
        self.server.close()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(sock,), daemon=True).start()

    def _session(self, sock: socket.socket) -> None:
        stream = sock.makefile("rb")
        try:
            while True:
                head = stream.read(1)
                if not head:
                    return
                body = stream.read(_varint(stream))
                kind = head[0] >> 4
                if kind == 1:  # CONNECT
                    sock.sendall(self._connack())
                elif kind == 12:  # PINGREQ
                    sock.sendall(bytes([0xD0, 0]))
                elif kind == 3:  # PUBLISH (QoS 1)
                    puback, hold = self._puback(head[0], body)
                    with self.lock:
                        self.unacked += 1
                        self.peak_unacked = max(self.peak_unacked, self.unacked)
                        if hold:
                            self.held.append((sock, puback))
                        else:
                            self.unacked -= 1
                    if not hold:
                        sock.sendall(puback)
                elif kind == 14:  # DISCONNECT
                    return
        except OSError:
            return
        finally:
            sock.close()

    def _connack(self) -> bytes:
        if self.receive_maximum is None:
            return bytes([0x20, 3, 0, 0, 0])
        props = bytes([0x21]) + struct.pack("!H", self.receive_maximum)  # Receive Maximum
        return bytes([0x20, 3 + len(props), 0, 0, len(props)]) + props

    def _puback(self, flags: int, body: bytes) -> tuple[bytes, bool]:
        n = struct.unpack("!H", body[:2])[0]
        topic = body[2:2 + n].decode()
        at = 2 + n
        mid = body[at:at + 2]
        assert (flags >> 1) & 3 == 1, "the relay publishes answers at QoS 1"
        props_len, used = _varint_bytes(body, at + 2)
        payload = body[at + 2 + used + props_len:]
        with self.lock:
            steps = self.script.get(topic.rsplit("/", 1)[-1], [])
            reason = steps.pop(0) if steps else 0
            self.published.append((topic, payload, reason, time.monotonic()))
        hold = reason == HOLD
        return bytes([0x40, 3]) + mid + bytes([0 if hold else reason]), hold


def _varint(stream) -> int:
    value, shift = 0, 0
    while True:
        b = stream.read(1)[0]
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value


def _varint_bytes(data: bytes, at: int) -> tuple[int, int]:
    value, shift, used = 0, 0, 0
    while True:
        b = data[at + used]
        used += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, used


@pytest.fixture
def scripted():
    made = []

    def start(script: dict[str, list[int]], **kwargs) -> ScriptedBroker:
        made.append(ScriptedBroker(script, **kwargs))
        return made[-1]

    yield start
    for b in made:
        b.close()


def test_a_refusal_that_may_pass_keeps_the_answer_and_it_is_sent_again_later(
        conn, scripted, agent, relay_log):
    server = scripted({"quota": [QUOTA_EXCEEDED, QUOTA_EXCEEDED]})
    client = agent(server.port)
    before = refused("superres", "0x97", "retry")
    outbox = Outbox(conn)
    outbox.append(envelope_answer("dev", "quota", b"png"))
    outbox.append(envelope_answer("dev", "other", b"png"))
    relay = OutboxRelay(conn, client, consumer="agent-quota", backoff=(0.3, 0.6))
    t = relay_in_background(relay)
    try:
        # "other" goes out at once; "quota", refused, stays in the outbox (read, not settled).
        assert wait_until(lambda: conn.xlen(C.OUTBOX_STREAM) == 1, 5)
        [(eid, fields)] = conn.xrange(C.OUTBOX_STREAM)
        assert Answer.from_fields(fields).route.request_id == "quota"
        assert conn.xpending(C.OUTBOX_STREAM, C.OUTBOX_GROUP)["pending"] == 1
        assert wait_until(lambda: settled(conn), 10)
    finally:
        relay.stop()
        t.join(5)
    attempts = server.attempts("quota")
    assert [reason for _, _, reason, _ in attempts] == [QUOTA_EXCEEDED, QUOTA_EXCEEDED, 0]
    assert attempts[0][1] == attempts[2][1]  # the same answer, not a stand-in
    gaps = [b[3] - a[3] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.55  # backed off, and more the second time
    assert len(server.attempts("other")) == 1  # never held up, sent once
    assert refused("superres", "0x97", "retry") == before + 2
    warnings = [kw for level, event, kw in relay_log.lines if event == "answer_refused"]
    assert [(w["request_id"], w["action"]) for w in warnings] == [("quota", "retry")] * 2


def test_a_refused_payload_format_is_answered_internal_instead(conn, scripted, agent, relay_log):
    server = scripted({"bad-format": [PAYLOAD_FORMAT_INVALID]})
    client = agent(server.port)
    outbox = Outbox(conn)
    outbox.append(envelope_answer("dev", "bad-format", b"png"))
    relay = OutboxRelay(conn, client, consumer="agent-format")
    t = relay_in_background(relay)
    try:
        assert wait_until(lambda: len(server.attempts("bad-format")) == 2 and settled(conn))
    finally:
        relay.stop()
        t.join(5)
    first, second = server.attempts("bad-format")
    assert first[2] == PAYLOAD_FORMAT_INVALID and json.loads(first[1])["status"] == "ok"
    body = json.loads(second[1])
    assert second[2] == 0 and body["status"] == "error"
    assert body["error"]["code"] == "internal" and "0x99" not in body["error"]["message"]


def test_an_answer_waiting_for_its_puback_is_not_queued_twice(scripted, agent):
    """A retry of an answer paho still holds waits for that copy instead of queueing another
    (paho sends every copy it holds again on each reconnect)."""
    server = scripted({"slow": [HOLD]})
    client = agent(server.port)
    msg = render(envelope_answer("dev", "slow", b"png"))
    assert client.publish_many([msg], timeout=0.3) == [False]
    assert client.publish_many([msg], timeout=0.3) == [False]
    assert len(server.attempts("slow")) == 1
    server.release()
    assert client.publish_many([msg], timeout=5) == [True]  # that copy's PUBACK
    assert len(server.attempts("slow")) == 1
    assert client.publish_many([msg], timeout=5) == [True]  # settled: a new message
    assert len(server.attempts("slow")) == 2


def test_no_more_than_the_brokers_receive_maximum_go_out_unacknowledged(scripted, agent):
    """paho ignores the Receive Maximum a broker announces (a broker may disconnect a client
    past it): the relay's publishes keep to it, a window at a time."""
    server = scripted({"w0": [HOLD], "w1": [HOLD]}, receive_maximum=2)
    client = agent(server.port)
    assert client.receive_maximum == 2
    msgs = [render(envelope_answer("dev", f"w{i}", b"png")) for i in range(5)]
    assert client.publish_many(msgs, timeout=0.5) == [False] * 5
    assert [len(server.attempts(f"w{i}")) for i in range(5)] == [1, 1, 0, 0, 0]
    server.release()
    assert client.publish_many(msgs, timeout=5) == [True] * 5
    assert [len(server.attempts(f"w{i}")) for i in range(5)] == [1, 1, 1, 1, 1]
    assert server.peak_unacked == 2


def test_a_single_publish_reports_its_refusal(scripted, agent):
    """`publish_once` (the agent's retained status): a refusing PUBACK is reported, not lost."""
    server = scripted({"gw-1": [NOT_AUTHORIZED]})
    client = agent(server.port)
    status = Outgoing("edge/status/gw-1", b"{}", 1)
    refused = client.publish_once(status, timeout=5, retain=True)
    assert isinstance(refused, Refused) and refused.reason == NOT_AUTHORIZED
    assert client.publish_once(status, timeout=5, retain=True) is True  # the next one passes


class Refusing(FakePublisher):
    """A publisher whose broker refuses answers to `refuse` with quota exceeded, every time,
    and takes the others from their second attempt on."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.tries: dict[str, int] = {}
        self.delivered: list[str] = []

    def outcome(self, message, request_id):
        self.tries[request_id] = self.tries.get(request_id, 0) + 1
        if request_id in self.refuse:
            return Refused(QUOTA_EXCEEDED, "quota exceeded")
        if self.tries[request_id] == 1:
            return False
        self.delivered.append(request_id)
        return True


def test_answers_kept_for_a_retry_behind_a_batch_of_refused_ones_are_still_sent(
        conn, relay_log):
    publisher = Refusing(refuse={"r0", "r1", "r2"})
    outbox = Outbox(conn)
    for rid in ("r0", "r1", "r2", "late-0", "late-1"):
        outbox.append(envelope_answer("dev", rid, b"png"))
    relay = OutboxRelay(conn, publisher, consumer="agent-pages", batch=2, backoff=(0.1, 0.2))
    t = relay_in_background(relay)
    try:
        assert wait_until(lambda: sorted(publisher.delivered) == ["late-0", "late-1"], 5)
    finally:
        relay.stop()
        t.join(5)
    assert conn.xpending(C.OUTBOX_STREAM, C.OUTBOX_GROUP)["pending"] == 3  # kept, not lost
