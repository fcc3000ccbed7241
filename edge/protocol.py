"""The MQTT protocol as pure functions: a message in -> a Submission; an Answer -> messages out.

Two payload forms are detected, not configured:

* raw: the payload is the media (or UTF-8 text) itself; MQTT 5 properties carry the rest
  (content type, correlation data = request id, user properties = params, response topic);
* envelope: a JSON object `{"id", "params", "text" | "ids" | "data" (base64, or lists)}` for
  MQTT 3.1.1 clients.

Answers go back in the form they were asked in. Nothing here touches the network.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge import constants as C
from edge.errors import BadRequest, EdgeError, PayloadTooLarge, UnknownTask, UnsupportedMedia
from edge.jobs import Answer, Route
from edge.tasks import TASKS, TaskSpec

JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Properties:
    """The MQTT 5 properties the protocol reads or writes (none for MQTT 3.1.1)."""

    content_type: str | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Submission:
    """A parsed, validated request: where to answer, what to run, on what."""

    route: Route
    params: Mapping[str, Any]
    text: str | tuple[str, ...] | None = None
    ids: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    media: tuple[tuple[str, bytes], ...] = ()
    batch: bool = False
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One MQTT message to publish."""

    topic: str
    payload: bytes
    qos: int
    properties: Properties = field(default_factory=Properties)


class Rejected(Exception):
    """A request that gets an error answer (when we know where to send it) or is dropped."""

    def __init__(self, error: EdgeError, route: Route | None) -> None:
        super().__init__(error.message)
        self.error, self.route = error, route


def parse_topic(topic: str) -> tuple[str, str]:
    """(task, device_id) from `edge/jobs/<task>/<device_id>`; BadRequest if it is not one."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "edge" or parts[1] != "jobs":
        raise BadRequest(f"not a job topic: {topic[:100]!r}")
    if not C.DEVICE_ID_RE.fullmatch(parts[3]):
        raise BadRequest("bad device id in topic")
    return parts[2], parts[3]


def parse(topic: str, payload: bytes, props: Properties, *, max_bytes: Mapping[str, int],
          now: float | None = None, json_depth: int = C.DEFAULT_JSON_DEPTH) -> Submission:
    """Parse and validate one job message; raise Rejected with the route when one is known.

    Cost is checked before it is paid: a task this gateway does not serve, or a payload over
    its task's `max_bytes`, is refused before any JSON is parsed (its request id is then looked
    for cheaply, see `_cheap_id`); an envelope nested deeper than `json_depth` is refused
    before it is parsed.
    """
    now = time.time() if now is None else now
    try:
        task, device_id = parse_topic(topic)
    except EdgeError as exc:
        raise Rejected(exc, None) from None
    envelope = _looks_like_envelope(payload, props)
    spec, limit = TASKS.get(task), max_bytes.get(task)
    refusal: EdgeError | None = None
    if spec is None:
        refusal = UnknownTask(f"unknown task {task[:64]!r} (known: {', '.join(TASKS)})")
    elif limit is None:
        refusal = UnknownTask(f"task {task!r} is not served by this gateway")
    elif len(payload) > limit:
        refusal = PayloadTooLarge(f"payload is {len(payload)} bytes; the limit for {task} is "
                                  f"{limit} (tasks.{task}.max_bytes)")
    if refusal is not None or spec is None or limit is None:
        route = _route(task, device_id, _cheap_id(payload, props, envelope), props, envelope)
        raise Rejected(refusal or UnknownTask(task), route)
    doc: Any = None
    if envelope:
        try:
            doc = _load_json(payload, json_depth)
        except EdgeError as exc:
            route = _route(task, device_id, _cheap_id(payload, props, envelope), props,
                           envelope)
            raise Rejected(exc, route) from None
    try:
        request_id = _request_id(doc, props, envelope)
    except EdgeError as exc:
        route = _route(task, device_id, "-", props, envelope)
        raise Rejected(exc, route) from None
    route = _route(task, device_id, request_id, props, envelope)
    try:
        if envelope:
            return _from_envelope(spec, route, doc, limit, now)
        return _from_raw(spec, route, payload, props, now)
    except EdgeError as exc:
        raise Rejected(exc, route) from None


def _looks_like_envelope(payload: bytes, props: Properties) -> bool:
    if props.content_type is not None:
        return props.content_type.split(";")[0].strip().lower() == JSON_TYPE
    return payload[:1] == b"{" or payload[:64].lstrip()[:1] == b"{"


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_CHEAP_ID = re.compile(rb'[{,]\s*"id"\s*:\s*"([\x21\x23-\x5b\x5d-\x7e]{1,128})"')
CHEAP_ID_WINDOW = 4096  # bytes of a refused envelope searched for its "id"


def _load_json(payload: bytes, depth: int) -> Any:
    """The parsed envelope, after checking its nesting without parsing it."""
    opened = payload.count(b"[") + payload.count(b"{")
    if opened > depth and _nesting(payload) > depth:
        raise BadRequest(f"the JSON envelope is nested deeper than {depth} levels "
                         "(limits.json_depth)")
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        raise BadRequest("payload is not valid JSON") from None


def _nesting(payload: bytes, chunk: int = 1 << 20) -> int:
    """How deep the brackets of a JSON text nest (strings skipped); no parse, no recursion,
    memory bounded by `chunk` whatever the size."""
    brackets = _JSON_STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    level = deepest = 0
    for start in range(0, len(brackets), chunk):
        steps = np.frombuffer(brackets, np.uint8, min(chunk, len(brackets) - start), start)
        levels = np.cumsum(np.where((steps == 91) | (steps == 123), 1, -1).astype(np.int32))
        deepest = max(deepest, level + int(levels.max()))
        level += int(levels[-1])
    return deepest


def _cheap_id(payload: bytes, props: Properties, envelope: bool) -> str:
    """The request id of a message that is refused before it is parsed, found without parsing
    it: the correlation data, an `id` user property, or an envelope's `"id"` string among its
    first CHEAP_ID_WINDOW bytes (devices put it first); else "-"."""
    try:
        if not envelope or props.correlation_data is not None:
            return _request_id(None, props, False)
    except EdgeError:
        pass
    found = _CHEAP_ID.search(payload, 0, CHEAP_ID_WINDOW) if envelope else None
    return found.group(1).decode("ascii") if found else "-"


def _request_id(doc: Any, props: Properties, envelope: bool) -> str:
    if envelope:
        rid = doc.get("id") if isinstance(doc, dict) else None
        if rid is None and props.correlation_data is not None:
            return _id_from_correlation(props.correlation_data)
        if not isinstance(rid, str) or not C.REQUEST_ID_RE.fullmatch(rid) or "/" in rid \
                or "+" in rid or "#" in rid:
            raise BadRequest("envelope needs an \"id\": 1-128 printable ASCII characters, "
                             "no spaces, '/', '+' or '#'")
        return rid
    if props.correlation_data is not None:
        return _id_from_correlation(props.correlation_data)
    for key, value in props.user_properties:
        if key == "id" and C.REQUEST_ID_RE.fullmatch(value) and not set(value) & set("/+#"):
            return value
    raise BadRequest("raw request needs MQTT 5 correlation data or an 'id' user property")


def _id_from_correlation(data: bytes) -> str:
    """Correlation data used as the request id: as text when it is safe in a topic, else hex."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if text and C.REQUEST_ID_RE.fullmatch(text) and not set(text) & set("/+#"):
        return text
    if not data or len(data) > 64:
        raise BadRequest("correlation data must be 1-64 bytes")
    return data.hex()


def _route(task: str, device_id: str, request_id: str, props: Properties, envelope: bool) -> Route:
    topic = props.response_topic
    if topic is None or not _own_response_topic(topic, device_id):
        topic = C.RESULT_TOPIC.format(device_id=device_id, request_id=request_id)
    corr = props.correlation_data.hex() if props.correlation_data else None
    return Route(device_id=device_id, request_id=request_id, task=task,
                 form="envelope" if envelope else "raw", topic=topic, correlation=corr)


def _own_response_topic(topic: str | None, device_id: str) -> bool:
    """A response topic is honoured inside the device's own results tree only: the broker's ACL
    lets the agent write there and the device read there, and a device cannot aim its answers
    at another device. Any other response topic is ignored (the answer goes to the default)."""
    prefix = C.RESULT_TOPIC.format(device_id=device_id, request_id="")
    return (topic is not None and topic.startswith(prefix) and len(topic) > len(prefix)
            and not set(topic) & set("+#") and len(topic) <= 512)


def _from_envelope(spec: TaskSpec, route: Route, doc: Any, limit: int,
                   now: float) -> Submission:
    if not isinstance(doc, dict):
        raise BadRequest("envelope must be a JSON object")
    allowed = {"id", "params", "deadline", "content_type", *spec.inputs}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise BadRequest(f"unknown envelope field {unknown[0]!r} for task {spec.name!r} "
                         f"(expects {', '.join(spec.inputs)})")
    raw_params = doc.get("params", {})
    if not isinstance(raw_params, dict):
        raise BadRequest("\"params\" must be an object")
    params = spec.validate_params(raw_params)
    deadline = _deadline(doc.get("deadline"))
    if "text" in spec.inputs:
        text, batch = _texts(doc.get("text"), spec)
        return Submission(route, params, text=text, batch=batch, deadline=deadline)
    if "ids" in spec.inputs:
        ids, batch = _ids(doc.get("ids"), spec)
        return Submission(route, params, ids=ids, batch=batch, deadline=deadline)
    media, batch = _media(doc.get("data"), doc.get("content_type"), spec, limit)
    return Submission(route, params, media=media, batch=batch, deadline=deadline)


def _from_raw(spec: TaskSpec, route: Route, payload: bytes, props: Properties,
              now: float) -> Submission:
    raw_params = {k: v for k, v in props.user_properties if k not in ("id", "deadline")}
    params = spec.validate_params(raw_params)
    deadline = _deadline(dict(props.user_properties).get("deadline"))
    if "text" in spec.inputs:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("text payload is not valid UTF-8") from None
        return Submission(route, params, text=text, deadline=deadline)
    if "ids" in spec.inputs:
        raise BadRequest(f"task {spec.name!r} takes a JSON envelope with \"ids\"")
    content_type = _media_type(payload, props.content_type, spec)
    return Submission(route, params, media=((content_type, payload),), deadline=deadline)


def _deadline(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise BadRequest("\"deadline\" must be a unix time in seconds") from None
    if not out > 0 or out != out or out == float("inf"):
        raise BadRequest("\"deadline\" must be a unix time in seconds")
    return out


def _texts(value: Any, spec: TaskSpec) -> tuple[str | tuple[str, ...], bool]:
    if isinstance(value, str):
        return value, False
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if not value:
            raise BadRequest("\"text\" list is empty")
        if len(value) > spec.max_items:
            raise BadRequest(f"at most {spec.max_items} texts per job")
        return tuple(value), True
    raise BadRequest("\"text\" must be a string or a list of strings")


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


def _ids(value: Any, spec: TaskSpec) -> tuple[Any, bool]:
    if isinstance(value, list) and all(_is_id(v) for v in value):
        return tuple(value), False
    if isinstance(value, list) and value and all(
            isinstance(row, list) and all(_is_id(v) for v in row) for row in value):
        if len(value) > spec.max_items:
            raise BadRequest(f"at most {spec.max_items} id lists per job")
        return tuple(tuple(row) for row in value), True
    raise BadRequest("\"ids\" must be a list of token ids (ints >= 0) or a list of such lists")


def _media(value: Any, content_type: Any, spec: TaskSpec,
           limit: int) -> tuple[tuple[tuple[str, bytes], ...], bool]:
    batch = isinstance(value, list)
    items = value if batch else [value]
    if value is None or not items:
        raise BadRequest("\"data\" (base64, or a list of base64 strings) is required")
    if len(items) > spec.max_items:
        raise BadRequest(f"at most {spec.max_items} items per job")
    types = content_type if isinstance(content_type, list) else [content_type] * len(items)
    if len(types) != len(items) or not all(t is None or isinstance(t, str) for t in types):
        raise BadRequest("\"content_type\" must be a string or a list as long as \"data\"")
    out = []
    for item, ctype in zip(items, types, strict=True):
        if not isinstance(item, str):
            raise BadRequest("\"data\" items must be base64 strings")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("\"data\" is not valid base64") from None
        if len(data) > limit:
            raise PayloadTooLarge(f"an item is {len(data)} bytes; the limit is {limit}")
        out.append((_media_type(data, ctype, spec), data))
    return tuple(out), batch


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"WEBP", 8, "image/webp"),
    (b"WAVE", 8, "audio/wav"),
)


def sniff(data: bytes) -> str | None:
    """The media type told by the first bytes, or None."""
    for magic, offset, ctype in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return ctype
    return None


def _media_type(data: bytes, declared: str | None, spec: TaskSpec) -> str:
    if not data:
        raise BadRequest("the payload is empty")
    declared = declared.split(";")[0].strip() if declared else None
    ctype = declared or sniff(data) or "application/octet-stream"
    if ctype not in spec.media_types:
        raise UnsupportedMedia(f"{ctype!r} is not accepted by {spec.name} "
                               f"(accepted: {', '.join(spec.media_types)})")
    return ctype


# ---------------------------------------------------------------- answers


def render(answer: Answer) -> Outgoing:
    """The MQTT message for an outbox entry, in the form the request was made in."""
    route = answer.route
    corr = bytes.fromhex(route.correlation) if route.correlation else None
    if answer.kind == "progress":
        topic = C.PROGRESS_TOPIC.format(device_id=route.device_id, request_id=route.request_id)
        body = {"id": route.request_id, "task": route.task, **answer.body}
        return Outgoing(topic, _dumps(body), 0, Properties(JSON_TYPE, corr))
    body = dict(answer.body)
    if route.form == "raw" and len(answer.media) == 1 and body.get("status") == "ok":
        ctype, data = answer.media[0]
        user = [("id", route.request_id), ("task", route.task), ("status", "ok"),
                ("result", json.dumps(body.get("result", {}), separators=(",", ":")))]
        if "timings" in body:
            user.append(("timings", json.dumps(body["timings"], separators=(",", ":"))))
        return Outgoing(route.topic, data, 1, Properties(ctype, corr, None, tuple(user)))
    if answer.media:
        result = dict(body.get("result", {}))
        result["media"] = [{"content_type": t, "data": base64.b64encode(d).decode("ascii")}
                           for t, d in answer.media]
        body["result"] = result
    return Outgoing(route.topic, _dumps(body), 1, Properties(JSON_TYPE, corr))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def user_properties(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Normalised user properties (paho gives a list of pairs)."""
    return tuple((str(k), str(v)) for k, v in pairs)
