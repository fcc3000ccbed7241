"""The outbox relay against a real Redis: refused answers never block the others."""

from __future__ import annotations

import threading
import time

import pytest

from edge.jobs import Answer, Route, result_body
from edge.outbox import Outbox
from edge.protocol import Outgoing
from edge.relay import OutboxRelay
from tests.integration.fakes import FakePublisher
from workers.api import Media, Response
from workers.perform import check_answer_size

pytestmark = pytest.mark.integration


class FakeBroker(FakePublisher):
    """Acknowledges every message except media answers to the ids in `refuse` (paho refuses
    them, as it would a payload past MQTT's limit) and anything to `drop` (never acknowledged:
    a transient failure)."""

    def __init__(self, refuse=(), drop=()) -> None:
        self.refuse, self.drop = set(refuse), set(drop)
        self.sent: list[Outgoing] = []
        self.lock = threading.Lock()

    def outcome(self, message, request_id):
        if request_id in self.refuse and b'"media"' in message.payload:
            return None
        if request_id in self.drop:
            return False
        with self.lock:
            self.sent.append(message)
        return True


def _answer(rid: str) -> Answer:
    route = Route("dev", rid, "superres", "envelope", f"edge/results/dev/{rid}")
    return Answer(route, "result", result_body(route, result={"n": 1}), (("image/png", b"x"),))


def _run(relay: OutboxRelay, seconds: float) -> None:
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    time.sleep(seconds)
    relay.stop()
    t.join(5)


def test_an_answer_mqtt_refuses_becomes_an_error_and_the_rest_still_flow(conn):
    broker = FakeBroker(refuse={"huge"}, drop={"stuck"})
    outbox = Outbox(conn)
    relay = OutboxRelay(conn, broker, consumer="agent-1")
    for rid in ("stuck", "huge", "a", "b"):
        outbox.append(_answer(rid))
    _run(relay, 1.5)
    outbox.append(_answer("c"))  # arrives while "stuck" keeps failing
    _run(OutboxRelay(conn, broker, consumer="agent-1"), 1.5)
    got = [m.topic.rsplit("/", 1)[-1] for m in broker.sent]
    assert {"a", "b", "c"} <= set(got)
    huge = [m for m in broker.sent if m.topic.endswith("/huge")]
    assert len(huge) == 1 and b'"status":"error"' in huge[0].payload
    assert "stuck" not in got  # still pending, retried, never dropped
    assert conn.xpending(relay.stream, relay.group)["pending"] == 1


def test_an_answer_past_the_message_limit_is_refused_with_advice():
    from edge.errors import PayloadTooLarge

    big = Response({"images": []}, (Media("image/png", b"\0" * 2048),))
    check_answer_size(big, limit=4096)
    with pytest.raises(PayloadTooLarge, match="format=jpeg"):
        check_answer_size(big, limit=1024)
