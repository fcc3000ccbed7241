"""A small paho-mqtt wrapper: connect (MQTT 5, persistent session), subscribe, publish-and-wait.

Protocol rules live in `edge.protocol`; this module only moves bytes, and says what the broker
made of them: a PUBACK with a failure reason code is a refusal, not a delivery (paho reports it
only to `on_publish` and marks the message published all the same). Every callback is wrapped
so that an exception is logged instead of silently killing paho's network loop.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode

from edge import constants as C
from edge.config import MqttConfig
from edge.protocol import Outgoing, Properties, user_properties

log = structlog.get_logger("edge.mqtt")



@dataclass(frozen=True, slots=True)
class Incoming:
    """A message the broker delivered to us; `mid` and `qos` are what its PUBACK needs."""

    topic: str
    payload: bytes
    props: Properties
    mid: int
    qos: int


# handler(message) on paho's network thread -> True: acknowledge it now; False: never (the
# broker sends it again after a reconnect); None: the handler took it and acknowledges it later
# with `MqttClient.ack`, from any thread
MessageHandler = Callable[[Incoming], "bool | None"]

# The failure reason codes MQTT 5 allows in a PUBACK (spec 3.4.2.1), and PACKET_TOO_LARGE, which
# it does not (paho takes a PUBACK carrying it for a malformed packet and drops the connection):
# we use it for a message we do not send because the broker's Maximum Packet Size forbids it.
UNSPECIFIED_ERROR = 0x80
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
NOT_AUTHORIZED = 0x87
TOPIC_NAME_INVALID = 0x90
PACKET_ID_IN_USE = 0x91
PACKET_TOO_LARGE = 0x95
QUOTA_EXCEEDED = 0x97
PAYLOAD_FORMAT_INVALID = 0x99

# Worth sending again later: a full quota and a packet id mix-up pass; the two catch-all codes
# say nothing of the message itself, so it is kept rather than lost on a guess. The others
# (0x87, 0x90, 0x99, too large) refuse these very bytes on this topic: the same message never
# gets through.
RETRYABLE = frozenset({UNSPECIFIED_ERROR, IMPLEMENTATION_SPECIFIC_ERROR, PACKET_ID_IN_USE,
                       QUOTA_EXCEEDED})


@dataclass(frozen=True, slots=True)
class Refused:
    """A message the broker refused (a failure PUBACK) or would refuse (too large), or paho
    refused outright (`reason` None)."""

    reason: int | None  # MQTT 5 reason code
    detail: str  # what was refused and why, fit for a log line and a client's error message

    @property
    def retryable(self) -> bool:
        """True when the same message may get through later (see RETRYABLE)."""
        return self.reason in RETRYABLE


# Per message, what `publish_many` made of it: True delivered (PUBACK success), False not yet
# (no PUBACK in time: paho still holds it), or a refusal.
Outcome = bool | Refused


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
            # paho types it as a SocketLike; a TCP client's is a real socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
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


def publish_packet_size(msg: Outgoing) -> int:
    """Bytes of the MQTT 5 PUBLISH packet for `msg` (see `packet_size`)."""
    return packet_size(msg.topic, msg.payload, msg.qos, to_paho(msg.properties))


def packet_size(topic: str, payload: bytes, qos: int, props: PahoProperties | None) -> int:
    """Bytes of an MQTT 5 PUBLISH packet, as a broker's Maximum Packet Size counts them."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    remaining += len(props.pack()) if props is not None else 1  # 1: an empty property length
    length_bytes = 1 + (remaining >= 1 << 7) + (remaining >= 1 << 14) + (remaining >= 1 << 21)
    return 1 + length_bytes + remaining


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


class Client(paho.Client):
    """paho's client, except that a publish is written to the socket by the thread that
    publishes, not handed to paho's network thread.

    With `loop_start`, paho queues every outgoing packet and wakes its network thread to write
    it: one thread switch more on the path of every job and every answer. Here the publishing
    thread writes what is queued at once. A lock keeps the two writers apart, so a packet
    written in parts is finished before the next one starts; what a full socket buffer leaves
    over is paho's network thread's to write, and it is woken for it (it may have gone to
    sleep while the packet was out of its queue, in our hands). Publishes made inside paho's
    callbacks are left to paho, as before, and so is every write over TLS: an SSL connection
    must not be written by one thread while another reads it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = threading.Lock()

    def loop_write(self) -> paho.MQTTErrorCode:
        with self._write_lock:
            return super().loop_write()

    def publish(self, *args, **kwargs) -> paho.MQTTMessageInfo:
        info = super().publish(*args, **kwargs)
        self._write_now()
        return info

    def ack(self, mid: int, qos: int) -> paho.MQTTErrorCode:
        """paho's manual acknowledgement, written at once like `publish` (a thread that
        acknowledges a batch of stored jobs is not paho's)."""
        rc = super().ack(mid, qos)
        self._write_now()
        return rc

    def _write_now(self) -> None:
        """Write what is queued from this thread, unless it is paho's own (`_thread`, None
        without loop_start) or the socket is not one we may write from here."""
        if (self.is_connected()
                and threading.current_thread() is not getattr(self, "_thread", None)
                and writes_directly(self.socket())):
            self.loop_write()
            if self.want_write():
                self._wake_network_thread()

    def _wake_network_thread(self) -> None:
        # the byte paho's own publish writes to make its network thread look at the socket
        wake = getattr(self, "_sockpairW", None)
        if wake is not None:
            try:
                wake.send(b"0")
            except OSError:  # full: a wake-up is pending already; closed: stopping
                pass


def writes_directly(sock: object) -> bool:
    """Whether a publishing thread may write to `sock` itself: a plain TCP socket, not TLS (an
    SSL object is not safe to write from one thread while another reads) nor a websocket."""
    return isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)


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
        self.max_packet_size: int | None = None  # the broker's, from its last CONNACK (MQTT 5)
        # QoS 1 messages the broker takes unacknowledged at once (its CONNACK Receive Maximum;
        # MQTT's default when it names none). paho ignores it and cannot change its own limit on
        # an open connection, so `publish_many` keeps to it.
        self.receive_maximum = C.MQTT_RECEIVE_MAXIMUM
        self._lock = threading.Lock()
        self._refused: dict[int, ReasonCode] = {}  # mid -> failure reason of its PUBACK
        # QoS 1 messages paho holds (and resends on every reconnect) that no PUBACK settled yet:
        # a retry waits for that copy instead of queueing another. (One published while the link
        # was down is left out: paho's info for it never tells when it went; a second copy is
        # harmless, devices dedupe.) Used by the relay's thread only.
        self._in_flight: dict[Outgoing, paho.MQTTMessageInfo] = {}
        c = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                   manual_ack=True)
        c.max_inflight_messages_set(C.MQTT_MAX_IN_FLIGHT)
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
        c.on_publish = _guarded(self._on_publish)
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
        self._in_flight.clear()

    def ack(self, msg: Incoming) -> None:
        """Acknowledge a message a handler took (returned None for); harmless after a
        reconnect (the broker ignores a PUBACK of an id it does not hold)."""
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def packet_limit(self) -> int:
        """The largest PUBLISH packet the broker takes: its Maximum Packet Size, else MQTT's."""
        return self.max_packet_size or C.MQTT_MAX_PACKET_BYTES

    # -- publishing

    def publish(self, msg: Outgoing, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=retain,
                                   properties=to_paho(msg.properties))

    def publish_many(self, messages: list[Outgoing], timeout: float) -> list[Outcome | None]:
        """Publish all, then wait for each PUBACK (QoS 0 counts as done once sent).

        At most the broker's Receive Maximum go out unacknowledged: past it, the next window
        waits for the PUBACKs of the one before (a broker may disconnect a client that exceeds
        it). Those not sent before `timeout` come back False. A message past the broker's packet
        limit is refused here, never sent: the broker would drop the connection and paho would
        send it again on every reconnect, forever. A message paho still holds from an earlier
        call is waited for, not published again.
        """
        deadline = time.monotonic() + timeout
        window = max(1, min(self.receive_maximum, C.MQTT_MAX_IN_FLIGHT))
        outcomes: list[Outcome | None] = []
        for start in range(0, len(messages), window):
            chunk = messages[start : start + window]
            if start and time.monotonic() >= deadline:
                outcomes += [False] * len(chunk)
                continue
            outcomes += self._publish_window(chunk, deadline)
        return outcomes

    def publish_once(self, msg: Outgoing, timeout: float, retain: bool = False) -> Outcome:
        """Publish one message (retained if asked) and wait for its PUBACK: True, False (none
        in time) or a `Refused` (paho's `publish` alone reports a refusal to no one)."""
        too_large = self._too_large(msg)
        if too_large is not None:
            return too_large
        info = self.publish(msg, retain=retain)
        if not msg.qos:
            return True
        return self._outcome(msg, info, time.monotonic() + timeout)

    def _publish_window(self, messages: list[Outgoing], deadline: float) -> list[Outcome]:
        sent: list[paho.MQTTMessageInfo | Refused] = []
        for m in messages:
            held = self._in_flight.get(m) if m.qos else None
            if held is not None:
                sent.append(held)
                continue
            too_large = self._too_large(m)
            if too_large is not None:
                sent.append(too_large)
                continue
            try:
                info = self.publish(m)
            except (ValueError, TypeError) as exc:
                sent.append(Refused(None, f"the MQTT client refused it: {exc}"))
                continue
            if m.qos and info.rc == paho.MQTT_ERR_SUCCESS:
                self._in_flight[m] = info
            sent.append(info)
        return [s if isinstance(s, Refused) else self._outcome(m, s, deadline)
                for m, s in zip(messages, sent, strict=True)]

    def _too_large(self, msg: Outgoing) -> Refused | None:
        """The refusal of a message past the broker's packet limit (never sent), else None."""
        size, limit = publish_packet_size(msg), self.packet_limit()
        if size <= limit:
            return None
        return Refused(PACKET_TOO_LARGE, f"{size} bytes as an MQTT packet; the broker accepts "
                                         f"at most {limit}")

    def _outcome(self, msg: Outgoing, info: paho.MQTTMessageInfo, deadline: float) -> Outcome:
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                return False
        except (RuntimeError, ValueError):  # queued while disconnected: sent on reconnect
            return False
        self._in_flight.pop(msg, None)
        with self._lock:
            reason = self._refused.pop(info.mid, None)
        if reason is None:
            return True
        return Refused(reason.value, f"the broker answered PUBACK 0x{reason.value:02x} "
                                     f"({reason})")

    # -- callbacks (run on paho's network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("mqtt_connect_refused", reason=str(reason_code))
            return
        no_delay(client)
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        self.receive_maximum = getattr(properties, "ReceiveMaximum", C.MQTT_RECEIVE_MAXIMUM)
        log.info("mqtt_connected", host=self.cfg.host, port=self.cfg.port,
                 session_present=getattr(flags, "session_present", None),
                 max_packet_size=self.max_packet_size, receive_maximum=self.receive_maximum)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        if self.on_connected:
            self.on_connected()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Runs before paho marks the message published, so `_outcome` finds the reason. A later
        # PUBACK for the same (reused) mid overwrites or clears it.
        with self._lock:
            if reason_code.is_failure:
                self._refused[mid] = reason_code
            else:
                self._refused.pop(mid, None)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        log.warning("mqtt_disconnected", reason=str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:
        ack: bool | None = True
        try:
            if self.handler is not None:
                ack = self.handler(Incoming(msg.topic, msg.payload, from_paho(msg.properties),
                                            msg.mid, msg.qos))
        finally:
            if ack and msg.qos > 0:
                client.ack(msg.mid, msg.qos)
