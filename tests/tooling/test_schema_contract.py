"""Every message a real daemon run puts on the broker conforms to docs/schema.

A demo daemon (tokenize, detokenize, asr; lcm configured with no bundle) gets ok jobs, raw
MQTT 5 jobs and one job for each error code a device can provoke; a subscriber to `edge/#`
records every message, and each is checked against its schema: jobs against the request
envelope (the schema's verdict must be the agent's), answers, progress notes and status.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.tasks import TASKS
from edgectl.localdaemon import Daemon
from tests.tooling.schemas import errors, load

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# the codes a device can provoke on this daemon; `internal` is a gateway fault, not provoked
PROVOKED = {"bad_request", "unknown_task", "payload_too_large", "timeout", "unsupported_media",
            "model_unavailable", "busy"}


def record(port: int) -> tuple[paho.Client, queue.Queue]:
    got: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="schema-recorder", protocol=paho.MQTTv5)
    c.on_message = lambda cl, u, m: got.put((m.topic, bytes(m.payload)))
    c.on_subscribe = lambda *a: ready.put(True)
    c.connect("127.0.0.1", port)
    c.subscribe("edge/#", qos=1)
    c.loop_start()
    ready.get(timeout=10)
    return c, got


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, packed_bundles, keyring_file):
    """[(topic, payload)] of one run with every kind of message."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: scripts/setup.sh installs it")
    work = tmp_path_factory.mktemp("contract")
    d = Daemon(work, packed_bundles("tokenize", "asr"), keyring_file, tasks={
        "tokenize": {"devices": ["CPU"], "max_bytes": 4000},
        "detokenize": {"devices": ["CPU"], "device_limit": 1},
        "asr": {"devices": ["CPU"]}, "lcm": {"devices": ["CPU"]}})
    d.start_worker(queue="edge.asr.CPU")
    d.start_agent()
    client, got = record(d.broker.port)
    wav = work / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), "schemas keep the code honest"],
                   check=True)
    try:
        with d.device("dev-schema") as dev:
            assert dev.request("tokenize", text=["a", "b"], request_id="ok-1").ok
            assert dev.request("detokenize", ids=[101, 102], request_id="ok-2").ok
            assert dev.request("asr", data=wav.read_bytes(), request_id="ok-3").ok
            dev.publish_raw("tokenize", b"raw text", "raw-1", content_type="text/plain",
                            response_topic="edge/results/dev-schema/replies")
            assert dev.wait("raw-1").ok
            for rid, task, env, code in (
                    ("e-1", "tokenize", {"text": "x", "params": {"nope": 1}}, "bad_request"),
                    ("e-2", "nosuchtask", {"text": "x"}, "unknown_task"),
                    ("e-3", "tokenize", {"text": "x" * 5000}, "payload_too_large"),
                    ("e-4", "tokenize", {"text": "x", "deadline": 1000}, "timeout"),
                    ("e-5", "asr", {"data": "R0lGODlhAQABAAAAACw="}, "unsupported_media"),
                    ("e-6", "lcm", {"text": "a cat"}, "model_unavailable")):
                dev.publish_envelope(task, {"id": rid, **env})
                reply = dev.wait(rid)
                assert reply.body["error"]["code"] == code, reply.body
            # busy: the device's quota of one queued detokenize job, while the worker is paused
            worker = d.workers[0]
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                dev.publish_envelope("detokenize", {"id": "q-1", "ids": [101]})
                dev.publish_envelope("detokenize", {"id": "e-7", "ids": [101]})
                assert dev.wait("e-7").body["error"]["code"] == "busy"
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            assert dev.wait("q-1").ok
        d.wait_online()
        time.sleep(0.5)
    finally:
        client.disconnect()
        client.loop_stop()
        d.stop()
    out = []
    while not got.empty():
        out.append(got.get())
    return out


def by_kind(traffic, kind: str) -> list[tuple[str, bytes]]:
    return [(t, p) for t, p in traffic if t.split("/")[1] == kind]


def test_every_answer_conforms_and_every_provoked_code_was_seen(traffic):
    answers = by_kind(traffic, "results")
    assert len(answers) >= 12
    codes = set()
    for topic, payload in answers:
        doc = json.loads(payload)
        assert not errors("answer", doc), (topic, doc, errors("answer", doc))
        assert not errors("answer", doc, f"$defs/errors/{doc['error']['code']}"
                          if doc["status"] == "error" else "$defs/ok")
        if doc["status"] == "error":
            codes.add(doc["error"]["code"])
    assert codes == PROVOKED
    assert "edge/results/dev-schema/replies" in {t for t, _ in answers}


def test_every_job_envelope_conforms_exactly_when_the_agent_took_its_shape(traffic):
    answers = {json.loads(p)["id"]: json.loads(p) for _, p in by_kind(traffic, "results")}
    checked = 0
    for topic, payload in by_kind(traffic, "jobs"):
        task = topic.split("/")[2]
        try:
            doc = json.loads(payload)
        except ValueError:
            continue  # a raw MQTT 5 job: the payload is the text or media itself
        answer = answers[doc["id"]]
        if task not in TASKS:  # the topic names no task the schema (or the agent) knows
            assert task not in load("request")["$defs"]["tasks"]
            assert answer["error"]["code"] == "unknown_task"
            continue
        shape_refused = answer["status"] == "error" and answer["error"]["code"] == "bad_request"
        verdict = errors("request", doc, f"$defs/tasks/{task}")
        assert (not verdict) != shape_refused, (topic, doc, answer, verdict)
        checked += 1
    assert checked == 10  # ok-1..3, e-1, e-3..7, q-1


def test_every_progress_note_conforms(traffic):
    notes = [json.loads(p) for _, p in by_kind(traffic, "progress")]
    assert any(n["task"] == "asr" for n in notes)
    for note in notes:
        assert not errors("progress", note), (note, errors("progress", note))


def test_every_status_document_conforms(traffic):
    docs = [json.loads(p) for _, p in by_kind(traffic, "status")]
    assert docs and any(d["online"] for d in docs)
    for doc in docs:
        assert not errors("status", doc), (doc, errors("status", doc))
