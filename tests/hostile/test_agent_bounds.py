"""Crafted envelopes against the real agent, worker, Redis and Mosquitto: each is answered with
the error that names its bound, the agent's memory stays bounded, and the gateway goes on
serving other devices."""

from __future__ import annotations

import json

import pytest

from edgectl.localdaemon import Daemon
from tests.hostile.probe import MiB, answers, code, memory, reset_peak

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKENIZE_MAX = 256 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tokenizer_bundles, keyring_file):
    d = Daemon(tmp_path_factory.mktemp("hostile-agent"), tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "max_bytes": TOKENIZE_MAX},
                      "detokenize": {"devices": ["CPU"], "max_bytes": TOKENIZE_MAX}})
    d.start()
    yield d
    d.stop()


def _still_serving(daemon: Daemon) -> None:
    with daemon.device("bystander") as dev:
        reply = dev.request("tokenize", text="still here", timeout=20)
    assert reply.ok, reply.body
    assert daemon.agent.poll() is None and all(w.poll() is None for w in daemon.workers)


def test_a_20_mib_envelope_is_refused_unparsed_and_the_agent_stays_small(daemon):
    pid = daemon.agent.pid
    before = reset_peak(pid)
    envelope = {"id": "huge-1", "text": ["x" * 10] * 1_500_000}  # ~21 MB of JSON
    with daemon.device("attacker") as dev:
        dev.publish_envelope("tokenize", envelope)
        got = answers(dev, ["huge-1"], timeout=60)
    growth = memory(pid)["VmHWM"] - before
    print(f"agent peak growth for a 21 MB envelope: {growth / MiB:.1f} MiB")
    [body] = got["huge-1"]
    assert code(body) == "payload_too_large"
    assert "tasks.tokenize.max_bytes" in body["error"]["message"]
    assert growth < 150 * MiB
    _still_serving(daemon)


def test_an_envelope_nested_100000_deep_is_refused_for_its_nesting(daemon):
    payload = b'{"id": "deep-1", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with daemon.device("attacker") as dev:
        dev._publish("edge/jobs/tokenize/attacker", payload, "deep-1", 1)
        got = answers(dev, ["deep-1"], timeout=30)
    # 200 kB: under max_bytes, so the nesting itself is what gets it refused
    [body] = got["deep-1"]
    assert code(body) == "bad_request"
    assert "nested deeper than 32" in body["error"]["message"]
    _still_serving(daemon)


def test_an_oversized_raw_message_is_answered_under_its_correlation_id(daemon):
    with daemon.device("attacker") as dev:
        dev.publish_raw("tokenize", b"y" * (TOKENIZE_MAX + 1), "raw-big-1",
                        content_type="text/plain")
        got = answers(dev, ["raw-big-1"], timeout=30)
    [body] = got["raw-big-1"]
    assert code(body) == "payload_too_large"
    _still_serving(daemon)


def test_a_job_for_a_task_not_served_is_not_parsed_either(daemon):
    payload = json.dumps({"id": "nope-1", "text": "x" * (TOKENIZE_MAX * 4)}).encode()
    with daemon.device("attacker") as dev:
        dev._publish("edge/jobs/lcm/attacker", payload, "nope-1", 1)
        got = answers(dev, ["nope-1"], timeout=30)
    [body] = got["nope-1"]
    assert code(body) == "unknown_task"
    _still_serving(daemon)


def test_the_same_request_id_on_two_tasks_is_two_jobs(daemon):
    with daemon.device("twice") as dev:
        dev.publish_envelope("tokenize", {"id": "same-1", "text": "hello"})
        first = answers(dev, ["same-1"], timeout=30, settle=0.5)["same-1"]
        dev.publish_envelope("detokenize", {"id": "same-1", "ids": [101, 7592, 102]})
        second = answers(dev, ["same-1"], timeout=30)["same-1"]
    assert [b["task"] for b in first] == ["tokenize"]
    assert [b["task"] for b in second] == ["detokenize"]
    assert code(first[0]) == "ok" and code(second[0]) == "ok"
    assert "hello" in second[0]["result"]["text"]
