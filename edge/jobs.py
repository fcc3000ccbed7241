"""The data that crosses process boundaries: routes, jobs and outbox entries.

Everything here is a frozen dataclass with `to_json()` / `from_json()`; nothing else is written
to Redis by the daemon (RQ gets these as JSON arguments, never pickles).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


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


@dataclass(frozen=True, slots=True)
class Answer:
    """A result or a progress note on its way out (an outbox entry)."""

    route: Route
    kind: str  # "result" | "progress"
    body: Mapping[str, Any]
    media: tuple[tuple[str, bytes], ...] = field(default=())  # (content type, bytes)

    def to_fields(self) -> dict[str, bytes | str]:
        """Redis stream fields."""
        fields: dict[str, bytes | str] = {
            "kind": self.kind,
            "route": json.dumps(self.route.to_dict(), separators=(",", ":")),
            "body": json.dumps(self.body, separators=(",", ":")),
            "n": str(len(self.media)),
        }
        for i, (content_type, data) in enumerate(self.media):
            fields[f"t{i}"] = content_type
            fields[f"m{i}"] = data
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Answer:
        n = int(fields[b"n"])
        media = tuple((fields[f"t{i}".encode()].decode(), bytes(fields[f"m{i}".encode()]))
                      for i in range(n))
        return cls(route=Route.from_dict(json.loads(fields[b"route"])),
                   kind=fields[b"kind"].decode(), body=json.loads(fields[b"body"]), media=media)
