"""A sample of generated messages through the real stack: every one that has somewhere to be
answered is answered, and the agent and worker are still running afterwards."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import load
from edgectl.localdaemon import Daemon
from edge.mqtt import from_paho, to_paho
from edge.protocol import Rejected, parse
from edge.tasks import TASKS
from tests.faults.helpers import collect
from tests.fuzz.strategies import payloads, plausible, properties

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICE = "fz"
SAMPLE = 200


def _sample() -> list:
    out: list = []
    hostile = st.tuples(st.sampled_from(sorted(TASKS) + ["nosuch"]).map(
        lambda t: f"edge/jobs/{t}/{DEVICE}"), payloads, properties)

    @settings(max_examples=20 * SAMPLE, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(plausible(DEVICE), hostile))
    def draw(message):
        out.append(message)

    draw()
    return [m for m in out if _broker_accepts(m[2])]


def _broker_accepts(props) -> bool:
    """Keep to properties Mosquitto forwards (it drops a sender over a wildcard response topic
    and over strings it refuses; the parse fuzz covers those properties without a broker)."""
    strings = [props.content_type or "", props.response_topic or "",
               *(s for pair in props.user_properties for s in pair)]
    if props.response_topic is not None and (not props.response_topic
                                             or set(props.response_topic) & set("+#")):
        return False
    return all(0x20 <= ord(c) <= 0x7e for s in strings for c in s)


class Sender:
    """Publishes each message from a clean-session connection: a message the broker refuses
    (it drops the connection, e.g. over a wildcard in the response topic) must not poison
    the device's own session, where paho would resend it on every reconnect."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = None

    def _connect(self):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        c.connect("127.0.0.1", self.port, clean_start=True)
        c.loop_start()
        deadline = time.monotonic() + 10
        while not c.is_connected():
            assert time.monotonic() < deadline, "sender could not connect"
            time.sleep(0.02)
        return c

    def send(self, topic, payload, props) -> bool:
        """True when the broker acknowledged it."""
        if self.client is None or not self.client.is_connected():
            self.close()
            self.client = self._connect()
        try:
            info = self.client.publish(topic, payload, qos=1, properties=to_paho(props))
            info.wait_for_publish(2)
            return info.is_published()
        except (ValueError, TypeError, UnicodeError, RuntimeError):
            return False

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None


def test_generated_messages_through_the_stack_are_each_answered(tmp_path, tokenizer_bundles,
                                                                keyring_file):
    messages = _sample()
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file).start()
    max_bytes = {t: c.max_bytes for t, c in load(d.config).tasks.items()}
    expected: set[str] = set()
    sent_ids: set[str] = set()  # every request id sent, answerable here or not
    try:
        dev = d.device(DEVICE, session_expiry=3600)
        sender = Sender(d.broker.port)
        try:
            sent = 0
            for topic, payload, props in messages:
                if sent == SAMPLE:
                    break
                props = from_paho(to_paho(props))  # what the agent will see (empties dropped)
                try:
                    route = parse(topic, payload, props, max_bytes=max_bytes).route
                except Rejected as exc:
                    route = exc.route
                if route is not None and route.request_id in sent_ids:
                    # one message per id: a repeat is a duplicate of the first (tested
                    # elsewhere) and is answered where the first asked, maybe not here
                    continue
                if route is not None:
                    sent_ids.add(route.request_id)
                sent += 1
                if not sender.send(topic, payload, props):
                    continue  # paho or the broker refused it: it never reached the agent
                if route is not None and route.topic == f"edge/results/{DEVICE}/{route.request_id}":
                    expected.add(route.request_id)
            t_sent = time.monotonic()
            got = collect(dev, sorted(expected), timeout=120, settle=1.0)
            print(f"stack fuzz: {sent} sent, {len(expected)} answerable, "
                  f"answers waited {time.monotonic() - t_sent:.1f} s")
        finally:
            sender.close()
            dev.close()
        alive = d.agent.poll() is None and all(w.poll() is None for w in d.workers)
    finally:
        d.stop()
    missing = sorted(rid for rid, codes in got.items() if not codes)
    assert sent == SAMPLE, f"only {sent} messages the broker accepts were generated"
    assert len(expected) >= SAMPLE // 4, f"only {len(expected)} answerable messages"
    assert not missing, f"{len(missing)} of {len(expected)} unanswered, e.g. {missing[:5]}"
    assert alive, "a generated message took down the agent or the worker"
