"""The edge agent: the daemon's only MQTT client.

    mqtt messages -> intake -> protocol.parse -> Submission -> Enqueuer (routing included,
                                                                    a batch per round trip) -> RQ jobs
    outbox stream -> OutboxRelay -> protocol.render -> MQTT publish -> XACK
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import deque

import redis
import structlog

from edge import constants as C
from edge import metrics, sdnotify
from edge.config import Config
from edge.errors import Busy, EdgeError, Internal
from edge.jobs import Answer, error_answer
from edge.mqtt import Incoming, MqttClient, Refused
from edge.outbox import Outbox
from edge.protocol import Outgoing, Properties, Rejected, Submission, parse
from edge.queueing import Enqueued, Enqueuer
from edge.reaper import Reaper
from edge.redisconn import connect
from edge.relay import OutboxRelay
from edge.status import node_status

log = structlog.get_logger("edge.agent")

STATUS_PUBACK_WAIT = 5.0  # s the status loop waits to learn whether the broker took it


class Intake:
    """Job messages on their way from paho's thread to the thread that stores them, bounded
    by count and by payload bytes (a lone message of any size is always let in)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._items: deque[Incoming] = deque()
        self._bytes = 0
        self._changed = threading.Condition()

    def put(self, msg: Incoming, stop: threading.Event) -> bool:
        """Add `msg`, waiting while the intake is full; False when `stop` is set first."""
        with self._changed:
            while self._items and (len(self._items) >= self.max_messages
                                   or self._bytes + len(msg.payload) > self.max_bytes):
                if stop.is_set():
                    return False
                self._changed.wait(0.5)
            self._items.append(msg)
            self._bytes += len(msg.payload)
            self._changed.notify_all()
            return True

    def take(self, n: int, timeout: float) -> list[Incoming]:
        """Up to `n` messages, oldest first, waiting up to `timeout` for the first."""
        with self._changed:
            if not self._items:
                self._changed.wait(timeout)
            batch: list[Incoming] = []
            while self._items and len(batch) < n:
                batch.append(self._items.popleft())
                self._bytes -= len(batch[-1].payload)
            if batch:
                self._changed.notify_all()
            return batch


class Agent:
    """Takes jobs from MQTT into Redis and answers from the outbox back to MQTT."""

    def __init__(self, config: Config, conn: redis.Redis) -> None:
        self.config, self.conn = config, conn
        self.enqueuer = Enqueuer(conn, config)
        self.outbox = Outbox(conn)
        self.max_bytes = {task: t.max_bytes for task, t in config.tasks.items()}
        subscription = C.JOBS_SUBSCRIPTION
        if config.mqtt.shared_group:
            subscription = f"$share/{config.mqtt.shared_group}/{subscription}"
        self.status_topic = C.STATUS_TOPIC.format(node=config.node)
        offline = json.dumps({"node": config.node, "online": False}).encode()
        password = (config.mqtt.password_file.read_text().strip()
                    if config.mqtt.password_file else None)
        self.mqtt = MqttClient(config.mqtt, config.client_id, subscriptions=(subscription,),
                               on_message=self.receive, will=(self.status_topic, offline),
                               password=password, on_connected=self._wake_status)
        self.relay = OutboxRelay(conn, self.mqtt, consumer=config.client_id,
                                 on_published=self._published)
        # Watchdog: the status loop turns every STATUS_INTERVAL, whatever the broker does.
        self.progress = sdnotify.Progress(stall_after=3 * C.STATUS_INTERVAL + 15)
        self.reaper = Reaper(conn, config, owner=config.client_id)
        self._stop = threading.Event()
        self._status_now = threading.Event()
        # job messages from paho's thread to the thread that stores them, in batches
        self.intake = Intake(C.INTAKE_DEPTH, C.INTAKE_BYTES)

    # -- jobs in

    def receive(self, msg: Incoming) -> bool | None:
        """paho's network thread: hand a job message to the intake thread, which stores it
        and acknowledges it (None). While the intake is full this blocks, which holds the
        broker's further messages back (back-pressure); on stop the message is left
        unacknowledged, for the broker to send again after the reconnect (False)."""
        return None if self.intake.put(msg, self._stop) else False

    def _intake_loop(self) -> None:
        """Store what waits in the intake, up to `INTAKE_BATCH` messages per round trip."""
        while not self._stop.is_set():
            batch = self.intake.take(C.INTAKE_BATCH, timeout=0.5)
            if batch:
                self.handle(batch)

    def handle(self, messages: list[Incoming]) -> None:
        """Store job messages, acknowledging each to the broker once it is stored or answered.

        While Redis is away the messages are retried here rather than left unacknowledged: the
        broker redelivers an unacknowledged message only on a reconnect, which may never come.
        The intake fills meanwhile and paho's thread blocks, holding further jobs at the broker
        (back-pressure); if the broker drops us for the silence, it redelivers on reconnect and
        dedup sorts it out. A message still not stored at stop is left to that redelivery.
        """
        delay, since = 0.25, time.monotonic()
        try:
            while messages:
                done = self._handle_once(messages)
                for msg, ok in zip(messages, done, strict=True):
                    if ok:
                        self.mqtt.ack(msg)
                messages = [m for m, ok in zip(messages, done, strict=True) if not ok]
                if not messages:
                    return
                metrics.JOB_STALL.set(time.monotonic() - since)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 5.0)
        finally:
            metrics.JOB_STALL.set(0)

    def _handle_once(self, messages: list[Incoming]) -> list[bool]:
        """Parse every message and store the valid ones in one round trip; answer the others.
        One flag per message: True when it is stored or answered (it may be acknowledged)."""
        received = time.time()
        done = [False] * len(messages)
        subs: list[tuple[int, Submission]] = []
        for i, msg in enumerate(messages):
            try:
                subs.append((i, parse(msg.topic, msg.payload, msg.props,
                                      max_bytes=self.max_bytes, now=received,
                                      json_depth=self.config.limits.json_depth)))
            except Rejected as exc:
                done[i] = self._answer_error(exc.route, exc.error, msg.topic)
            except Exception:  # noqa: BLE001 - one bad message must never stop the agent
                log.exception("job_handling_failed", topic=msg.topic)
                done[i] = True  # no route to answer to
        try:
            outcomes = self.enqueuer.submit_many([sub for _, sub in subs], received)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Not acknowledged: retried here, and redelivered by the broker after a reconnect.
            log.error("jobs_not_stored", jobs=len(subs), error=str(exc))
            return done
        except Exception:  # noqa: BLE001 - one bad job must never stop the agent
            log.exception("job_handling_failed", jobs=len(subs))
            outcomes = [Internal("internal error") for _ in subs]
        for (i, sub), outcome in zip(subs, outcomes, strict=True):
            done[i] = self._settle(sub, outcome, messages[i].topic)
        return done

    def _settle(self, sub: Submission, outcome: Enqueued | Exception, topic: str) -> bool:
        """Count a stored job, or answer the device why its job was not stored."""
        if isinstance(outcome, Enqueued):
            log.debug("job_enqueued", task=sub.route.task, device_id=sub.route.device_id,
                      job_id=sub.route.request_id, queue=outcome.queue,
                      duplicate=outcome.duplicate)
            if not outcome.duplicate:
                metrics.SUBMITTED.labels(sub.route.task, outcome.queue.rsplit(".", 1)[-1]).inc()
            metrics.observe_device(sub.route.device_id, sub.route.task,
                                   "duplicate" if outcome.duplicate else "submitted")
            return True
        if isinstance(outcome, EdgeError):  # Busy or ModelUnavailable, from the enqueuer
            return self._answer_error(sub.route, outcome, topic)
        if isinstance(outcome, redis.exceptions.OutOfMemoryError):
            # Redis is at maxmemory: the device is told so; answers already accepted still
            # get through (the answer steps may use memory past the limit, see edge/scripts.py)
            log.warning("redis_full", task=sub.route.task, device_id=sub.route.device_id)
            return self._answer_error(sub.route, Busy(
                "the gateway's job store is full (Redis maxmemory); try again later",
                "redis_full"), topic)
        if isinstance(outcome, (redis.ConnectionError, redis.TimeoutError)):
            log.error("job_not_stored", topic=topic, error=str(outcome))
            return False
        if isinstance(outcome, redis.RedisError):  # refused for good (a permission, a script)
            log.error("job_refused_by_redis", topic=topic, error=str(outcome))
            return self._answer_error(sub.route, Internal("the gateway could not store the "
                                                          "job (details in its log)"), topic)
        log.error("job_handling_failed", topic=topic, error=repr(outcome))
        return self._answer_error(sub.route, Internal("internal error"), topic)

    def _answer_error(self, route, error: EdgeError, topic: str) -> bool:
        log.info("job_rejected", topic=topic, code=error.code, reason=error.message)
        # Only known task names as labels: a topic is client input (label cardinality).
        task = route.task if route is not None and route.task in self.config.tasks else "other"
        metrics.REJECTED.labels(task, error.code).inc()
        if error.code == "busy":
            metrics.BUSY.labels(task, getattr(error, "limit", "queue_limit")).inc()
        if route is None:
            return True  # nowhere to answer (not a job topic)
        metrics.observe_device(route.device_id, task, "rejected")
        try:
            self.outbox.append(error_answer(route, error))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.error("answer_not_stored", topic=topic, error=str(exc))
            return False
        except redis.RedisError as exc:
            # Never retried forever on paho's thread: logged, counted and let go.
            log.error("answer_refused_by_redis", topic=topic, code=error.code, error=str(exc))
            metrics.ANSWERS_REFUSED.labels(task, "redis", "dropped").inc()
        return True

    # -- status

    def _wake_status(self) -> None:
        sdnotify.ready(f"connected to {self.config.mqtt.host}:{self.config.mqtt.port}")
        self._status_now.set()

    def _published(self, answer: Answer) -> None:
        if answer.kind != "result" or answer.route.task not in self.config.tasks:
            return
        total_ms = (answer.body.get("timings") or {}).get("total_ms")
        if total_ms is not None:
            metrics.END_TO_END.labels(answer.route.task, answer.body.get("status", "ok")).observe(
                max(total_ms, 0.0) / 1000)

    def publish_status(self, online: bool = True) -> None:
        doc = node_status(self.conn, self.config, online=online)
        doc.update(metrics.observe_status(doc, self.conn))
        msg = Outgoing(self.status_topic, json.dumps(doc).encode(), 1,
                       Properties(content_type="application/json"))
        outcome = self.mqtt.publish_once(msg, timeout=STATUS_PUBACK_WAIT, retain=True)
        if isinstance(outcome, Refused):  # e.g. an ACL that does not let the agent write it
            log.warning("status_refused", topic=self.status_topic, reason=outcome.reason,
                        detail=outcome.detail)

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            self.progress.beat()
            self._status_now.wait(C.STATUS_INTERVAL)
            self._status_now.clear()
            if self._stop.is_set() or not self.mqtt.is_connected():
                continue
            try:
                self.publish_status()
            except redis.RedisError as exc:
                log.warning("status_failed", error=str(exc))

    # -- lifecycle

    def run(self) -> None:
        """Run until `stop()`; returns after a clean shutdown."""
        self.mqtt.start()
        threads = [threading.Thread(target=self._intake_loop, name="intake", daemon=True),
                   threading.Thread(target=self.relay.run, name="outbox-relay", daemon=True),
                   threading.Thread(target=self._status_loop, name="status", daemon=True),
                   threading.Thread(target=self.reaper.run, name="reaper", daemon=True)]
        for t in threads:
            t.start()
        def live() -> bool:
            return self.progress.healthy() and all(t.is_alive() for t in threads)

        metrics.serve(self.config.metrics_port, live=live,
                      ready={"redis": self.conn.ping, "mqtt": self.mqtt.is_connected})
        watchdog = sdnotify.Watchdog(live).start()
        log.info("agent_started", node=self.config.node, broker=self.config.mqtt.host,
                 port=self.config.mqtt.port)
        self._stop.wait()
        sdnotify.stopping("publishing offline, draining the outbox relay")
        watchdog.stop()
        self.relay.stop()
        self.reaper.stop()
        self._status_now.set()
        for t in threads:
            t.join(timeout=15)
        if self.mqtt.is_connected():
            info = self.mqtt.client.publish(
                self.status_topic, json.dumps({"node": self.config.node, "online": False}),
                qos=1, retain=True)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.mqtt.stop()
        log.info("agent_stopped")

    def stop(self, *_: object) -> None:
        self._stop.set()


def main(argv: list[str] | None = None) -> int:
    """`edge-agent [--config FILE]`."""
    from edge.startup import start_daemon

    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="daemon TOML (default: $EDGE_CONFIG or configs/demo.toml)")
    args = parser.parse_args(argv)
    config = start_daemon("edge-agent", args.config)
    agent = Agent(config, connect(config.redis))
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    signal.signal(signal.SIGHUP, lambda *_: log.info("reload", note="the agent holds no keys"))
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
