"""Key rotation while the daemon serves: the real CLI rotates, SIGHUP reloads, nothing drops."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge import constants as C
from edgectl.localdaemon import ROOT, Daemon
from keys import Keyring
from keys.rotation import file_key_ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _edgectl(config: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgectl.cli", "--config", str(config), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _events(daemon: Daemon, name: str) -> list[dict]:
    lines = (daemon.workdir / "worker-CPU.log").read_text(errors="replace").splitlines()
    docs = []
    for line in lines:
        try:
            docs.append(json.loads(line))
        except ValueError:
            continue
    return [d for d in docs if d.get("event") == name]


def _wait_for(predicate, what: str, timeout: float = 120.0, traffic=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if traffic is not None and traffic.failure is not None:
            raise AssertionError(f"a job got no answer: {traffic.failure!r}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class _Traffic:
    """One device sending tokenize jobs back to back until stopped; keeps every answer."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon, self.replies, self.stop = daemon, [], threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        models = ("all-minilm-l6-v2", "clip-vit-b32", "whisper-tiny.en")
        try:
            with self.daemon.device("dev-rot") as dev:
                i = 0
                while not self.stop.is_set():
                    reply = dev.request("tokenize", text=f"job {i}", request_id=f"r{i}",
                                        params={"model": models[i % 3]}, timeout=60)
                    self.replies.append(reply)
                    i += 1
        except BaseException as exc:  # a lost answer times out here: the test reports it
            self.failure = exc

    def __enter__(self) -> _Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "the device thread is stuck"
        assert self.failure is None, f"a job got no answer: {self.failure!r}"


def test_rotate_reload_retire_and_a_fresh_worker_while_jobs_flow(tmp_path, private_keys):
    root, ring_path = private_keys
    old = Keyring.load_file(ring_path).current_id
    daemon = Daemon(tmp_path, root, ring_path).start()
    try:
        first = daemon.workers[0]
        with _Traffic(daemon) as traffic:
            _wait_for(lambda: len(traffic.replies) >= 5, "first answers", traffic=traffic)
            rotated = _edgectl(daemon.config, "keys", "rotate")
            assert rotated.returncode == 0, rotated.stderr
            new = Keyring.load_file(ring_path).current_id
            assert new != old
            assert {k for p in root.rglob("*.enc") for k in file_key_ids(p)} == {new}
            first.send_signal(signal.SIGHUP)
            _wait_for(lambda: _events(daemon, "reload_done"), "reload_done in the worker log")
            after_reload = len(traffic.replies)
            _wait_for(lambda: len(traffic.replies) >= after_reload + 5, "answers after reload",
                      traffic=traffic)

            retired = _edgectl(daemon.config, "keys", "retire", old)
            assert retired.returncode == 0, retired.stderr
            assert Keyring.load_file(ring_path).ids() == [new]

            second = daemon.start_worker(wait=False)
            name = f"{socket.gethostname()}-CPU-{second.pid}".replace(".", "_")
            _wait_for(lambda: second.poll() is None and
                      daemon.conn.exists(C.WORKER_KEY.format(worker=name)),
                      "the fresh worker to announce itself")
            doc = json.loads(daemon.conn.get(C.WORKER_KEY.format(worker=name)))
            first.terminate()  # warm shutdown: RQ finishes the job in hand first
            first.wait(60)
            after_swap = len(traffic.replies)
            _wait_for(lambda: len(traffic.replies) >= after_swap + 6,
                      "answers from the new worker", traffic=traffic)
        assert second.poll() is None
    finally:
        daemon.stop()

    bad = [(r.body.get("id"), r.body.get("error")) for r in traffic.replies if not r.ok]
    assert bad == [], bad
    assert sorted(doc["models"]["tokenize"]) == ["all-minilm-l6-v2", "clip-vit-b32",
                                                 "whisper-tiny.en"]
    assert doc["unavailable"] == {}
    reload = _events(daemon, "reload_done")
    assert len(reload) == 1 and sorted(reload[0]["models"]["tokenize"]) == sorted(
        doc["models"]["tokenize"])
