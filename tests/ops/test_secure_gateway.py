"""A gateway set up as docs/operations.md says: Mosquitto with TLS + passwords + ACL from
configs/mosquitto.conf, Redis with the ACL users of configs/redis.conf over its unix socket, the
agent and a CPU worker as real processes under a fake systemd notify socket, metrics on.

`tokenize` is routed ["NPU", "CPU"] and this host has no NPU: jobs must still run, on CPU.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as paho
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from edge.jobs import job_key
from edgectl.client import DeviceClient
from tests.ops.secure import (
    DEVICES,
    ROOT,
    SecureMosquitto,
    SecureRedis,
    free_port_pair,
    spawn,
    wait_for,
    write_secrets,
)
from workers.tokenize.prepare import VERSION as TOKENIZER_VERSION

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class NotifySocket:
    """What systemd sees of a Type=notify service: the datagrams it sends."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return self.messages

    def wait_for(self, field: str, timeout: float) -> str:
        return wait_for(lambda: next((m for m in self.drain() if field in m.split("\n")), None),
                        timeout, f"no {field} on {self.path}: {self.messages}")


class Gateway:
    def __init__(self, tmp, bundles, keyring_file) -> None:
        self.tmp = tmp
        self.mqtt_pw = {u: secrets.token_hex(12) for u in ("edge-agent", *DEVICES)}
        self.redis_pw = {u: secrets.token_hex(12) for u in ("edge-agent", "edge-worker")}
        files = write_secrets(tmp, {"mqtt-agent": self.mqtt_pw["edge-agent"],
                                    "redis-agent": self.redis_pw["edge-agent"],
                                    "redis-worker": self.redis_pw["edge-worker"]})
        self.broker = SecureMosquitto(tmp / "mosquitto", self.mqtt_pw).start()
        self.redis = SecureRedis(tmp / "redis", self.redis_pw).start()
        self.metrics_port = free_port_pair()
        self.config = tmp / "edge.toml"
        self.config.write_text(f"""
node = "secure-gw"
bundle_dir = "{bundles}"
log_format = "json"
metrics_port = {self.metrics_port}

[keyring]
file = "{keyring_file}"
env = "EDGE_TEST_NO_KEYRING_ENV"

[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
client_id = "agent-secure-gw"
username = "edge-agent"
password_file = "{files['mqtt-agent']}"
tls_ca = "{self.broker.certs['ca']}"

[redis]
url = "{self.redis.url()}"
username = "edge-agent"
password_file = "{files['redis-agent']}"

[redis.worker]
username = "edge-worker"
password_file = "{files['redis-worker']}"

[tasks.tokenize]
devices = ["NPU", "CPU"]

[tasks.detokenize]
devices = ["CPU"]
""")
        self.admin = self.redis.client()
        self.notify = {n: NotifySocket(tmp / f"{n}.notify") for n in ("agent", "worker")}
        watchdog = {"WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
        self.worker = spawn("workers.worker", "--device", "CPU", config=self.config,
                            log=tmp / "worker.log",
                            env={"NOTIFY_SOCKET": self.notify["worker"].path, **watchdog})
        self.agent = spawn("edge.agent", config=self.config, log=tmp / "agent.log",
                           env={"NOTIFY_SOCKET": self.notify["agent"].path, **watchdog})
        for name, proc in (("worker", self.worker), ("agent", self.agent)):
            try:
                wait_for(lambda: proc.poll() is not None or "READY=1" in "\n".join(
                    self.notify[name].drain()).split("\n"), 120, f"{name} READY=1")
                if proc.poll() is not None:
                    raise TimeoutError
            except TimeoutError:
                raise RuntimeError(f"{name} not ready (exit {proc.poll()}):\n"
                                   + self.log(f"{name}.log")) from None

    def log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def device(self, device_id: str) -> DeviceClient:
        return DeviceClient("127.0.0.1", self.broker.port, device_id=device_id,
                            username=device_id, password=self.mqtt_pw[device_id],
                            tls_ca=str(self.broker.certs["ca"]))  # `with` connects

    def scrape(self, port: int) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> None:
        for proc in (self.worker, self.agent):
            if proc.poll() is None:
                proc.terminate()
        for proc in (self.worker, self.agent):
            try:
                proc.wait(20)
            except Exception:  # noqa: BLE001 - teardown must reach the servers
                proc.kill()
        self.broker.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tokenizer_bundles, keyring_file):
    gw = Gateway(tmp_path_factory.mktemp("secure"), tokenizer_bundles, keyring_file)
    yield gw
    gw.stop()


def test_agent_serves_jobs_end_to_end_over_tls_with_acl_users(gateway):
    with gateway.device("dev-a") as dev:
        reply = dev.request("tokenize", text="over tls", request_id="tls-1", timeout=30)
    assert reply.topic == "edge/results/dev-a/tls-1"
    assert reply.ok, reply.body


def test_edgectl_submit_reaches_the_hardened_broker_as_a_device(gateway, tmp_path):
    password = tmp_path / "dev-a.password"
    password.write_text(gateway.mqtt_pw["dev-a"] + "\n")
    os.chmod(password, 0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "edgectl.cli", "--config", str(gateway.config), "submit",
         "tokenize", "hello over tls", "--device-id", "dev-a", "--password-file", str(password),
         "--timeout", "30"], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = json.loads(proc.stdout)
    assert body["status"] == "ok" and body["result"]["ids"][0] == 101


def test_job_routed_to_an_absent_npu_runs_on_cpu(gateway):
    with gateway.device("dev-a") as dev:
        reply = dev.request("tokenize", text="route around", request_id="npu-1", timeout=30)
    assert reply.ok, reply.body
    assert gateway.admin.zscore("rq:finished:edge.tokenize.CPU", job_key("dev-a", "tokenize", "npu-1"))
    assert gateway.admin.llen("rq:queue:edge.tokenize.NPU") == 0


def test_device_cannot_publish_jobs_as_another_device(gateway):
    with gateway.device("dev-a") as a, gateway.device("dev-b") as b:
        # dev-a writes into dev-b's job topic: the broker drops it (ACL), nobody answers.
        a.client.publish("edge/jobs/tokenize/dev-b", json.dumps({"id": "forged", "text": "x"}),
                         qos=1).wait_for_publish(5)
        with pytest.raises(TimeoutError):
            b.wait("forged", timeout=3)
        assert not gateway.admin.exists(f"rq:job:{job_key('dev-b', 'tokenize', 'forged')}")
        assert b.request("tokenize", text="mine", timeout=30).ok  # dev-b itself still may


def test_device_cannot_read_another_devices_results(gateway):
    seen: list[str] = []
    spy = paho.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=paho.MQTTv5)
    spy.username_pw_set("dev-a", gateway.mqtt_pw["dev-a"])
    spy.tls_set(ca_certs=str(gateway.broker.certs["ca"]))
    spy.on_message = lambda c, u, m: seen.append(m.topic)
    granted = threading.Event()
    codes: list = []
    spy.on_subscribe = lambda c, u, mid, rc, p: (codes.extend(rc), granted.set())
    spy.connect("127.0.0.1", gateway.broker.port)
    spy.loop_start()
    try:
        spy.subscribe("edge/results/dev-b/#", qos=1)
        assert granted.wait(5)
        with gateway.device("dev-b") as b:
            assert b.request("tokenize", text="private", request_id="priv-1", timeout=30).ok
        time.sleep(0.5)
    finally:
        spy.disconnect()
        spy.loop_stop()
    # mosquitto 2.0 grants the SUBSCRIBE and applies the read ACL to each delivery instead.
    assert codes
    assert seen == []


def test_plaintext_connection_is_refused(gateway):
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=paho.MQTTv5)
    c.username_pw_set("dev-a", gateway.mqtt_pw["dev-a"])
    with pytest.raises((OSError, ssl.SSLError, ConnectionError)):
        c.connect("127.0.0.1", gateway.broker.port, keepalive=5)
        # Some paths only fail on the first read: a TLS server never answers MQTT CONNECT.
        c.loop_start()
        ok = threading.Event()
        c.on_connect = lambda *a: ok.set()
        if not ok.wait(3):
            raise ConnectionError("no CONNACK over plaintext")
    c.loop_stop()


def test_wrong_password_is_refused(gateway):
    dev = DeviceClient("127.0.0.1", gateway.broker.port, device_id="dev-a", username="dev-a",
                       password="wrong", tls_ca=str(gateway.broker.certs["ca"]))
    try:  # a CONNACK that refuses, not a silence: a timeout would pass a dead broker too
        with pytest.raises(ConnectionRefusedError, match="Not authorized"):
            dev.connect(timeout=30)
    finally:
        dev.close()
    with gateway.device("dev-a") as right:  # the same identity with its password gets in
        assert right.client.is_connected()


def test_worker_redis_user_cannot_flush_configure_or_list_keys(gateway):
    worker = gateway.redis.client("edge-worker")
    assert worker.ping()
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"),
                    ("XREADGROUP", "GROUP", "agents", "w", "STREAMS",
                                                  "edge:outbox", ">")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.execute_command(*command)
    with pytest.raises(redis.exceptions.ResponseError):  # refused by ACL or by Redis itself
        worker.execute_command("DEBUG", "SLEEP", "0")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.set("not-ours", 1)  # keys outside rq:* and edge:*
    agent = gateway.redis.client("edge-agent")
    with pytest.raises(redis.exceptions.NoPermissionError):
        agent.flushall()
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        redis.Redis(unix_socket_path=str(gateway.redis.socket)).ping()  # default user is off


def test_metrics_of_agent_and_worker_move_after_a_job(gateway):
    agent_port, worker_port = gateway.metrics_port, gateway.metrics_port + 1
    ok = ("edge_jobs_total", (("device", "CPU"), ("model", "all-minilm-l6-v2"), ("status", "ok"),
                              ("task", "tokenize"), ("version", TOKENIZER_VERSION)))
    sub = ("edge_jobs_submitted_total", (("device", "CPU"), ("task", "tokenize")))
    e2e = ("edge_job_end_to_end_seconds_count", (("status", "ok"), ("task", "tokenize")))
    before_w, before_a = gateway.scrape(worker_port), gateway.scrape(agent_port)
    with gateway.device("dev-b") as dev:
        assert dev.request("tokenize", text="count me", timeout=30).ok
    after_w = gateway.scrape(worker_port)
    assert after_w[ok] == before_w.get(ok, 0) + 1
    assert after_w[("edge_job_run_seconds_count", (("device", "CPU"), ("model", "all-minilm-l6-v2"),
                                                   ("task", "tokenize"),
                                                   ("version", TOKENIZER_VERSION)))] >= 1
    assert after_w[("edge_models_ready", (("device", "CPU"), ("task", "tokenize")))] == 1
    assert after_w[("edge_model_load_seconds", (("device", "CPU"), ("task", "tokenize")))] > 0
    after_a = wait_for(lambda: (s := gateway.scrape(agent_port)).get(e2e, 0) > before_a.get(e2e, 0)
                       and s, 10, "end-to-end histogram did not move")
    assert after_a[sub] == before_a.get(sub, 0) + 1
    assert ("edge_outbox_length", ()) in after_a


def test_status_topic_carries_the_summary_figures(gateway):
    got: dict = {}
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="status-reader", protocol=paho.MQTTv5)
    c.username_pw_set("dev-a", gateway.mqtt_pw["dev-a"])
    c.tls_set(ca_certs=str(gateway.broker.certs["ca"]))

    def on_message(client, userdata, msg):
        body = json.loads(msg.payload)
        if body.get("online") and "submitted" in body:
            got.update(body)
            done.set()

    c.on_message = on_message
    c.connect("127.0.0.1", gateway.broker.port)
    c.subscribe("edge/status/secure-gw", qos=1)
    c.loop_start()
    try:
        assert done.wait(25), "no status with summary figures"
    finally:
        c.disconnect()
        c.loop_stop()
    assert {"submitted", "rejected", "busy", "outbox", "outbox_oldest_s"} <= set(got)
    assert got["queues"]["edge.tokenize.NPU"]["workers"] == 0
    assert got["queues"]["edge.tokenize.CPU"]["workers"] >= 1


def test_both_processes_notify_systemd_and_feed_the_watchdog(gateway):
    for name in ("agent", "worker"):
        sock = gateway.notify[name]
        sock.wait_for("WATCHDOG=1", 10)
        assert any(m.startswith("READY=1") for m in sock.messages)
