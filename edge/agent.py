"""The edge agent: the daemon's only MQTT client.

    mqtt message -> protocol.parse -> Submission -> Enqueuer (routing included) -> RQ job
    outbox stream -> OutboxRelay -> protocol.render -> MQTT publish -> XACK
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

import redis
import structlog

from edge import constants as C
from edge import metrics, sdnotify
from edge.config import Config
from edge.errors import Busy, EdgeError, Internal
from edge.jobs import Answer, error_answer
from edge.mqtt import MqttClient, Refused
from edge.outbox import Outbox
from edge.protocol import Outgoing, Properties, Rejected, parse
from edge.queueing import Enqueuer
from edge.reaper import Reaper
from edge.redisconn import connect
from edge.relay import OutboxRelay
from edge.status import node_status

log = structlog.get_logger("edge.agent")

STATUS_PUBACK_WAIT = 5.0  # s the status loop waits to learn whether the broker took it


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
                               on_message=self.handle, will=(self.status_topic, offline),
                               password=password, on_connected=self._wake_status)
        self.relay = OutboxRelay(conn, self.mqtt, consumer=config.client_id,
                                 on_published=self._published)
        # Watchdog: the status loop turns every STATUS_INTERVAL, whatever the broker does.
        self.progress = sdnotify.Progress(stall_after=3 * C.STATUS_INTERVAL + 15)
        self.reaper = Reaper(conn, config, owner=config.client_id)
        self._stop = threading.Event()
        self._status_now = threading.Event()

    # -- jobs in

    def handle(self, topic: str, payload: bytes, props: Properties) -> bool:
        """Handle one job message; True when it may be acknowledged to the broker.

        While Redis is away the message is retried here rather than left unacknowledged: the
        broker redelivers an unacknowledged message only on a reconnect, which may never come.
        Blocking paho's thread meanwhile holds further jobs at the broker (back-pressure); if
        the broker drops us for the silence, it redelivers on reconnect and dedup sorts it out.
        """
        delay, since = 0.25, time.monotonic()
        try:
            while not self._handle_once(topic, payload, props):
                metrics.JOB_STALL.set(time.monotonic() - since)
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, 5.0)
            return True
        finally:
            metrics.JOB_STALL.set(0)

    def _handle_once(self, topic: str, payload: bytes, props: Properties) -> bool:
        received = time.time()
        try:
            sub = parse(topic, payload, props, max_bytes=self.max_bytes, now=received,
                        json_depth=self.config.limits.json_depth)
            enq = self.enqueuer.submit(sub, received)
            log.debug("job_enqueued", task=sub.route.task, device_id=sub.route.device_id,
                      job_id=sub.route.request_id, queue=enq.queue, duplicate=enq.duplicate)
            if not enq.duplicate:
                metrics.SUBMITTED.labels(sub.route.task, enq.queue.rsplit(".", 1)[-1]).inc()
            metrics.observe_device(sub.route.device_id, sub.route.task,
                                   "duplicate" if enq.duplicate else "submitted")
            return True
        except Rejected as exc:
            return self._answer_error(exc.route, exc.error, topic)
        except EdgeError as exc:  # Busy or ModelUnavailable, from the enqueuer
            return self._answer_error(sub.route, exc, topic)
        except redis.exceptions.OutOfMemoryError:
            # Redis is at maxmemory: the device is told so; answers already accepted still
            # get through (the answer steps may use memory past the limit, see edge/scripts.py)
            log.warning("redis_full", task=sub.route.task, device_id=sub.route.device_id)
            return self._answer_error(sub.route, Busy(
                "the gateway's job store is full (Redis maxmemory); try again later",
                "redis_full"), topic)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Not acknowledged: retried here, and redelivered by the broker after a reconnect.
            log.error("job_not_stored", topic=topic, error=str(exc))
            return False
        except redis.RedisError as exc:  # refused for good (a permission, a script error)
            log.error("job_refused_by_redis", topic=topic, error=str(exc))
            return self._answer_error(sub.route, Internal("the gateway could not store the "
                                                          "job (details in its log)"), topic)
        except Exception:  # noqa: BLE001 - one bad job must never stop the agent
            log.exception("job_handling_failed", topic=topic)
            try:
                return self._answer_error(sub.route, Internal("internal error"), topic)
            except NameError:
                return True

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
        threads = [threading.Thread(target=self.relay.run, name="outbox-relay", daemon=True),
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
