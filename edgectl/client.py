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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode

from edge import constants as C
from edge.mqtt import Client, no_delay, packet_size


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


PACKET_TOO_LARGE = 0x95  # the MQTT 5 reason code


class PublishRefused(ValueError):
    """A job the broker refused (a PUBACK failure code) or would refuse (too big for it)."""

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


@dataclass
class DeviceClient:
    """One device's connection to the broker.

    Its subscriptions (those made through `subscribe`) are made again on every reconnect: a
    broker that lost the session (restart without its state, expiry, a clean start) forgot them.
    """

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
        self.client = Client(CallbackAPIVersion.VERSION2,
                             client_id=f"{self.device_id}{suffix}", protocol=self.protocol,
                             clean_session=None if self.protocol == paho.MQTTv5 else True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        if self.tls_ca:
            self.client.tls_set(ca_certs=self.tls_ca)
        self.client.enable_logger(logging.getLogger("edgectl.client.paho"))
        self.client.on_message = self._on_message
        self._connack = threading.Event()
        self._connected = threading.Event()
        self._connect_refused: str | None = None  # the reason of the last refused CONNACK
        self._max_packet_size: int | None = None  # announced in CONNACK (MQTT 5)
        self._subscriptions: dict[str, int] = {}  # topic -> qos, made again on reconnect
        self._suback: set[int] = set()
        self._suback_cond = threading.Condition()
        self._pending: dict[int, str] = {}  # mid -> request id, still waiting for its PUBACK
        self._refused: dict[int, ReasonCode] = {}  # mid -> failure PUBACK nobody waited for
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connect_refused = str(reason_code)
            self._connack.set()
            return
        no_delay(client)
        self._connect_refused = None
        self._max_packet_size = getattr(properties, "MaximumPacketSize", None)
        with self._lock:
            topics = list(self._subscriptions.items())
        if topics:  # even with a session present: a subscribe sent while away never got there
            client.subscribe(topics)
        self._connected.set()
        self._connack.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._suback_cond:
            self._suback.add(mid)
            self._suback_cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            request_id = self._pending.pop(mid, None)
            if not reason_code.is_failure:
                self._refused.pop(mid, None)
                return
            if request_id is None:  # still in `_publish`, or published on `self.client`
                self._refused[mid] = reason_code
                return
        self._box(request_id).put(("refused", _refused_error(request_id, reason_code),
                                   time.perf_counter()))

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
        if not self._connack.wait(timeout):
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {timeout} s")
        if self._connect_refused is not None:
            raise ConnectionRefusedError(
                f"{self.host}:{self.port} refused {self.device_id}: {self._connect_refused}")
        self.subscribe(f"edge/results/{self.device_id}/#", f"edge/progress/{self.device_id}/#",
                       timeout=timeout)
        return self

    def subscribe(self, *topics: str, qos: int = 1, timeout: float = 30.0) -> None:
        """Subscribe (confirmed by the broker); kept, and made again on every reconnect.

        Subscribe to a response topic here, not on `self.client`, for it to survive a broker
        that lost the session.
        """
        with self._lock:
            self._subscriptions.update(dict.fromkeys(topics, qos))
        _, mid = self.client.subscribe([(t, qos) for t in topics])
        with self._suback_cond:
            if not self._suback_cond.wait_for(lambda: mid in self._suback, timeout):
                raise TimeoutError(f"broker did not confirm the subscriptions of {self.device_id}")

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

    def answers_so_far(self, request_id: str) -> list[dict]:
        """The JSON bodies of the answers to `request_id` received since the last call, without
        waiting (progress notes are skipped): for counting answers per id."""
        box = self._box(request_id)
        out: list[dict] = []
        while True:
            try:
                kind, msg, _ = box.get_nowait()
            except queue.Empty:
                return out
            if kind == "progress":
                continue
            if kind == "refused":
                raise msg
            out.append(json.loads(msg.payload))

    def _on_message(self, client, userdata, msg) -> None:
        # edge/<results|progress>/<device>/<request id>, or a response topic of our own: every
        # answer names its request (the JSON body's "id", or an "id" user property)
        at = time.perf_counter()
        parts = msg.topic.split("/")
        ours = len(parts) >= 4 and parts[0] == "edge"
        request_id = _answer_id(msg) or (parts[3] if ours else "")
        self._box(request_id).put((parts[1] if ours else "results", msg, at))

    # -- sending

    def publish_envelope(self, task: str, envelope: Mapping[str, Any], qos: int = 1) -> None:
        """Publish one envelope job; raises `PublishRefused` when the broker will not take it."""
        topic = C.JOB_TOPIC.format(task=task, device_id=self.device_id)
        self._publish(topic, json.dumps(envelope).encode(), str(envelope.get("id")), qos)

    def publish_raw(self, task: str, payload: bytes, request_id: str, *,
                    content_type: str | None = None, params: Mapping[str, Any] | None = None,
                    response_topic: str | None = None, qos: int = 1) -> None:
        """Publish one raw MQTT 5 job (the request id as correlation data); see `subscribe`
        for a response topic."""
        props = PahoProperties(PacketTypes.PUBLISH)
        props.CorrelationData = request_id.encode()
        if content_type:
            props.ContentType = content_type
        if response_topic:
            props.ResponseTopic = response_topic
        if params:
            props.UserProperty = [(k, _prop(v)) for k, v in params.items()]
        topic = C.JOB_TOPIC.format(task=task, device_id=self.device_id)
        self._publish(topic, payload, request_id, qos, props)

    def _publish(self, topic: str, payload: bytes, request_id: str, qos: int,
                 props: PahoProperties | None = None) -> None:
        """Publish and wait for the PUBACK (up to PUBACK_TIMEOUT); a refusal raises.

        A job past the broker's Maximum Packet Size is refused here: sent, it would make the
        broker drop the connection, and paho would send it again on every reconnect, forever.
        A refusal that comes after the wait is handed to `wait()` instead.
        """
        limit = self._max_packet_size
        if limit and self.protocol == paho.MQTTv5:
            size = packet_size(topic, payload, qos, props)
            if size > limit:
                raise PublishRefused(
                    f"job {request_id!r} is {size} bytes as an MQTT packet; the broker takes "
                    f"at most {limit} (send less, or ask the gateway to raise max_packet_size)",
                    PACKET_TOO_LARGE)
        info = self.client.publish(topic, payload, qos=qos, properties=props)
        info.wait_for_publish(C.PUBACK_TIMEOUT)
        with self._lock:
            refused = self._refused.pop(info.mid, None)
            if refused is None and not info.is_published():
                self._pending[info.mid] = request_id
        if refused is not None:
            raise _refused_error(request_id, refused)

    def wait(self, request_id: str, timeout: float = 60.0,
             on_progress: Callable[[Mapping[str, Any]], None] | None = None) -> Reply:
        """The answer to `request_id` (progress notes collected on the way, and handed to
        `on_progress` as they come).

        Raises `PublishRefused` when the broker refused the job, `TimeoutError` past `timeout`.
        """
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
                if on_progress is not None:
                    on_progress(progress[-1])
                continue
            if kind == "refused":
                raise msg
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
            env["data"] = (base64.b64encode(data).decode() if isinstance(data, bytes)
                           else [base64.b64encode(d).decode() for d in data])
        self.publish_envelope(task, env)
        return self.wait(rid, timeout)


def _refused_error(request_id: str, reason: ReasonCode) -> PublishRefused:
    return PublishRefused(f"the broker refused job {request_id!r}: {reason} "
                          f"(reason code 0x{reason.value:02x})", reason.value)


def _answer_id(msg) -> str | None:
    user = dict(getattr(msg.properties, "UserProperty", None) or []) if msg.properties else {}
    if "id" in user:
        return user["id"]
    try:
        body = json.loads(msg.payload)
    except ValueError:
        return None
    rid = body.get("id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else None


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
