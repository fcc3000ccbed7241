"""examples/: the shell one-liners, the Node.js (MQTT.js) and C (libmosquitto) devices, each run
against a demo stack (private Mosquitto + Redis, agent, CPU worker) and judged by its answer.

The stack serves tokenize, detokenize and asr (their bundles are prepared offline here);
superres and lcm are configured without bundles, so their examples get `model_unavailable`:
that proves the request was well formed (a malformed one is `bad_request`), not that an image
comes back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgectl.localdaemon import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PNG_1x1 = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
                        "53de0000000c4944415408d763f8ffff3f0005fe02fea7d605ee0000000049454e44ae426082")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, packed_bundles, keyring_file):
    work = tmp_path_factory.mktemp("examples")
    d = Daemon(work, packed_bundles("tokenize", "asr"), keyring_file, tasks={
        t: {"devices": ["CPU"]} for t in ("tokenize", "detokenize", "asr", "superres", "lcm")})
    d.start_worker(queue="edge.asr.CPU")
    d.start_agent()
    wav = work / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), "the quick brown fox"],
                   check=True)
    png = work / "tiny.png"
    png.write_bytes(PNG_1x1)
    yield d, wav, png
    d.stop()


def cli(stack, *args: str, device: str = "dev-cli", extra: dict | None = None) -> str:
    d = stack[0]
    env = dict(os.environ, MQTT_HOST="127.0.0.1", MQTT_PORT=str(d.broker.port), DEVICE=device,
               WAIT="60", **(extra or {}))
    out = subprocess.run(["bash", str(EXAMPLES / "mqtt-cli.sh"), *args], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


def answer(stack, *args: str) -> dict:
    return json.loads(cli(stack, *args).strip().splitlines()[-1])


def test_cli_lists_an_example_of_every_task_in_both_forms():
    from edge.tasks import TASKS

    names = {line.split(":")[0] for line in
             subprocess.run(["bash", str(EXAMPLES / "mqtt-cli.sh"), "list"], capture_output=True,
                            text=True, check=True).stdout.splitlines()}
    for task in TASKS:
        assert task in names
    assert {"tokenize-raw", "asr-raw", "superres-raw", "lcm-raw", "status", "progress"} <= names


def test_cli_tokenize_envelope_and_raw(stack):
    env = answer(stack, "tokenize")
    assert env["status"] == "ok" and env["id"] == "tok-1"
    assert [ids[0] for ids in env["result"]["ids"]] == [101, 101]
    raw = answer(stack, "tokenize-raw")
    assert raw["status"] == "ok" and raw["id"] == "tok-2"
    assert raw["result"]["ids"] == env["result"]["ids"][0]


def test_cli_detokenize(stack):
    got = answer(stack, "detokenize")
    assert got["status"] == "ok" and got["result"]["text"] == "hello world"


def test_cli_asr_raw_and_envelope_transcribe_the_wav(stack):
    _, wav, _ = stack
    for name, rid in (("asr-raw", "asr-1"), ("asr", "asr-2")):
        got = answer(stack, name, str(wav))
        assert got["status"] == "ok" and got["id"] == rid, got
        assert "fox" in got["result"]["text"].lower(), got


@pytest.mark.parametrize(("name", "rid"), [("superres", "sr-1"), ("superres-raw", "sr-2"),
                                           ("lcm", "lcm-1"), ("lcm-raw", "lcm-2")])
def test_cli_superres_and_lcm_requests_are_well_formed(stack, name, rid):
    args = (name, str(stack[2])) if name.startswith("superres") else (name,)
    if name.endswith("-raw"):  # the answer's bytes go to $OUT (an image, or a JSON error)
        out = stack[0].workdir / f"{rid}.out"
        cli(stack, *args, extra={"OUT": str(out)})
        got = json.loads(out.read_bytes())
    else:
        got = answer(stack, *args)
    assert got["id"] == rid
    assert got["error"]["code"] == "model_unavailable", got  # not bad_request


def test_cli_status_and_progress(stack):
    d, wav, _ = stack
    doc = json.loads(cli(stack, "status"))
    assert doc["online"] is True and doc["node"] == d.node
    env = dict(os.environ, MQTT_HOST="127.0.0.1", MQTT_PORT=str(d.broker.port), DEVICE="dev-prog",
               WAIT="60")
    watcher = subprocess.Popen(["bash", str(EXAMPLES / "mqtt-cli.sh"), "progress", "1"], env=env,
                               stdout=subprocess.PIPE, text=True)
    try:
        # progress is QoS 0 and not kept for late subscribers: send until the watcher has one
        for _ in range(10):
            cli(stack, "asr-raw", str(wav), device="dev-prog")
            try:
                out, _ = watcher.communicate(timeout=2)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            pytest.fail("the progress one-liner saw no progress note")
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    topic, payload = out.strip().split(" ", 1)
    assert topic == "edge/progress/dev-prog/asr-1"
    assert json.loads(payload) == {"id": "asr-1", "task": "asr", "window": 1, "windows": 1}


def test_node_device_gets_its_answer_by_response_topic_and_correlation_data(stack):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js example is not run")
    if not (EXAMPLES / "node" / "node_modules" / "mqtt").is_dir():
        pytest.fail("examples/node/node_modules is missing: scripts/setup.sh runs `npm ci` there")
    d, wav, _ = stack

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([node, "device.mjs", "--port", str(d.broker.port),
                               "--device", "dev-node", "--timeout", "60", *args],
                              cwd=EXAMPLES / "node", capture_output=True, text=True, timeout=90)

    out = run("--task", "tokenize", "--text", "hello world", "--param", "model=all-minilm-l6-v2",
              "--id", "node-1")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["id"] == "node-1" and got["status"] == "ok"
    assert got["result"]["ids"] == [101, 7592, 2088, 102]
    out = run("--task", "asr", "--file", str(wav), "--id", "node-2")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["status"] == "ok" and "fox" in got["result"]["text"].lower()
    assert 'progress {"id":"node-2","task":"asr","window":1,"windows":1}' in out.stderr
    out = run("--task", "tokenize", "--text", "x", "--param", "nope=1", "--id", "node-3")
    assert json.loads(out.stdout)["error"]["code"] == "bad_request"


def test_c_device_transcribes_a_wav(stack, tmp_path):
    d, wav, _ = stack
    exe = tmp_path / "device"
    build = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                            str(EXAMPLES / "c" / "device.c"), "-lmosquitto"],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe), "127.0.0.1", str(d.broker.port), "dev-c", str(wav), "c-1"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["id"] == "c-1" and got["task"] == "asr" and got["status"] == "ok", got
    assert "fox" in got["result"]["text"].lower()
    assert got["result"]["segments"]
