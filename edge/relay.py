"""The outbox relay: answers from the outbox stream to MQTT, acknowledged after PUBACK.

The relay reads with a consumer group; an entry whose agent died before acknowledging it is
claimed by another (or the restarted) agent.

A PUBACK that refuses the answer is not a delivery (README, "Delivery: the promise"): a refusal
that may pass keeps the entry for a retry; one that never will is logged, counted and settled,
with a small error answer sent instead where one can get through (`replacement`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
import structlog

from edge import constants as C
from edge import metrics, scripts
from edge.errors import EdgeError, Internal, PayloadTooLarge
from edge.jobs import Answer, error_answer
from edge.mqtt import NOT_AUTHORIZED, PACKET_TOO_LARGE, TOPIC_NAME_INVALID, Outcome, Refused
from edge.outbox import Outbox
from edge.protocol import Outgoing, render
from edge.tasks import TASKS

log = structlog.get_logger("edge.relay")


class Publisher(Protocol):
    """What the relay needs of an MQTT client (`edge.mqtt.MqttClient`)."""

    def publish_many(self, messages: list[Outgoing], timeout: float) -> list[Outcome | None]:
        """Publish; per message True (acknowledged), False (not yet: retry later) or a
        `Refused`; None is a refusal with no reason given."""
        ...

    def is_connected(self) -> bool: ...


def replacement(answer: Answer, refusal: Refused) -> Answer | None:
    """The error answer that stands in for a refused one, or None when nothing would get
    through: a refusal of the topic itself (the ACL, a bad name), a progress note (it is only
    dropped), an answer that is already an error (nothing smaller to send)."""
    if (answer.kind != "result" or answer.body.get("status") != "ok"
            or refusal.reason in (NOT_AUTHORIZED, TOPIC_NAME_INVALID)):
        return None
    error: EdgeError
    if refusal.reason == PACKET_TOO_LARGE:
        error = PayloadTooLarge(f"the answer was {refusal.detail}: send a smaller input or ask "
                                "for a smaller form (format=jpeg)")
    else:
        error = Internal("the broker refused the answer (details in the gateway's log)")
    return error_answer(answer.route, error, answer.body.get("timings"))


class OutboxRelay:
    """Moves answers from the outbox stream to MQTT, acknowledging after PUBACK."""

    def __init__(self, conn: redis.Redis, publisher: Publisher, consumer: str,
                 stream: str = C.OUTBOX_STREAM, group: str = C.OUTBOX_GROUP,
                 progress_stream: str = C.PROGRESS_STREAM,
                 batch: int = 64, claim_idle_ms: int = 30_000,
                 backoff: tuple[float, float] = C.OUTBOX_RETRY_BACKOFF,
                 on_published: Callable[[Answer], None] | None = None) -> None:
        self.conn, self.publisher, self.consumer = conn, publisher, consumer
        self.stream, self.group, self.batch = stream, group, batch
        self._read_answers = conn.register_script(scripts.READ_ANSWERS)
        self.progress_stream = progress_stream
        self.claim_idle_ms = claim_idle_ms
        self.backoff = backoff
        self.on_published = on_published
        self._stop = threading.Event()
        self._last_claim = 0.0
        self._retry_pending = True  # start with what a previous run of ours left unacknowledged
        self._resend_from = "0"  # where `resend_pending` goes on
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the consumer groups (and the streams) if missing."""
        for stream in (self.stream, self.progress_stream):
            try:
                self.conn.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Relay until stopped; survives Redis and broker outages by waiting and retrying.

        Entries not delivered are retried between reads of new ones, after a back-off that
        doubles while they keep failing (and restarts after a reconnect), so one answer the
        broker keeps refusing never holds up the others.
        """
        wait, next_retry = 0.0, 0.0
        while not self._stop.is_set():
            try:
                if not self.publisher.is_connected():
                    self._retry_pending = True  # what we read before the outage is re-read
                    wait, next_retry, self._resend_from = 0.0, 0.0, "0"
                    self._stop.wait(0.2)
                    continue
                if self._retry_pending and time.monotonic() >= next_retry:
                    self._retry_pending = False
                    if self.resend_pending():
                        wait = 0.0
                    else:
                        self._retry_pending = True
                        wait = min(max(wait * 2, self.backoff[0]), self.backoff[1])
                        next_retry = time.monotonic() + wait
                if time.monotonic() - self._last_claim > self.claim_idle_ms / 1000:
                    self._claim_abandoned()
                waiting = self._retry_pending
                self.relay_once(block_ms=200 if waiting else 500)
                if self._retry_pending and not waiting:  # a new answer failed: back off too
                    wait = max(wait, self.backoff[0])
                    next_retry = max(next_retry, time.monotonic() + wait)
            except redis.RedisError as exc:
                log.warning("outbox_redis_error", error=str(exc))
                self._stop.wait(1.0)
                try:
                    self.ensure_group()
                except redis.RedisError:
                    pass

    def relay_once(self, block_ms: int | None = None) -> int:
        """Relay one batch of new entries (answers and progress notes); return how many answers
        were published and acknowledged.

        A batch holds at most `batch` answers and, past the first, about READ_BUDGET bytes of
        them (an answer may carry 64 MiB of media: 64 of those read at once would be 4 GiB in
        the agent). Waiting for new entries (`block_ms`) reads one of either kind.
        """
        # redis-py types replies loosely: these are lists of (id, fields) entries
        answers: Any = self._read_answers(keys=[self.stream],
                                     args=[self.group, self.consumer, self.batch,
                                           READ_BUDGET])
        notes: Any = self.conn.xreadgroup(self.group, self.consumer,
                                          {self.progress_stream: ">"}, count=self.batch)
        if not answers and not notes and block_ms is not None:
            resp: Any = self.conn.xreadgroup(self.group, self.consumer,
                                             {self.stream: ">", self.progress_stream: ">"},
                                             count=1, block=block_ms)
            for stream, entries in resp or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                if name == self.progress_stream:
                    notes = [(stream, entries)]
                else:
                    answers = entries
        if notes:
            self._publish_progress(notes[0][1])
        return self._publish([(eid, _pairs(fields)) for eid, fields in answers])[0] \
            if answers else 0

    def resend_pending(self) -> bool:
        """Publish again the entries we read and did not settle, oldest first, a batch at a
        time for about PUBACK_TIMEOUT (a stalled broker must not keep new answers waiting
        longer); the next call goes on where this one stopped, so every entry gets its turn.
        True when a pass from the start left none behind."""
        began, start, kept = self._resend_from, self._resend_from, 0
        deadline = time.monotonic() + C.PUBACK_TIMEOUT
        while self.publisher.is_connected() and time.monotonic() < deadline:
            reply: Any = self.conn.xreadgroup(self.group, self.consumer, {self.stream: start},
                                              count=self.batch)
            entries = reply[0][1] if reply else []
            if not entries:
                self._resend_from = "0"
                return began == "0" and kept == 0
            kept += self._publish(entries)[1]
            start = self._resend_from = entries[-1][0]
        return False

    def _claim_abandoned(self) -> None:
        """Take over entries another agent read but never acknowledged (it died)."""
        self._last_claim = time.monotonic()
        resp = self.conn.xautoclaim(self.stream, self.group, self.consumer,
                                    min_idle_time=self.claim_idle_ms, start_id="0-0",
                                    count=self.batch)
        if resp and resp[1]:
            log.info("outbox_claimed", entries=len(resp[1]))
            self._retry_pending = True  # they are ours now: send them with the next retry
        # Progress notes a dead agent read are stale by now: drop them.
        stale = self.conn.xautoclaim(self.progress_stream, self.group, self.consumer,
                                     min_idle_time=self.claim_idle_ms, start_id="0-0",
                                     count=1000, justid=True)
        if stale and stale[1]:
            self._ack(stale[1], self.progress_stream)

    def _publish_progress(self, entries: list) -> None:
        """Publish progress notes once, at QoS 0, and let them go whatever happens."""
        messages = []
        for eid, fields in entries:
            try:
                answer = Answer.from_fields(fields)
            except (KeyError, ValueError) as exc:
                log.error("outbox_entry_unreadable", entry=eid, error=str(exc))
                continue
            message = render(answer)
            if self._trusted(answer, message):
                messages.append(message)
        if messages:
            self.publisher.publish_many(messages, timeout=C.PUBACK_TIMEOUT)
        self._ack([eid for eid, _ in entries], self.progress_stream)

    def _trusted(self, answer: Answer, message: Outgoing) -> bool:
        """Whether `message` goes where an answer to its job may go: under the results or
        progress tree of the device the job came from. The outbox is written by workers; a
        worker subverted through a decoder must not make the agent publish with its rights."""
        if allowed_topic(answer, message.topic):
            return True
        route = answer.route
        log.error("answer_topic_refused", device_id=route.device_id, task=route.task,
                  kind=answer.kind, topic=message.topic[:200])
        metrics.ANSWERS_REFUSED.labels(_task_label(route.task), "topic", "dropped").inc()
        return False

    def _publish(self, entries: list) -> tuple[int, int]:
        """Publish entries, acknowledge those settled; (delivered, kept for a retry)."""
        answers, settled = [], []
        for eid, fields in entries:
            if not fields:  # trimmed (MAXLEN) while pending: nothing left to send
                log.error("outbox_entry_trimmed", entry=eid)
                settled.append(eid)
                continue
            try:
                answers.append((eid, Answer.from_fields(fields)))
            except (KeyError, ValueError) as exc:
                log.error("outbox_entry_unreadable", entry=eid, error=str(exc))
                settled.append(eid)
        rendered = []
        for eid, answer in answers:
            message = render(answer)
            if self._trusted(answer, message):
                rendered.append((eid, answer, message))
            else:
                settled.append(eid)
        answers = [(eid, answer) for eid, answer, _ in rendered]
        outcomes = self.publisher.publish_many([m for _, _, m in rendered],
                                               timeout=C.PUBACK_TIMEOUT) if rendered else []
        delivered, kept = [], 0
        for (eid, answer), outcome in zip(answers, outcomes, strict=True):
            if outcome is True:
                delivered.append(answer)
                settled.append(eid)
            elif outcome is False:
                kept += 1
            elif self._refused(answer, outcome or Refused(None, "the MQTT client refused it")):
                settled.append(eid)
            else:
                kept += 1
        if kept:
            self._retry_pending = True
        if settled:
            self._ack(settled)
        if self.on_published:
            for answer in delivered:
                self.on_published(answer)
        return len(delivered), kept

    def _refused(self, answer: Answer, refusal: Refused) -> bool:
        """Log and count a refusal; send its replacement; True when the entry is settled
        (False: keep it for a retry)."""
        route = answer.route
        reason = "local" if refusal.reason is None else f"0x{refusal.reason:02x}"
        task = _task_label(route.task)
        context = dict(device_id=route.device_id, request_id=route.request_id,
                       task=route.task, kind=answer.kind, topic=route.topic, reason=reason,
                       detail=refusal.detail)
        if refusal.retryable:
            log.warning("answer_refused", action="retry", **context)
            metrics.ANSWERS_REFUSED.labels(task, reason, "retry").inc()
            return False
        stand_in = replacement(answer, refusal)
        action = "replaced" if stand_in is not None else "dropped"
        log.error("answer_refused", action=action, **context)
        metrics.ANSWERS_REFUSED.labels(task, reason, action).inc()
        if stand_in is not None:
            Outbox(self.conn, self.stream).append(stand_in)
        return True

    def _ack(self, ids: list, stream: str | None = None) -> None:
        stream = stream or self.stream
        pipe = self.conn.pipeline(transaction=False)
        pipe.xack(stream, self.group, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()


READ_BUDGET = 16 << 20  # bytes of answers the relay reads in one batch (past the first)


def _pairs(fields) -> dict:
    """Stream entry fields as a dict, from the flat list a script returns (or a dict)."""
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _task_label(task: str) -> str:
    return task if task in TASKS else "other"


def allowed_topic(answer: Answer, topic: str) -> bool:
    """Whether an outbox entry's topic lies in its own device's results (answers) or progress
    (notes) tree, with a well-formed device id and no wildcard."""
    route = answer.route
    if not isinstance(route.device_id, str) or not C.DEVICE_ID_RE.fullmatch(route.device_id):
        return False
    pattern = C.PROGRESS_TOPIC if answer.kind == "progress" else C.RESULT_TOPIC
    prefix = pattern.format(device_id=route.device_id, request_id="")
    return (topic.startswith(prefix) and len(topic) > len(prefix) and len(topic) <= 512
            and not set(topic) & set("+#\0"))
