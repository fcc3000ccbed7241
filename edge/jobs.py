"""The data that crosses process boundaries: routes, jobs, their payloads and answers.

Everything here is a frozen dataclass with one codec beside it (`to_json()` / `from_json()`, or
`to_fields()` / `from_fields()` for Redis hashes and stream entries); nothing else is written to
Redis by the daemon (RQ gets jobs as JSON arguments, never pickles), and no other module knows
a record's field layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.errors import EdgeError


@dataclass(frozen=True, slots=True)
class Route:
    """Where and how to answer one request."""

    device_id: str
    request_id: str
    task: str
    form: str  # "raw" (MQTT 5 properties) or "envelope" (JSON)
    topic: str  # results topic, or the client's MQTT 5 response topic
    correlation: str | None = None  # hex of MQTT 5 correlation data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Route:
        return cls(**d)


@dataclass(frozen=True, slots=True)
class Job:
    """One validated job, as the agent enqueues it and a worker runs it.

    The inputs themselves are in the Redis blob `blob_key` (stored once, with a TTL).
    """

    key: str  # RQ job id, derived from device id + request id
    route: Route
    params: Mapping[str, Any]
    blob_key: str
    received: float  # unix time the agent got it
    deadline: float  # unix time after which it is answered `timeout` instead of run
    batch: bool = False

    @property
    def task(self) -> str:
        return self.route.task

    def to_json(self) -> str:
        d = {"key": self.key, "route": self.route.to_dict(), "params": dict(self.params),
             "blob_key": self.blob_key, "received": self.received, "deadline": self.deadline,
             "batch": self.batch}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> Job:
        d = json.loads(text) if isinstance(text, str) else dict(text)
        d["route"] = Route.from_dict(d["route"])
        return cls(**d)


def job_key(device_id: str, task: str, request_id: str) -> str:
    """The RQ job id for a request: stable, so a QoS 1 duplicate maps to the same job.

    The task is part of it: the same request id sent to another task is another job.
    """
    digest = hashlib.blake2b(f"{device_id}\0{task}\0{request_id}".encode(),
                             digest_size=16).hexdigest()
    return f"j-{digest}"


Media = tuple[tuple[str, bytes], ...]  # (content type, bytes) in request order


def _media_fields(media: Media) -> dict[str, bytes | str]:
    """The media items as hash / stream fields: `n`, then `t{i}` (type) and `m{i}` (bytes)."""
    fields: dict[str, bytes | str] = {"n": str(len(media))}
    for i, (content_type, data) in enumerate(media):
        fields[f"t{i}"] = content_type
        fields[f"m{i}"] = data
    return fields


def _media_from(fields: Mapping[bytes, bytes]) -> Media:
    n = int(fields.get(b"n", b"0"))
    return tuple((fields[f"t{i}".encode()].decode(), bytes(fields[f"m{i}".encode()]))
                 for i in range(n))


@dataclass(frozen=True, slots=True)
class Payload:
    """A job's inputs, stored once as a Redis hash (the job's blob) by the agent and read by
    the worker that runs it."""

    text: str | tuple[str, ...] | None = None
    ids: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    media: Media = ()

    def to_fields(self) -> dict[str, bytes | str]:
        """Redis hash fields."""
        fields = _media_fields(self.media)
        if self.text is not None:
            fields["text"] = json.dumps(self.text)
        if self.ids is not None:
            fields["ids"] = json.dumps(self.ids)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Payload:
        """The payload of a stored hash; KeyError or ValueError when it is incomplete."""
        text: Any = None
        ids: Any = None
        if b"text" in fields:
            text = json.loads(fields[b"text"])
            text = tuple(text) if isinstance(text, list) else text
        if b"ids" in fields:
            raw = json.loads(fields[b"ids"])
            ids = tuple(tuple(r) if isinstance(r, list) else r for r in raw)
        return cls(text=text, ids=ids, media=_media_from(fields))


@dataclass(frozen=True, slots=True)
class Answer:
    """A result or a progress note on its way out (an outbox entry)."""

    route: Route
    kind: str  # "result" | "progress"
    body: Mapping[str, Any]
    media: tuple[tuple[str, bytes], ...] = field(default=())  # (content type, bytes)

    def to_fields(self) -> dict[str, bytes | str]:
        """Redis stream fields."""
        return {
            "kind": self.kind,
            "route": json.dumps(self.route.to_dict(), separators=(",", ":")),
            "body": json.dumps(self.body, separators=(",", ":")),
            **_media_fields(self.media),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Answer:
        """The answer of a stream entry; KeyError or ValueError when it is incomplete."""
        if b"n" not in fields:
            raise KeyError("n")
        return cls(route=Route.from_dict(json.loads(fields[b"route"])),
                   kind=fields[b"kind"].decode(), body=json.loads(fields[b"body"]),
                   media=_media_from(fields))


def result_body(route: Route, *, result: Mapping[str, Any] | None = None,
                error: EdgeError | None = None,
                timings: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The JSON result object every answer carries."""
    body: dict[str, Any] = {"id": route.request_id, "task": route.task}
    if error is not None:
        body["status"] = "error"
        body["error"] = error.to_dict()
    else:
        body["status"] = "ok"
        body["result"] = dict(result or {})
    if timings:
        body["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return body


def error_answer(route: Route, error: EdgeError, timings: Mapping[str, float] | None = None
                 ) -> Answer:
    """An error result for `route`."""
    return Answer(route=route, kind="result", body=result_body(route, error=error,
                                                              timings=timings))
