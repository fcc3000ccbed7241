"""The outbox: a Redis stream of answers that waits for the broker.

Workers (and the agent, for answers it gives itself) append here; the agent's relay
(`edge.relay`) reads with a consumer group, publishes and acknowledges an entry only after the
broker's PUBACK. Workers need this module only: it knows no MQTT.
"""

from __future__ import annotations

import redis
import structlog

from edge import constants as C
from edge import scripts
from edge.jobs import Answer

log = structlog.get_logger("edge.outbox")


class Outbox:
    """Appends answers to the outbox stream and progress notes to the progress stream.

    Final answers are never trimmed: an entry leaves the stream only once the relay has the
    broker's PUBACK (or settled a refusal), however long the broker is away. Progress notes
    (QoS 0, droppable) go to a stream of their own, trimmed to `C.PROGRESS_MAXLEN`, so that they
    can neither push an answer out nor fill Redis.
    """

    def __init__(self, conn: redis.Redis, stream: str = C.OUTBOX_STREAM,
                 progress_stream: str = C.PROGRESS_STREAM) -> None:
        self.conn, self.stream, self.progress_stream = conn, stream, progress_stream
        self._append = conn.register_script(scripts.APPEND_ANSWER)
        self._answer_once = conn.register_script(scripts.ANSWER_ONCE)

    def append(self, answer: Answer, pipeline: redis.client.Pipeline | None = None) -> None:
        """Add one answer (accepted even when Redis is full) or progress note (dropped, with a
        log line, when Redis refuses it); with `pipeline`, as part of the caller's round trip."""
        target = pipeline if pipeline is not None else self.conn
        if answer.kind == "progress":
            try:
                # redis-py's stub wants a dict of its own key type; str keys are field names
                target.xadd(self.progress_stream, dict(answer.to_fields()),  # type: ignore[arg-type]
                            maxlen=C.PROGRESS_MAXLEN, approximate=True)
            except redis.ResponseError as exc:  # e.g. Redis full: progress is droppable
                log.warning("progress_dropped", error=str(exc))
            return
        self._append(keys=[self.stream], args=_flat(answer.to_fields()), client=target)

    def answer_once(self, rq_job_key: str, answer: Answer, owner: str,
                    blob_key: str | None = None,
                    pipeline: redis.client.Pipeline | None = None) -> bool:
        """Append the final answer of an RQ job unless someone (a worker, the reaper of any
        agent) already did; release the device's quota; drop the job's blob. One server-side
        step, so a crash or a lost reply never leaves half of it done and a retry is harmless.
        Accepted when Redis is full (it settles work already accepted). True when we answered.

        The mark is a field of RQ's own job hash, so it expires with the job (dedup window).
        With `pipeline`, the step is queued on it (sent as EVAL: a registered script would
        cost a round trip of its own) and its reply, 1 or 0, comes from `pipeline.execute()`.
        """
        route = answer.route
        keys = [rq_job_key, self.stream, C.UNANSWERED_KEY,
                C.QUOTA_KEY.format(task=route.task, device_id=route.device_id)]
        keys += [blob_key] if blob_key else []
        job_id = rq_job_key.rsplit(":", 1)[-1]
        args = [owner, job_id, C.ANSWERED_FIELD, *_flat(answer.to_fields())]
        if pipeline is not None:
            pipeline.eval(scripts.ANSWER_ONCE, len(keys), *keys, *args)
            return False
        return bool(self._answer_once(keys=keys, args=args))


def _flat(fields: dict[str, bytes | str]) -> list[bytes | str]:
    return [v for kv in fields.items() for v in kv]
