"""10,000+ generated messages through `edge.protocol.parse`: only `Rejected`, never a crash,
and every rejection that knows where to answer renders to a valid MQTT answer."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings

from edge.errors import CODES, Internal
from edge.jobs import error_answer
from edge.protocol import Rejected, Submission, parse, render
from edge.tasks import TASKS
from tests.fuzz.strategies import messages

MAX_BYTES = {name: 1 << 16 for name in TASKS if name != "lcm"}  # lcm: "not served here"
NOW = time.time()
FUZZ = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check_answer(route, error) -> None:
    msg = render(error_answer(route, error))
    assert msg.qos == 1
    assert not set(msg.topic) & set("+#") and msg.topic
    body = json.loads(msg.payload)
    assert body["status"] == "error" and body["error"]["code"] in CODES
    assert body["id"] == route.request_id


def test_parse_never_raises_anything_but_rejected():
    seen = {"rejected": 0, "accepted": 0}

    @FUZZ
    @given(message=messages)
    def one(message):
        topic, payload, props = message
        try:
            sub = parse(topic, payload, props, max_bytes=MAX_BYTES, now=NOW)
        except Rejected as exc:
            seen["rejected"] += 1
            assert exc.error.code in CODES
            if exc.route is not None:
                _check_answer(exc.route, exc.error)
            return
        seen["accepted"] += 1
        assert isinstance(sub, Submission)
        assert sub.route.task in TASKS
        assert not set(sub.route.topic) & set("+#")
        assert sub.text is not None or sub.ids is not None or sub.media
        _check_answer(sub.route, Internal("an answer to an accepted job renders too"))

    one()
    assert sum(seen.values()) >= 10_000, seen
    assert seen["accepted"] >= 100, seen  # the generator reaches past the first checks
