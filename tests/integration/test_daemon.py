"""The whole path with real Mosquitto, Redis, agent and worker processes (tokenize jobs)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid

import pytest

from edge.jobs import job_key
from edgectl.localdaemon import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def daemon(tmp_path, tokenizer_bundles, keyring_file):
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file).start()
    yield d
    d.stop()


def test_device_gets_its_answer_on_the_results_topic(daemon):
    with daemon.device("dev-a") as dev:
        reply = dev.request("tokenize", text=["hello world", "second"], request_id="r-1",
                            params={"model": "all-minilm-l6-v2"})
    assert reply.topic == "edge/results/dev-a/r-1"
    assert reply.ok, reply.body
    assert reply.body["result"]["ids"][0][0] == 101  # [CLS]
    assert len(reply.body["result"]["ids"]) == 2
    assert set(reply.body["timings"]) >= {"queue_ms", "run_ms", "total_ms"}


def test_detokenize_roundtrip(daemon):
    with daemon.device("dev-a") as dev:
        ids = dev.request("tokenize", text="edge inference",
                          params={"model": "clip-vit-b32", "add_special_tokens": False}
                          ).body["result"]["ids"]
        text = dev.request("detokenize", ids=ids, params={"model": "clip-vit-b32"})
    assert text.ok and text.body["result"]["text"].strip() == "edge inference"


def test_raw_mqtt5_request_is_answered_on_the_response_topic_with_correlation(daemon):
    with daemon.device("dev-raw") as dev:
        dev.publish_raw("tokenize", "héllo".encode(), "corr-42", content_type="text/plain",
                        params={"model": "whisper-tiny.en"},
                        response_topic="edge/results/dev-raw/replies")
        reply = dev.wait("corr-42", timeout=30)
    assert reply.topic == "edge/results/dev-raw/replies"
    assert reply.ok and reply.body["id"] == "corr-42"
    assert isinstance(reply.body["result"]["ids"], list)


def test_duplicate_publish_runs_once(daemon):
    with daemon.device("dev-dup") as dev:
        env = {"id": "dup-1", "text": "same job"}
        for _ in range(5):
            dev.publish_envelope("tokenize", env)
        first = dev.wait("dup-1", timeout=30)
        assert first.ok
        with pytest.raises(TimeoutError):
            dev.wait("dup-1", timeout=2)  # no second answer
    finished = daemon.conn.zcard("rq:finished:edge.tokenize.CPU")
    assert finished == 1


def test_malformed_payload_gets_bad_request_and_the_agent_keeps_serving(daemon):
    with daemon.device("dev-bad") as dev:
        dev.client.publish("edge/jobs/tokenize/dev-bad", b'{"id": "m1", "text": ', qos=1)
        dev.client.publish("edge/jobs/tokenize/dev-bad", b'{"id": "m2", "text": 7}', qos=1)
        dev.client.publish("edge/jobs/nosuchtask/dev-bad", b'{"id": "m3", "text": "x"}', qos=1)
        dev.client.publish("edge/jobs/tokenize/dev-bad", b"\x00\xff" * 10, qos=1)
        bad = dev.wait("m2", timeout=20)
        unknown = dev.wait("m3", timeout=20)
        good = dev.request("tokenize", text="still alive")
    assert bad.body["error"]["code"] == "bad_request"
    assert unknown.body["error"]["code"] == "unknown_task"
    assert good.ok
    assert daemon.agent.poll() is None


def test_flood_past_the_queue_limit_is_answered_busy_and_nothing_is_lost(tmp_path,
                                                                        tokenizer_bundles,
                                                                        keyring_file):
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "queue_limit": 3}}).start()
    try:
        worker = d.workers[0]
        worker.send_signal(signal.SIGSTOP)  # a stuck worker: its queue fills up
        with d.device("dev-flood") as dev:
            ids = [f"f{i}" for i in range(12)]
            for rid in ids:
                dev.publish_envelope("tokenize", {"id": rid, "text": rid})
            time.sleep(1.0)
            worker.send_signal(signal.SIGCONT)
            replies = {rid: dev.wait(rid, timeout=30) for rid in ids}
    finally:
        d.stop()
    codes = [r.body.get("error", {}).get("code", "ok") for r in replies.values()]
    # The queue holds 3; the stopped worker may already have popped one more (its BLPOP was
    # waiting in Redis when it was stopped). Every job got exactly one answer.
    assert codes.count("ok") in (3, 4)
    assert codes.count("busy") == 12 - codes.count("ok")


def test_broker_restart_while_a_result_waits_in_the_outbox(daemon):
    dev = daemon.device("dev-persist", session_expiry=3600)
    try:
        worker = daemon.workers[0]
        worker.send_signal(signal.SIGSTOP)
        dev.publish_envelope("tokenize", {"id": "p-1", "text": "survive the broker"})
        deadline = time.monotonic() + 10
        key = f"rq:job:{job_key('dev-persist', 'tokenize', 'p-1')}"
        while not daemon.conn.exists(key):  # enqueued (the stopped worker may hold it already)
            assert time.monotonic() < deadline, "job never reached Redis"
            time.sleep(0.05)
        daemon.broker.stop()
        worker.send_signal(signal.SIGCONT)
        while daemon.conn.xlen("edge:outbox") < 1:  # the answer waits in the outbox
            assert time.monotonic() < deadline + 20, "answer never reached the outbox"
            time.sleep(0.05)
        time.sleep(1.0)
        assert daemon.conn.xlen("edge:outbox") == 1
        daemon.broker.start()
        reply = dev.wait("p-1", timeout=40)
    finally:
        dev.close()
    assert reply.ok and reply.body["result"]["ids"]


def test_mosquitto_command_line_clients(daemon):
    port = str(daemon.broker.port)
    sub = subprocess.Popen(["mosquitto_sub", "-p", port, "-t", "edge/results/cli-dev/+",
                            "-C", "1", "-W", "30", "-q", "1"], stdout=subprocess.PIPE)
    time.sleep(0.5)
    rid = uuid.uuid4().hex[:8]
    subprocess.run(["mosquitto_pub", "-p", port, "-q", "1", "-t", "edge/jobs/tokenize/cli-dev",
                    "-m", json.dumps({"id": rid, "text": "from the shell"})], check=True)
    out, _ = sub.communicate(timeout=40)
    body = json.loads(out)
    assert body["id"] == rid and body["status"] == "ok" and body["result"]["ids"]


def test_mqtt311_client_uses_the_envelope(daemon):
    import paho.mqtt.client as paho

    from edgectl.client import DeviceClient

    dev = DeviceClient("127.0.0.1", daemon.broker.port, device_id="old-dev",
                       protocol=paho.MQTTv311).connect()
    try:
        reply = dev.request("tokenize", text="three one one")
    finally:
        dev.close()
    assert reply.ok
