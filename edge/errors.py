"""The closed set of errors a client may be told about."""

from __future__ import annotations

CODES = (
    "bad_request",
    "unsupported_media",
    "payload_too_large",
    "unknown_task",
    "busy",
    "timeout",
    "model_unavailable",
    "internal",
)


class EdgeError(Exception):
    """An error with a client-facing code from `CODES` and a message safe to send."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The `error` object of a result."""
        return {"code": self.code, "message": self.message}


class BadRequest(EdgeError):
    """The job is malformed: bad JSON, missing fields, bad params."""

    code = "bad_request"


class UnsupportedMedia(EdgeError):
    """The payload is not a media type the task accepts (or cannot be decoded)."""

    code = "unsupported_media"


class PayloadTooLarge(EdgeError):
    """The payload (or its decoded form) is past the task's limit."""

    code = "payload_too_large"


class UnknownTask(EdgeError):
    """The topic names a task this gateway does not run."""

    code = "unknown_task"


class Busy(EdgeError):
    """A limit stops the job for now: the device's quota (`device_limit`), every queue of the
    task (`queue_limit`) or Redis' memory (`redis_full`); `limit` says which."""

    code = "busy"

    def __init__(self, message: str, limit: str = "queue_limit") -> None:
        super().__init__(message)
        self.limit = limit


class Timeout(EdgeError):
    """The job's deadline passed before or while it ran."""

    code = "timeout"


class ModelUnavailable(EdgeError):
    """No model for the job could be loaded on the device that took it."""

    code = "model_unavailable"


class Internal(EdgeError):
    """Anything unexpected; the traceback goes to the log, never to the client."""

    code = "internal"


def error_for(code: str, message: str) -> EdgeError:
    """Rebuild an error from its code (used when reading results back)."""
    for cls in (BadRequest, UnsupportedMedia, PayloadTooLarge, UnknownTask, Busy, Timeout,
                ModelUnavailable, Internal):
        if cls.code == code:
            return cls(message)
    return Internal(message)
