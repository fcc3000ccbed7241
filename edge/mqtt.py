"""A small paho-mqtt wrapper: connect (MQTT 5, persistent session), subscribe, publish-and-wait.

Protocol rules live in `edge.protocol`; this module only moves bytes. Every callback is wrapped
so that an exception is logged instead of silently killing paho's network loop.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from typing import Callable

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from edge.config import MqttConfig
from edge.protocol import Outgoing, Properties, user_properties

log = structlog.get_logger("edge.mqtt")

# handler(topic, payload, properties) -> True to acknowledge the message now
MessageHandler = Callable[[str, bytes, Properties], bool]


def _guarded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a raising callback would kill paho's loop silently
            log.exception("mqtt_callback_failed", callback=fn.__name__)
            return None

    return wrapper


def no_delay(client: paho.Client) -> None:
    """Turn off Nagle's algorithm on the client's socket (paho leaves it on).

    With it on, a small PUBLISH that follows our PUBACK waits for the broker's delayed ACK:
    about 40 ms added to every answer.
    """
    sock = client.socket()
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.warning("tcp_nodelay_failed", error=str(exc))


def to_paho(props: Properties) -> PahoProperties | None:
    """paho PUBLISH properties from ours (None when there are none)."""
    if not (props.content_type or props.correlation_data or props.response_topic
            or props.user_properties):
        return None
    out = PahoProperties(PacketTypes.PUBLISH)
    if props.content_type:
        out.ContentType = props.content_type
    if props.correlation_data:
        out.CorrelationData = props.correlation_data
    if props.response_topic:
        out.ResponseTopic = props.response_topic
    if props.user_properties:
        out.UserProperty = list(props.user_properties)
    return out


def from_paho(props: PahoProperties | None) -> Properties:
    """Our properties from a received message's (MQTT 3.1.1 messages have none)."""
    if props is None:
        return Properties()
    return Properties(
        content_type=getattr(props, "ContentType", None),
        correlation_data=getattr(props, "CorrelationData", None),
        response_topic=getattr(props, "ResponseTopic", None),
        user_properties=user_properties(getattr(props, "UserProperty", []) or []),
    )


class MqttClient:
    """One MQTT 5 connection with a persistent session and manual acknowledgement."""

    def __init__(self, cfg: MqttConfig, client_id: str, *, subscriptions: tuple[str, ...] = (),
                 on_message: MessageHandler | None = None,
                 will: tuple[str, bytes] | None = None, password: str | None = None,
                 on_connected: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.subscriptions = subscriptions
        self.handler = on_message
        self.on_connected = on_connected
        self._connected = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=paho.MQTTv5, manual_ack=True)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        if cfg.username:
            c.username_pw_set(cfg.username, password)
        if cfg.tls_ca:
            c.tls_set(ca_certs=str(cfg.tls_ca),
                      certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                      keyfile=str(cfg.tls_key) if cfg.tls_key else None)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = _guarded(self._on_connect)
        c.on_disconnect = _guarded(self._on_disconnect)
        c.on_message = _guarded(self._on_message)
        self.client = c

    # -- lifecycle

    def start(self) -> None:
        """Connect in the background; paho reconnects by itself after any outage."""
        props = PahoProperties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                  clean_start=False, properties=props)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # -- publishing

    def publish(self, msg: Outgoing, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=retain,
                                   properties=to_paho(msg.properties))

    def publish_many(self, messages: list[Outgoing], timeout: float) -> list[bool | None]:
        """Publish all, then wait for each PUBACK (QoS 0 counts as done once sent).

        Per message: True when acknowledged, False when not (yet: retry later), None when
        paho refuses it outright (e.g. past MQTT's size limit: retrying cannot help).
        """
        infos: list[paho.MQTTMessageInfo | None] = []
        for m in messages:
            try:
                infos.append(self.publish(m))
            except (ValueError, TypeError) as exc:
                log.error("mqtt_publish_refused", topic=m.topic, bytes=len(m.payload),
                          error=str(exc))
                infos.append(None)
        deadline = time.monotonic() + timeout
        done: list[bool | None] = []
        for info in infos:
            if info is None:
                done.append(None)
                continue
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                done.append(info.is_published())
            except (RuntimeError, ValueError):
                done.append(False)
        return done

    # -- callbacks (run on paho's network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("mqtt_connect_refused", reason=str(reason_code))
            return
        no_delay(client)
        log.info("mqtt_connected", host=self.cfg.host, port=self.cfg.port,
                 session_present=getattr(flags, "session_present", None))
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        if self.on_connected:
            self.on_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        log.warning("mqtt_disconnected", reason=str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:
        ack = True
        try:
            if self.handler is not None:
                ack = self.handler(msg.topic, msg.payload, from_paho(msg.properties))
        finally:
            if ack and msg.qos > 0:
                client.ack(msg.mid, msg.qos)
