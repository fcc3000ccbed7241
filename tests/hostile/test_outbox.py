"""The outbox against a long broker outage and a subverted worker (real Redis, a recording
publisher): no undelivered answer is trimmed, progress cannot push answers out, and the relay
publishes only under the job's own device's topics."""

from __future__ import annotations

import pytest

from edge import constants as C
from edge.jobs import Answer, Route, result_body
from edge.outbox import Outbox
from edge.relay import OutboxRelay
from tests.integration.fakes import FakePublisher

pytestmark = [pytest.mark.integration]


class Recorder(FakePublisher):
    """Takes every message (or none, while `down`) and remembers it."""

    def __init__(self) -> None:
        self.sent: list = []
        self.down = False

    def outcome(self, message, request_id):
        if self.down:
            return False
        self.sent.append(message)
        return True


def _answer(device: str, rid: str, topic: str | None = None, kind: str = "result") -> Answer:
    route = Route(device, rid, "tokenize", "envelope",
                  topic or C.RESULT_TOPIC.format(device_id=device, request_id=rid))
    if kind == "progress":
        return Answer(route, "progress", {"step": 1})
    return Answer(route, "result", result_body(route, result={"ids": [1]}))


def test_answers_outlive_any_number_of_progress_notes_while_the_broker_is_away(conn,
                                                                               monkeypatch):
    monkeypatch.setattr(C, "PROGRESS_MAXLEN", 50)
    outbox, broker = Outbox(conn), Recorder()
    relay = OutboxRelay(conn, broker, consumer="agent-1")
    broker.down = True
    for i in range(300):
        outbox.append(_answer("dev", f"r-{i}"))
        for _ in range(5):
            outbox.append(_answer("dev", f"r-{i}", kind="progress"))
        relay.relay_once(block_ms=1)  # read while the broker is down: kept, not settled
    assert conn.xlen(C.OUTBOX_STREAM) == 300
    assert conn.xlen(C.PROGRESS_STREAM) <= 200  # trimmed (approximately) to its cap
    broker.down = False
    while relay.resend_pending() is False:
        pass
    relay.relay_once(block_ms=1)
    results = [m.topic for m in broker.sent if m.qos == 1]
    assert sorted(results) == sorted(C.RESULT_TOPIC.format(device_id="dev", request_id=f"r-{i}")
                                     for i in range(300))
    assert conn.xlen(C.OUTBOX_STREAM) == 0


@pytest.mark.parametrize("topic", [
    "edge/results/other-dev/r-1",          # another device's results
    "edge/jobs/tokenize/other-dev",        # a forged job
    "edge/status/gateway",                 # the node status
    "edge/results/dev/#",                  # a wildcard
    "edge/results/dev/",                   # no request id
    "$SYS/broker/x",
])
def test_the_relay_publishes_only_under_the_jobs_own_device(conn, topic):
    outbox, broker = Outbox(conn), Recorder()
    relay = OutboxRelay(conn, broker, consumer="agent-1")
    outbox.append(_answer("dev", "r-1", topic=topic))
    outbox.append(_answer("dev", "r-2"))
    relay.relay_once(block_ms=1)
    assert [m.topic for m in broker.sent] == ["edge/results/dev/r-2"]
    assert conn.xlen(C.OUTBOX_STREAM) == 0  # the forged entry is settled, not retried forever


def test_a_route_with_a_forged_device_id_is_not_published(conn):
    outbox, broker = Outbox(conn), Recorder()
    relay = OutboxRelay(conn, broker, consumer="agent-1")
    outbox.append(_answer("dev/../x", "r-1", topic="edge/results/dev/../x/r-1"))
    outbox.append(_answer("dev+", "r-2", topic="edge/results/dev+/r-2"))
    relay.relay_once(block_ms=1)
    assert broker.sent == []


def test_the_relay_reads_big_answers_a_few_at_a_time(conn, monkeypatch):
    import edge.relay as relay_module

    monkeypatch.setattr(relay_module, "READ_BUDGET", 8 << 20)
    outbox, broker = Outbox(conn), Recorder()
    relay = OutboxRelay(conn, broker, consumer="agent-1")
    for i in range(6):
        route = Route("dev", f"big-{i}", "superres", "envelope", f"edge/results/dev/big-{i}")
        outbox.append(Answer(route, "result", result_body(route, result={}),
                             (("image/png", bytes(5 << 20)),)))
    batches = []
    while len(broker.sent) < 6:
        before = len(broker.sent)
        relay.relay_once(block_ms=1)
        batches.append(len(broker.sent) - before)
    assert max(batches) == 2  # 5 MiB each against an 8 MiB budget: the second one passes it
    assert conn.xlen(C.OUTBOX_STREAM) == 0
