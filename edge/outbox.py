"""The outbox: a Redis stream of answers that waits for the broker.

Workers (and the agent, for answers it gives itself) append; the agent's relay reads with a
consumer group, publishes QoS 1 and acknowledges an entry only after the broker's PUBACK. An
entry whose agent died before acknowledging it is claimed by another (or the restarted) agent.

A PUBACK that refuses the answer is not a delivery (README, "Delivery: the promise"): a refusal
that may pass keeps the entry for a retry; one that never will is logged, counted and settled,
with a small error answer sent instead where one can get through (`replacement`).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

import redis
import structlog

from edge import constants as C
from edge import metrics
from edge.jobs import Answer
from edge.errors import EdgeError, Internal, PayloadTooLarge
from edge.mqtt import NOT_AUTHORIZED, PACKET_TOO_LARGE, TOPIC_NAME_INVALID, Outcome, Refused
from edge.protocol import Outgoing, error_answer, render

log = structlog.get_logger("edge.outbox")


class Outbox:
    """Appends answers to the outbox stream."""

    def __init__(self, conn: redis.Redis, stream: str = C.OUTBOX_STREAM,
                 maxlen: int = C.DEFAULT_OUTBOX_MAXLEN) -> None:
        self.conn, self.stream, self.maxlen = conn, stream, maxlen

    def append(self, answer: Answer, pipeline: redis.client.Pipeline | None = None) -> None:
        """Add one answer; with `pipeline`, as part of the caller's round trip."""
        target = pipeline if pipeline is not None else self.conn
        target.xadd(self.stream, answer.to_fields(), maxlen=self.maxlen, approximate=True)

    def answer_once(self, rq_job_key: str, answer: Answer, owner: str,
                    blob_key: str | None = None) -> bool:
        """Append the final answer of an RQ job unless someone (a worker, the reaper of any
        agent) already did; drop the job's blob. One server-side step, so a crash or a lost
        reply never leaves half of it done and a retry is harmless. True when we answered.

        The mark is a field of RQ's own job hash, so it expires with the job (dedup window).
        """
        fields: list[bytes | str] = []
        for k, v in answer.to_fields().items():
            fields += [k, v]
        keys = [rq_job_key, self.stream, UNANSWERED_KEY] + ([blob_key] if blob_key else [])
        job_id = rq_job_key.rsplit(":", 1)[-1]
        return bool(self.conn.eval(_ANSWER_ONCE, len(keys), *keys, owner, self.maxlen, job_id,
                                   *fields))


# KEYS: rq job hash, outbox stream, unanswered index, [blob];
# ARGV: owner, maxlen, job id, field, value, ...
# A job hash that no longer exists is answered without a mark (never recreate RQ's key).
_ANSWER_ONCE = """
redis.call('ZREM', KEYS[3], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HSETNX', KEYS[1], 'edge_answered', ARGV[1]) == 0 then return 0 end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
if KEYS[4] then redis.call('DEL', KEYS[4]) end
return 1
"""

# zset job id -> time acknowledged: every job the agent stored and nobody has answered yet
UNANSWERED_KEY = C.KEY_PREFIX + "unanswered"

ANSWERED_FIELD = "edge_answered"


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
                 batch: int = 64, claim_idle_ms: int = 30_000,
                 backoff: tuple[float, float] = C.OUTBOX_RETRY_BACKOFF,
                 on_published: Callable[[Answer], None] | None = None) -> None:
        self.conn, self.publisher, self.consumer = conn, publisher, consumer
        self.stream, self.group, self.batch = stream, group, batch
        self.claim_idle_ms = claim_idle_ms
        self.backoff = backoff
        self.on_published = on_published
        self._stop = threading.Event()
        self._last_claim = 0.0
        self._retry_pending = True  # start with what a previous run of ours left unacknowledged
        self._resend_from = "0"  # where `resend_pending` goes on
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing."""
        try:
            self.conn.xgroup_create(self.stream, self.group, id="0", mkstream=True)
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
        """Relay one batch of new entries; return how many were published and acknowledged."""
        resp = self.conn.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                    count=self.batch, block=block_ms)
        return self._publish(resp[0][1] if resp else [])[0]

    def resend_pending(self) -> bool:
        """Publish again the entries we read and did not settle, oldest first, a batch at a
        time for about PUBACK_TIMEOUT (a stalled broker must not keep new answers waiting
        longer); the next call goes on where this one stopped, so every entry gets its turn.
        True when a pass from the start left none behind."""
        began, start, kept = self._resend_from, self._resend_from, 0
        deadline = time.monotonic() + C.PUBACK_TIMEOUT
        while self.publisher.is_connected() and time.monotonic() < deadline:
            resp = self.conn.xreadgroup(self.group, self.consumer, {self.stream: start},
                                        count=self.batch)
            entries = resp[0][1] if resp else []
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
        outcomes = self.publisher.publish_many([render(a) for _, a in answers],
                                               timeout=C.PUBACK_TIMEOUT) if answers else []
        delivered, kept = [], 0
        for (eid, answer), outcome in zip(answers, outcomes):
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
        task = route.task if route.task in C.TASK_ORDER else "other"
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

    def _ack(self, ids: list) -> None:
        pipe = self.conn.pipeline(transaction=False)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.execute()
