"""Model versions on a live daemon (real Mosquitto, Redis, agent and worker processes): jobs
flow at a steady rate while a version is activated and rolled back with `edgectl models`;
every job is answered `ok` exactly once, by one version that the answer names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import keys
from edge import alive
from edge.status import serving_versions
from edgectl.localdaemon import ROOT, Daemon
from keys import layout
from tests.conftest import PREPARED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "all-minilm-l6-v2"


def _version_of(prepared: Path, dst: Path, version: str, *, break_ir: bool = False) -> Path:
    """The prepared tokenizer copied as another version (its IR garbled when `break_ir`: it
    still packs and decrypts, but cannot compile)."""
    folder = dst / f"v{version}"
    shutil.copytree(prepared, folder)
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["version"] = version
    (folder / "bundle.json").write_text(json.dumps(manifest))
    if break_ir:
        for xml in manifest["settings"]["tokenizer"].values():
            (folder / xml).write_text("<net name='garbled'>")
    return folder


@pytest.fixture
def versioned(tmp_path, keyring_file):
    """A bundle dir with the MiniLM tokenizer as versions 1 and 2 (1 serving), and a version
    3 that fails to compile."""
    from workers.tokenize.prepare import prepare

    (prepared,) = prepare(PREPARED, options={"models": NAME})
    root = tmp_path / "bundles"
    ring = keys.Keyring.load_file(keyring_file)
    for version in ("1", "2"):
        keys.pack_bundle(_version_of(prepared, tmp_path, version), root, ring)
    keys.pack_bundle(_version_of(prepared, tmp_path, "3", break_ir=True), root, ring)
    return root


@pytest.fixture
def daemon(tmp_path, versioned, keyring_file):
    # quotas out of the way: a compile shares the CPU with the jobs, which queue meanwhile
    roomy = {"devices": ["CPU"], "queue_limit": 10_000, "device_limit": 10_000}
    d = Daemon(tmp_path, versioned, keyring_file,
               tasks={"tokenize": roomy, "detokenize": {"devices": ["CPU"]}}).start()
    yield d
    d.stop()


def _edgectl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgectl.cli", "--config", str(daemon.config),
                           "models", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


class Flow:
    """Sends one tokenize job every `period` s from a thread; remembers when each publish
    began and when the broker had it (PUBACK): the job reached the gateway in between."""

    def __init__(self, dev, period: float = 0.1) -> None:
        self.dev, self.period = dev, period
        self.sent: list[tuple[str, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            rid, began = f"flow-{n}", time.perf_counter()
            self.dev.publish_envelope("tokenize", {"id": rid, "text": f"steady job {n}"})
            self.sent.append((rid, began, time.perf_counter()))
            n += 1
            self._stop.wait(self.period)

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_activate_and_rollback_under_steady_load_answer_every_job_once(daemon):
    model_dir = daemon.workdir / "bundles" / f"tokenize--{NAME}"
    assert layout.read_serving(model_dir) == ["1"]  # installing 2 and 3 did not activate them
    marks: dict[str, tuple[float, float]] = {}
    probes: dict[str, str] = {}
    with daemon.device("dev-flow") as dev:
        first = dev.request("tokenize", text="before", timeout=30)
        assert first.ok and first.body["result"]["model"] == NAME
        assert first.body["result"]["version"] == "1"
        with Flow(dev) as flow:
            time.sleep(1.0)
            for step, args in (("activate", ("activate", NAME, "2")),
                               ("rollback", ("rollback", NAME))):
                start = time.perf_counter()
                done = _edgectl(daemon, *args)
                marks[step] = (start, time.perf_counter())
                assert done.returncode == 0, done.stdout + done.stderr
                probe = dev.request("tokenize", text="probe", timeout=60)  # sent after it returned
                probes[step] = probe.body["result"]["version"]
                time.sleep(1.0)
            start = time.perf_counter()
            broken = _edgectl(daemon, "activate", NAME, "3")
            marks["broken"] = (start, time.perf_counter())
            time.sleep(1.0)
        answers = {rid: dev.wait(rid, timeout=60) for rid, _, _ in flow.sent}
        time.sleep(1.0)  # a second answer to any job would have arrived by now
        extra = {rid: dev.answers_so_far(rid) for rid, _, _ in flow.sent}
        pinned = dev.request("tokenize", text="pinned", params={"model": f"{NAME}@2"})
        failed = dev.request("tokenize", text="never", params={"model": f"{NAME}@3"})

    assert broken.returncode == 1 and "NOT activated" in broken.stderr, broken.stderr
    assert "failed" in broken.stderr
    assert layout.read_serving(model_dir)[0] == "1"
    assert all(not more for more in extra.values()), "a job was answered twice"
    assert all(a.ok for a in answers.values()), [a.body for a in answers.values() if not a.ok]
    by_time = []
    for rid, began, _ in flow.sent:
        result = answers[rid].body["result"]
        assert result["model"] == NAME and result["version"] in ("1", "2"), result
        by_time.append((began, answers[rid].received, result["version"]))
    act, back = marks["activate"], marks["rollback"]
    # answered before a switch began: ran before it; sent after it returned: ran after it
    assert {v for _, answered, v in by_time if answered < act[0]} == {"1"}
    assert probes == {"activate": "2", "rollback": "1"}
    assert {v for began, answered, v in by_time if act[1] < began and answered < back[0]} <= {"2"}
    assert {v for began, _, v in by_time if began > back[1]} == {"1"}  # 3 never served
    assert len(flow.sent) > 50
    # the version that served before stays loaded: name@version reaches it without a compile
    assert pinned.ok and pinned.body["result"]["version"] == "2"
    assert failed.body["error"]["code"] == "model_unavailable"


def test_models_ls_and_remove_refuses_the_serving_version(daemon):
    listed = _edgectl(daemon, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["serving"], row["versions"]) == (NAME, "1", ["1", "2", "3"])
    assert _edgectl(daemon, "remove", NAME, "1").returncode == 1
    removed = _edgectl(daemon, "remove", NAME, "3")
    assert removed.returncode == 0, removed.stderr
    assert not (daemon.workdir / "bundles" / f"tokenize--{NAME}" / "3").exists()
    with daemon.device("dev-ls") as dev:
        assert dev.request("tokenize", text="still", timeout=30).body["result"]["version"] == "1"
    assert _edgectl(daemon, "activate", NAME, "2").returncode == 0
    # the status every worker publishes (edgectl status, the status topic) names the version
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline:
        docs = alive.worker_docs(daemon.conn)
        if serving_versions(docs) == {f"tokenize--{NAME}": ["2"]}:
            break
        time.sleep(0.5)
    (doc,) = docs.values()
    assert doc["versions"]["tokenize"][NAME] == {"serving": "2", "loaded": ["1", "2"]}
    assert serving_versions(docs) == {f"tokenize--{NAME}": ["2"]}
