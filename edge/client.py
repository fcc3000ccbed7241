"""A device-side MQTT client: publish one job, wait for its answer (used by `edgectl submit`,
the demo, the tests and the benchmarks). It speaks the public protocol only."""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from edge import constants as C
from edge.mqtt import no_delay


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer as a device sees it: the JSON body, raw media (MQTT 5 raw form), progress."""

    body: Mapping[str, Any]
    media: tuple[tuple[str, bytes], ...] = ()
    progress: tuple[Mapping[str, Any], ...] = ()
    topic: str = ""
    received: float = 0.0  # time.perf_counter() when the answer arrived

    @property
    def ok(self) -> bool:
        return self.body.get("status") == "ok"


@dataclass
class DeviceClient:
    """One device's connection to the broker."""

    host: str
    port: int
    device_id: str = "demo-device"
    username: str | None = None
    password: str | None = None
    protocol: int = paho.MQTTv5
    tls_ca: str | None = None
    session_expiry: int = 0  # > 0: a persistent session that keeps answers while away
    _inbox: dict[str, queue.Queue] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        suffix = "" if self.session_expiry else f"-{uuid.uuid4().hex[:8]}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"{self.device_id}{suffix}", protocol=self.protocol,
                                  clean_session=None if self.protocol == paho.MQTTv5 else True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        if self.tls_ca:
            self.client.tls_set(ca_certs=self.tls_ca)
        self.client.enable_logger(logging.getLogger("edge.client.paho"))
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self._suback: set[int] = set()
        self._suback_cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, *_: object) -> None:
        no_delay(client)
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._suback_cond:
            self._suback.add(mid)
            self._suback_cond.notify_all()

    def connect(self, timeout: float = 30.0) -> DeviceClient:
        """Connect, then subscribe to this device's results and progress (both confirmed).

        Idempotent: `with daemon.device(...)` may enter an already connected client.
        """
        if self._connected.is_set():
            return self
        if self.protocol == paho.MQTTv5:
            props = PahoProperties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
            self.client.connect(self.host, self.port, keepalive=30,
                                clean_start=self.session_expiry == 0, properties=props)
        else:
            self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {timeout} s")
        topics = [(f"edge/results/{self.device_id}/#", 1), (f"edge/progress/{self.device_id}/#", 1)]
        _, mid = self.client.subscribe(topics)
        with self._suback_cond:
            if not self._suback_cond.wait_for(lambda: mid in self._suback, timeout):
                raise TimeoutError(f"broker did not confirm the subscriptions of {self.device_id}")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> DeviceClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _box(self, request_id: str) -> queue.Queue:
        with self._lock:
            return self._inbox.setdefault(request_id, queue.Queue())

    def _on_message(self, client, userdata, msg) -> None:
        parts = msg.topic.split("/")
        if len(parts) >= 4 and parts[0] == "edge":
            self._box(parts[3]).put((parts[1], msg, time.perf_counter()))
        else:  # a response topic of our own: the request id is in the correlation data
            corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
            self._box((corr or b"").decode("ascii", "replace")).put(
                ("results", msg, time.perf_counter()))

    # -- sending

    def publish_envelope(self, task: str, envelope: Mapping[str, Any], qos: int = 1) -> None:
        topic = C.JOB_TOPIC.format(task=task, device_id=self.device_id)
        self.client.publish(topic, json.dumps(envelope), qos=qos).wait_for_publish(10)

    def publish_raw(self, task: str, payload: bytes, request_id: str, *,
                    content_type: str | None = None, params: Mapping[str, Any] | None = None,
                    response_topic: str | None = None, qos: int = 1) -> None:
        props = PahoProperties(PacketTypes.PUBLISH)
        props.CorrelationData = request_id.encode()
        if content_type:
            props.ContentType = content_type
        if response_topic:
            props.ResponseTopic = response_topic
        if params:
            props.UserProperty = [(k, _prop(v)) for k, v in params.items()]
        topic = C.JOB_TOPIC.format(task=task, device_id=self.device_id)
        self.client.publish(topic, payload, qos=qos, properties=props).wait_for_publish(10)

    def wait(self, request_id: str, timeout: float = 60.0) -> Reply:
        """The answer to `request_id` (progress notes collected on the way)."""
        box = self._box(request_id)
        progress = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {request_id} within {timeout} s")
            try:
                kind, msg, at = box.get(timeout=left)
            except queue.Empty:
                continue
            if kind == "progress":
                progress.append(json.loads(msg.payload))
                continue
            return _reply(msg, tuple(progress), at)

    def request(self, task: str, *, text: Any = None, ids: Any = None,
                data: bytes | Sequence[bytes] | None = None, params: Mapping[str, Any] | None = None,
                request_id: str | None = None, timeout: float = 60.0) -> Reply:
        """Send one envelope job and wait for its answer."""
        rid = request_id or uuid.uuid4().hex
        env: dict[str, Any] = {"id": rid}
        if params:
            env["params"] = dict(params)
        if text is not None:
            env["text"] = text
        if ids is not None:
            env["ids"] = ids
        if data is not None:
            env["data"] = ([base64.b64encode(d).decode() for d in data]
                           if isinstance(data, (list, tuple)) else base64.b64encode(data).decode())
        self.publish_envelope(task, env)
        return self.wait(rid, timeout)


def _prop(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool) else str(v)


def _reply(msg, progress: tuple, at: float) -> Reply:
    props = msg.properties
    ctype = getattr(props, "ContentType", None) if props else None
    if ctype and ctype != "application/json":
        user = dict(getattr(props, "UserProperty", []) or [])
        body = {"id": user.get("id"), "task": user.get("task"), "status": user.get("status"),
                "result": json.loads(user.get("result", "{}"))}
        if "timings" in user:
            body["timings"] = json.loads(user["timings"])
        return Reply(body, ((ctype, bytes(msg.payload)),), progress, msg.topic, at)
    body = json.loads(msg.payload)
    media = tuple((m["content_type"], base64.b64decode(m["data"]))
                  for m in body.get("result", {}).get("media", []) or [])
    return Reply(body, media, progress, msg.topic, at)
