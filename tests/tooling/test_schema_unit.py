"""docs/schema against the code that defines the protocol: registry, error codes, parser, README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from edge import protocol
from edge.errors import CODES
from edge.protocol import Properties, Rejected
from edge.tasks import TASKS, Param
from tests.tooling.schemas import NAMES, errors, load

README = Path(__file__).resolve().parents[2] / "README.md"


def param_schema(p: Param) -> dict:
    """What the schema must say of one param (strings are accepted for every kind: MQTT 5 user
    properties carry only strings, and the envelope accepts the same)."""
    kind = {str: "string", int: "integer", float: "number", bool: "boolean"}[p.kind]
    s: dict = {"type": "string" if kind == "string" else [kind, "string"]}
    if p.kind is str:
        s["maxLength"] = p.max_len
        if p.choices:
            s["enum"] = list(p.choices)
    if p.low is not None:
        s["minimum"] = p.low
    if p.high is not None:
        s["maximum"] = p.high
    if p.default is not None:
        s["default"] = p.default
    return s


@pytest.mark.parametrize("name", NAMES)
def test_schema_is_valid_draft_2020_12(name):
    Draft202012Validator.check_schema(load(name))


@pytest.mark.parametrize("task", list(TASKS))
def test_request_schema_has_the_registry_inputs_and_params(task):
    spec = TASKS[task]
    tdef = load("request")["$defs"]["tasks"][task]
    assert tdef["required"] == ["id", *spec.inputs]
    assert set(tdef["properties"]) == {"id", "deadline", "content_type", "params", *spec.inputs}
    assert tdef["properties"]["params"]["properties"] == {
        n: param_schema(p) for n, p in spec.params.items()}


def test_every_task_and_error_code_is_in_the_answer_schema():
    answer = load("answer")["$defs"]
    assert answer["error"]["properties"]["error"]["properties"]["code"]["enum"] == list(CODES)
    assert set(answer["errors"]) == set(CODES)
    assert answer["ok"]["properties"]["task"]["enum"] == list(TASKS)
    assert set(answer["results"]) == set(TASKS)


def test_every_task_has_its_progress_documented():
    prog = load("progress")
    covered = set()
    for rule in prog["allOf"]:
        cond = rule["if"]["properties"]["task"]
        covered |= {cond["const"]} if "const" in cond else set(cond["enum"])
    assert covered == set(TASKS)


def envelope_examples() -> list[dict]:
    block = README.read_text().split("**JSON envelope**", 1)[1].split("```", 2)[1]
    block = re.sub(r"<base64[^>]*>", "iVBORw0KGgo=", block)  # the README's placeholders
    return [json.loads(line) for line in block.splitlines() if line.startswith("{")]


def test_readme_envelope_examples_conform():
    examples = envelope_examples()
    assert len(examples) >= 5
    for doc in examples:
        assert not errors("request", doc), (doc, errors("request", doc))


def test_readme_answer_examples_conform():
    text = README.read_text().split("### Answers", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    docs = json.loads("[" + re.sub(r"\}\n\{", "},{", text.strip()) + "]")
    assert [d["status"] for d in docs] == ["ok", "error"]
    for doc in docs:
        assert not errors("answer", doc), errors("answer", doc)


# (task, envelope): the parser and the schema must agree on each
CASES = [
    ("tokenize", {"id": "a", "text": "hi"}),
    ("tokenize", {"id": "a", "text": ["one", "two"], "params": {"add_special_tokens": "false"}}),
    ("tokenize", {"id": "a", "text": []}),
    ("tokenize", {"id": "a", "text": 5}),
    ("tokenize", {"text": "no id"}),
    ("tokenize", {"id": "has space", "text": "x"}),
    ("tokenize", {"id": "a/b", "text": "x"}),
    ("tokenize", {"id": "x" * 129, "text": "x"}),
    ("tokenize", {"id": "a", "text": "x", "params": {"nope": 1}}),
    ("tokenize", {"id": "a", "text": "x", "extra": 1}),
    ("tokenize", {"id": "a", "ids": [1, 2]}),
    ("tokenize", {"id": "a", "text": ["x"] * 257}),
    ("tokenize", {"id": "a", "text": "x", "deadline": 1e10}),
    ("tokenize", {"id": "a", "text": "x", "deadline": -1}),
    ("detokenize", {"id": "a", "ids": [101, 102]}),
    ("detokenize", {"id": "a", "ids": [[101], [102, 7]]}),
    ("detokenize", {"id": "a", "ids": [-1]}),
    ("detokenize", {"id": "a", "ids": [1.5]}),
    ("detokenize", {"id": "a", "ids": [2**31]}),
    ("lcm", {"id": "a", "text": "a cat", "params": {"steps": 4, "seed": "7"}}),
    ("lcm", {"id": "a", "text": "a cat", "params": {"steps": 9}}),
    ("lcm", {"id": "a", "text": "a cat", "params": {"guidance_scale": 31.0}}),
    ("lcm", {"id": "a", "text": "a cat", "params": {"format": "gif"}}),
    ("lcm", {"id": "a", "text": ["two", "prompts"]}),
    ("asr", {"id": "a", "data": "UklGRg==", "params": {"task": "translate", "channels": 2}}),
    ("asr", {"id": "a", "data": "UklGRg==", "params": {"task": "dance"}}),
    ("asr", {"id": "a", "data": "UklGRg==", "params": {"channels": 0}}),
    ("superres", {"id": "a", "data": ["iVBORw0KGgo=", "iVBORw0KGgo="], "params": {"mode": "quality"}}),
    ("superres", {"id": "a", "data": ["iVBORw0KGgo="] * 17}),
    ("superres", {"id": "a", "text": "not an image"}),
]


def parser_accepts(task: str, doc: dict) -> bool:
    """Whether the agent's parser takes the envelope (media content is the worker's to judge:
    only the envelope's shape is compared here)."""
    try:
        protocol.parse(f"edge/jobs/{task}/dev-1", json.dumps(doc).encode(), Properties(),
                       max_bytes={t: 1 << 20 for t in TASKS})
    except Rejected as exc:
        return exc.error.code == "unsupported_media"  # the bytes, not the shape
    return True


@pytest.mark.parametrize(("task", "doc"), CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
def test_schema_and_parser_agree(task, doc):
    schema_ok = not errors("request", doc, f"$defs/tasks/{task}")
    assert schema_ok == parser_accepts(task, doc), errors("request", doc, f"$defs/tasks/{task}")


def test_the_offline_status_the_agent_publishes_conforms():
    assert not errors("status", {"node": "gw-1", "online": False})
    assert errors("status", {"node": "gw-1", "online": False, "queues": {}})


PROTOCOL_MD = README.parent / "docs" / "protocol.md"


def test_protocol_doc_links_every_schema_and_documents_every_task_progress():
    text = PROTOCOL_MD.read_text()
    for name in NAMES:
        assert f"(schema/{name}.schema.json)" in text
    table = text.split("## Progress notes, per task", 1)[1].split("## ", 1)[0]
    for task in TASKS:
        assert f"`{task}`" in table, task
    # the fields the progress schema allows are the fields the table names
    for task, fields in (("asr", ("window", "windows")), ("superres", ("image", "images", "step", "steps")),
                         ("lcm", ("step", "steps"))):
        allowed = set(load("progress")["$defs"][task]["properties"]) - {"id", "task"}
        assert allowed == set(fields)
        row = next(line for line in table.splitlines() if line.startswith(f"| `{task}`"))
        assert all(f"`{f}`" in row for f in fields), row


def test_protocol_doc_names_every_mqtt5_property_the_code_sets_or_reads():
    import inspect

    from edge import mqtt, protocol
    from edgectl import client

    source = "".join(inspect.getsource(m) for m in (mqtt, protocol, client))
    table = PROTOCOL_MD.read_text().split("## MQTT 5 properties used", 1)[1]
    for attr, name in (("CorrelationData", "Correlation Data"), ("ResponseTopic", "Response Topic"),
                       ("ContentType", "Content Type"), ("UserProperty", "User Property"),
                       ("SessionExpiryInterval", "Session Expiry Interval"),
                       ("ReceiveMaximum", "Receive Maximum"),
                       ("MaximumPacketSize", "Maximum Packet Size")):
        assert attr in source, attr
        assert f"| {name} |" in table, name
