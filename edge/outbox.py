"""The outbox: a Redis stream of answers that waits for the broker.

Workers (and the agent, for answers it gives itself) append; the agent's relay reads with a
consumer group, publishes QoS 1 and acknowledges an entry only after the broker's PUBACK. An
entry whose agent died before acknowledging it is claimed by another (or the restarted) agent.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

import redis
import structlog

from edge import constants as C
from edge.jobs import Answer
from edge.errors import Internal
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
    """What the relay needs of an MQTT client."""

    def publish_many(self, messages: list[Outgoing], timeout: float) -> list[bool | None]:
        """Publish; per message True (acknowledged), False (retry later), None (refused)."""
        ...

    def is_connected(self) -> bool: ...


class OutboxRelay:
    """Moves answers from the outbox stream to MQTT, acknowledging after PUBACK."""

    def __init__(self, conn: redis.Redis, publisher: Publisher, consumer: str,
                 stream: str = C.OUTBOX_STREAM, group: str = C.OUTBOX_GROUP,
                 batch: int = 64, claim_idle_ms: int = 30_000,
                 on_published: Callable[[Answer], None] | None = None) -> None:
        self.conn, self.publisher, self.consumer = conn, publisher, consumer
        self.stream, self.group, self.batch = stream, group, batch
        self.claim_idle_ms = claim_idle_ms
        self.on_published = on_published
        self._stop = threading.Event()
        self._last_claim = 0.0
        self._retry_pending = True  # start with what a previous run of ours left unacknowledged
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

        Entries that failed are retried at most every half second, between reads of new ones,
        so one answer the broker keeps refusing never holds up the others.
        """
        next_retry = 0.0
        while not self._stop.is_set():
            try:
                if not self.publisher.is_connected():
                    self._retry_pending = True  # what we read before the outage is re-read
                    self._stop.wait(0.2)
                    continue
                if self._retry_pending and time.monotonic() >= next_retry:
                    self._retry_pending = False
                    while self.relay_once(pending=True) and not self._retry_pending:
                        pass
                    if self._retry_pending:
                        next_retry = time.monotonic() + 0.5
                if time.monotonic() - self._last_claim > self.claim_idle_ms / 1000:
                    self._claim_abandoned()
                self.relay_once(block_ms=200 if self._retry_pending else 500)
            except redis.RedisError as exc:
                log.warning("outbox_redis_error", error=str(exc))
                self._stop.wait(1.0)
                try:
                    self.ensure_group()
                except redis.RedisError:
                    pass

    def relay_once(self, pending: bool = False, block_ms: int | None = None) -> int:
        """Relay one batch; return how many entries were published and acknowledged."""
        start = "0" if pending else ">"
        resp = self.conn.xreadgroup(self.group, self.consumer, {self.stream: start},
                                    count=self.batch, block=None if pending else block_ms)
        entries = resp[0][1] if resp else []
        return self._publish(entries)

    def _claim_abandoned(self) -> None:
        """Take over entries another agent read but never acknowledged (it died)."""
        self._last_claim = time.monotonic()
        resp = self.conn.xautoclaim(self.stream, self.group, self.consumer,
                                    min_idle_time=self.claim_idle_ms, start_id="0-0",
                                    count=self.batch)
        if resp and resp[1]:
            log.info("outbox_claimed", entries=len(resp[1]))

    def _publish(self, entries: list) -> int:
        entries = [(eid, fields) for eid, fields in entries if fields]
        if not entries:
            return 0
        answers, bad = [], []
        for eid, fields in entries:
            try:
                answers.append((eid, Answer.from_fields(fields)))
            except (KeyError, ValueError) as exc:
                log.error("outbox_entry_unreadable", entry=eid, error=str(exc))
                bad.append(eid)
        if bad:
            self._ack(bad)
        messages = [render(a) for _, a in answers]
        acked = self.publisher.publish_many(messages, timeout=C.PUBACK_TIMEOUT)
        done = [eid for (eid, _), ok in zip(answers, acked) if ok]
        refused = [(eid, a) for (eid, a), ok in zip(answers, acked) if ok is None]
        if len(done) + len(refused) < len(answers):
            self._retry_pending = True
        for _, answer in refused:
            self._replace_refused(answer)
        if done or refused:
            self._ack(done + [eid for eid, _ in refused])
        if self.on_published:
            for (_, answer), ok in zip(answers, acked):
                if ok:
                    self.on_published(answer)
        return len(done)

    def _replace_refused(self, answer: Answer) -> None:
        """An answer MQTT cannot carry becomes a small error answer, so the device still
        hears back (progress notes are just dropped)."""
        if answer.kind != "result":
            return
        error = Internal("the answer could not be sent over MQTT (too large for one message)")
        Outbox(self.conn, self.stream).append(error_answer(answer.route, error))

    def _ack(self, ids: list) -> None:
        pipe = self.conn.pipeline(transaction=False)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.execute()
