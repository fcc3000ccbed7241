"""Hypothesis strategies for what a device (or an attacker) can put in an MQTT message."""

from __future__ import annotations

import base64
import json

from hypothesis import strategies as st

from edge.protocol import Properties
from edge.tasks import TASKS

TASK_NAMES = sorted(TASKS)
PARAM_NAMES = sorted({p for spec in TASKS.values() for p in spec.params}) + ["id", "deadline"]

_text = st.text(max_size=40)
_ids = st.one_of(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                         min_size=1, max_size=20), _text, st.integers(), st.none())
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    _text)
_json = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)), max_leaves=12)
_param_value = st.one_of(_scalar, st.sampled_from(["true", "no", "1", "-3", "1e309", "nan",
                                                     "all-minilm-l6-v2", "clip-vit-b32",
                                                     "whisper-tiny.en", "x" * 300]))
_params = st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), _text), _param_value,
                          max_size=4)
_token_ids = st.one_of(st.lists(st.integers(-5, 2**32), max_size=8),
                       st.lists(st.lists(st.integers(0, 50000), max_size=5), max_size=4), _json)
_media = st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(["iVBORw0KGgo=", "/9j/", "UklGRgAAAABXQVZF", "not base64!", ""]),
    st.lists(st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode()), max_size=3),
    _json)


@st.composite
def envelopes(draw) -> bytes:
    doc: dict = {}
    if draw(st.booleans()) or draw(st.booleans()):
        doc["id"] = draw(_ids)
    if draw(st.booleans()):
        doc["params"] = draw(st.one_of(_params, _json))
    field = draw(st.sampled_from(["text", "ids", "data", "none", "junk"]))
    if field == "text":
        doc["text"] = draw(st.one_of(_text, st.lists(_text, max_size=5), _json))
    elif field == "ids":
        doc["ids"] = draw(_token_ids)
    elif field == "data":
        doc["data"] = draw(_media)
        if draw(st.booleans()):
            doc["content_type"] = draw(st.one_of(st.sampled_from(
                ["image/png", "audio/wav", "text/plain", "image/gif"]), _json))
    elif field == "junk":
        doc[draw(_text)] = draw(_json)
    if draw(st.booleans()):
        doc["deadline"] = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                         st.integers(), _text, st.none()))
    text = json.dumps(doc, allow_nan=True)
    if draw(st.integers(0, 9)) == 0:  # truncated or mangled JSON
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


payloads = st.one_of(envelopes(), st.binary(max_size=200),
                     st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.sampled_from([b"\x89PNG\r\n\x1a\n" + b"\0" * 8, b"RIFF\0\0\0\0WAVE",
                                      b"{", b"[]", b"null", b"{}" * 1000, b""]))

device_ids = st.one_of(st.sampled_from(["dev-1", "a", "x" * 64]),
                       st.text(max_size=70))
topics = st.one_of(
    st.builds(lambda t, d: f"edge/jobs/{t}/{d}", st.one_of(st.sampled_from(TASK_NAMES), _text),
              device_ids),
    st.text(max_size=60),
    st.sampled_from(["edge/jobs", "edge/jobs/tokenize", "edge/jobs/tokenize/a/b", "/", ""]))

properties = st.builds(
    Properties,
    content_type=st.one_of(st.none(), st.sampled_from(
        ["application/json", "text/plain", "image/png", "audio/wav", "APPLICATION/JSON; x=1",
         "text/plain; charset=utf-8", ""]), _text),
    correlation_data=st.one_of(st.none(), st.binary(max_size=80),
                               st.text(max_size=20).map(str.encode)),
    response_topic=st.one_of(st.none(), _text, st.sampled_from(["replies/+", "r/#", "r/x"])),
    user_properties=st.lists(st.tuples(st.one_of(st.sampled_from(PARAM_NAMES), _text),
                                       st.one_of(st.text(max_size=20),
                                                 _param_value.map(str))), max_size=4
                             ).map(tuple))

_good_id = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=24)


@st.composite
def plausible(draw, device_id: str = "dev-1") -> tuple[str, bytes, Properties]:
    """A message that is nearly right: one field or property may be off."""
    task = draw(st.sampled_from(["tokenize", "detokenize", "tokenize", "superres", "asr"]))
    doc: dict = {"id": draw(_good_id)}
    if task == "tokenize":
        doc["text"] = draw(st.one_of(_text, st.lists(_text, min_size=1, max_size=4)))
    elif task == "detokenize":
        doc["ids"] = draw(st.one_of(st.lists(st.integers(0, 30000), max_size=8),
                                    st.lists(st.lists(st.integers(0, 30000), max_size=5),
                                             min_size=1, max_size=3)))
    else:
        doc["data"] = draw(_media)
    if draw(st.booleans()):
        doc["params"] = draw(st.dictionaries(
            st.sampled_from(["model", "add_special_tokens", "skip_special_tokens"]),
            _param_value, max_size=2))
    if draw(st.integers(0, 4)) == 0:
        doc["deadline"] = draw(st.one_of(st.floats(0, 4e9), st.integers(-1, 2**40)))
    props = draw(st.one_of(st.just(Properties()), properties))
    raw = draw(st.integers(0, 4)) == 0
    if raw:  # MQTT 5 raw form: text payload, id in the correlation data
        payload = (doc.get("text") if isinstance(doc.get("text"), str) else "x").encode()
        props = Properties("text/plain", doc["id"].encode(), None, props.user_properties)
    else:
        payload = json.dumps(doc).encode()
    return f"edge/jobs/{task}/{device_id}", payload, props


hostile = st.tuples(topics, payloads, properties)
messages = st.one_of(plausible(), hostile)
