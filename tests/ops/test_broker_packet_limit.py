"""The shipped broker's packet limit (configs/mosquitto.conf) carries the largest answer a worker
may send (edge/constants.py MAX_ANSWER_BYTES) and the largest job the shipped configs accept."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from edge import constants as C
from edge.jobs import Answer, Route
from edge.mqtt import publish_packet_size
from edge.jobs import result_body
from edge.protocol import Outgoing, render

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# An envelope packet grows by exactly the base64 size of its media once the MQTT length field
# has its full 4 bytes (from 2 MiB): measure one of this size and extrapolate.
MEASURED = 3 << 20


def b64(n: int) -> int:
    return 4 * ((n + 2) // 3)


def broker_limit() -> int:
    text = (CONFIGS / "mosquitto.conf").read_text()
    # message_size_limit is announced to no client and refused with a PUBACK code paho
    # cannot read: it drops the connection and sends the message again, forever.
    assert not re.search(r"(?m)^\s*message_size_limit\b", text)
    found = re.findall(r"(?m)^max_packet_size (\d+)\s*$", text)
    assert len(found) == 1, "configs/mosquitto.conf sets max_packet_size once"
    return int(found[0])


def test_the_largest_answer_fits_the_shipped_broker_limit():
    rid = "r" * 128  # the longest request id
    route = Route("d" * 64, rid, "superres", "envelope",
                  C.RESULT_TOPIC.format(device_id="d" * 64, request_id=rid))
    body = result_body(route, result={"model": "m" * 64, "scale": 4},
                       timings={"queue_ms": 1e6, "run_ms": 1e6, "total_ms": 2e6})
    measured = publish_packet_size(render(Answer(route, "result", body,
                                                 (("image/png", b"\0" * MEASURED),))))
    largest = measured - b64(MEASURED) + b64(C.MAX_ANSWER_BYTES)
    # Room left for the rest of a result (a media list, longer result fields).
    assert largest + (1 << 20) <= broker_limit() <= C.MQTT_MAX_PACKET_BYTES


def test_the_largest_job_fits_the_shipped_broker_limit():
    largest = max(task["max_bytes"]
                  for name in ("edge.example.toml", "demo.toml")
                  for task in tomllib.loads((CONFIGS / name).read_text())["tasks"].values())
    topic = C.JOB_TOPIC.format(task="superres", device_id="d" * 64)
    envelope = {"id": "r" * 128, "params": {"format": "jpeg", "scale": 4},
                "content_type": "image/png", "data": "A" * b64(MEASURED)}
    measured = publish_packet_size(Outgoing(topic, json.dumps(envelope).encode(), 1))
    assert measured - b64(MEASURED) + b64(largest) <= broker_limit()
