"""The MQTT protocol as pure functions: both payload forms, every error code, rendering."""

from __future__ import annotations

import base64
import json

import pytest

from edge.errors import CODES
from edge.jobs import Answer, error_answer, result_body
from edge.protocol import Properties, Rejected, parse, render
from edge.errors import Busy, Internal, ModelUnavailable, Timeout

LIMITS = {"tokenize": 1000, "detokenize": 1000, "superres": 4096, "asr": 4096, "lcm": 1000}
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def _parse(topic, payload, props=Properties()):
    return parse(topic, payload, props, max_bytes=LIMITS, now=1000.0)


def _code(topic, payload, props=Properties()):
    with pytest.raises(Rejected) as exc:
        _parse(topic, payload, props)
    return exc.value.error.code, exc.value.route


def test_envelope_text_job_is_parsed():
    sub = _parse("edge/jobs/tokenize/dev1", b'{"id": "r1", "text": "hello", '
                 b'"params": {"model": "clip-vit-b32"}}')
    assert sub.route.device_id == "dev1" and sub.route.request_id == "r1"
    assert sub.route.topic == "edge/results/dev1/r1" and sub.route.form == "envelope"
    assert sub.text == "hello" and not sub.batch
    assert sub.params == {"model": "clip-vit-b32", "add_special_tokens": True}


def test_envelope_text_list_is_a_batch():
    sub = _parse("edge/jobs/tokenize/dev1", json.dumps({"id": "r", "text": ["a", "b"]}).encode())
    assert sub.text == ("a", "b") and sub.batch


def test_detokenize_envelope_carries_ids_in_both_forms():
    one = _parse("edge/jobs/detokenize/d", b'{"id": "r", "ids": [1, 2, 3]}')
    many = _parse("edge/jobs/detokenize/d", b'{"id": "r", "ids": [[1, 2], [3]]}')
    assert one.ids == (1, 2, 3) and not one.batch
    assert many.ids == ((1, 2), (3,)) and many.batch


def test_raw_mqtt5_job_uses_correlation_data_and_user_properties():
    props = Properties(content_type="text/plain", correlation_data=b"abc-1",
                       response_topic="edge/results/dev1/replies",
                       user_properties=(("add_special_tokens", "false"),))
    sub = _parse("edge/jobs/tokenize/dev1", "héllo".encode(), props)
    assert sub.route.request_id == "abc-1" and sub.route.form == "raw"
    assert sub.route.topic == "edge/results/dev1/replies"
    assert sub.route.correlation == b"abc-1".hex()
    assert sub.text == "héllo" and sub.params["add_special_tokens"] is False


@pytest.mark.parametrize("topic", ["my/replies", "edge/results/dev2/replies",
                                   "edge/results/dev1/", "edge/results/dev1/+",
                                   "edge/results/dev10/x", "edge/results/dev1"])
def test_a_response_topic_outside_the_devices_results_is_ignored(topic):
    props = Properties(correlation_data=b"r1", response_topic=topic)
    sub = _parse("edge/jobs/tokenize/dev1", b"hello", props)
    assert sub.route.topic == "edge/results/dev1/r1"  # not another device's, not a wildcard


def test_raw_image_is_sniffed_without_content_type():
    sub = _parse("edge/jobs/superres/cam", PNG, Properties(correlation_data=b"\x01\x02"))
    assert sub.media == (("image/png", PNG),)
    assert sub.route.request_id == "0102"  # binary correlation data becomes hex


def test_envelope_base64_media_list():
    env = {"id": "b", "data": [base64.b64encode(PNG).decode()] * 3}
    sub = _parse("edge/jobs/superres/cam", json.dumps(env).encode())
    assert len(sub.media) == 3 and sub.batch


@pytest.mark.parametrize("topic,payload,props,code", [
    ("edge/jobs/tokenize/d", b"{not json", Properties(), "bad_request"),
    ("edge/jobs/tokenize/d", b'{"text": "no id"}', Properties(), "bad_request"),
    ("edge/jobs/tokenize/d", b'{"id": "x", "text": 5}', Properties(), "bad_request"),
    ("edge/jobs/tokenize/d", b'{"id": "x", "text": "a", "params": {"nope": 1}}', Properties(),
     "bad_request"),
    ("edge/jobs/tokenize/d", b'{"id": "x", "text": "a", "params": {"add_special_tokens": 3}}',
     Properties(), "bad_request"),
    ("edge/jobs/lcm/d", b'{"id": "x", "text": "a", "params": {"steps": 99}}', Properties(),
     "bad_request"),
    ("edge/jobs/superres/d", b'{"id": "x", "data": "!!notbase64"}', Properties(), "bad_request"),
    ("edge/jobs/superres/d", b"GIF89a....", Properties(correlation_data=b"r"),
     "unsupported_media"),
    ("edge/jobs/superres/d", b"x", Properties(content_type="image/gif", correlation_data=b"r"),
     "unsupported_media"),
    ("edge/jobs/tokenize/d", b'{"id": "x", "text": "' + b"a" * 2000 + b'"}', Properties(),
     "payload_too_large"),
    ("edge/jobs/paint/d", b'{"id": "x", "text": "a"}', Properties(), "unknown_task"),
    ("edge/jobs/tokenize/d", b"\xff\xfe", Properties(correlation_data=b"r"), "bad_request"),
    ("edge/jobs/tokenize/d", b"raw text", Properties(), "bad_request"),  # raw without an id
])
def test_bad_jobs_get_their_error_code_and_a_route(topic, payload, props, code):
    got, route = _code(topic, payload, props)
    assert got == code
    assert route is not None and route.device_id == "d"


def test_a_non_job_topic_is_dropped_without_route():
    code, route = _code("edge/jobs/tokenize", b"{}")
    assert code == "bad_request" and route is None


def test_every_error_code_renders_as_a_json_answer():
    sub = _parse("edge/jobs/tokenize/d", b'{"id": "r", "text": "x"}')
    from edge.errors import error_for

    for code in CODES:
        out = render(error_answer(sub.route, error_for(code, "why")))
        body = json.loads(out.payload)
        assert body == {"id": "r", "task": "tokenize", "status": "error",
                        "error": {"code": code, "message": "why"}}
        assert out.topic == "edge/results/d/r" and out.qos == 1


def test_raw_image_answer_is_raw_bytes_with_properties():
    sub = _parse("edge/jobs/superres/cam", PNG, Properties(correlation_data=b"r9"))
    body = result_body(sub.route, result={"images": 1}, timings={"run_ms": 1.23456})
    out = render(Answer(sub.route, "result", body, (("image/png", b"PNGDATA"),)))
    assert out.payload == b"PNGDATA" and out.properties.content_type == "image/png"
    assert out.properties.correlation_data == b"r9"
    assert dict(out.properties.user_properties)["status"] == "ok"


def test_envelope_image_answer_embeds_base64():
    env = {"id": "e", "data": base64.b64encode(PNG).decode()}
    sub = _parse("edge/jobs/superres/cam", json.dumps(env).encode())
    out = render(Answer(sub.route, "result", result_body(sub.route, result={}),
                        (("image/png", b"IMG"),)))
    body = json.loads(out.payload)
    assert body["result"]["media"] == [{"content_type": "image/png",
                                        "data": base64.b64encode(b"IMG").decode()}]


def test_progress_goes_to_the_progress_topic_at_qos0():
    sub = _parse("edge/jobs/lcm/d", b'{"id": "p", "text": "cat"}')
    out = render(Answer(sub.route, "progress", {"step": 1, "steps": 4}))
    assert out.topic == "edge/progress/d/p" and out.qos == 0
    assert json.loads(out.payload) == {"id": "p", "task": "lcm", "step": 1, "steps": 4}
