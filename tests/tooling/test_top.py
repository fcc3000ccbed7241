"""`edgectl top` and the progress bar of `edgectl submit`: unit checks, then a live daemon
driven under tmux (send-keys / capture-pane), as an operator at a terminal would see them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgectl.progressbar import bar, fraction
from edgectl.top import View
from tests.tooling.conftest import free_port_pair

ROOT = Path(__file__).resolve().parents[2]


def test_progress_fraction_of_every_task_with_progress():
    assert fraction({"window": 1, "windows": 4}) == (0.25, "window 1/4")
    assert fraction({"step": 3, "steps": 4}) == (0.75, "step 3/4")
    assert fraction({"image": 2, "images": 4}) == (0.5, "image 2/4")
    assert fraction({"image": 2, "images": 2, "step": 5, "steps": 10}) == (
        0.75, "image 2/2 step 5/10")
    assert fraction({"steps": "x"}) is None and fraction({}) is None
    assert bar(0.5, "step 2/4", width=10) == "[#####.....]  50%  step 2/4"


STATUS = {"node": "gw", "online": True, "outbox": 2, "outbox_oldest_s": 1.5,
          "redis": {"used_memory": 50, "maxmemory": 100, "full": False},
          "submitted": 7, "rejected": 1, "busy": 0,
          "queues": {"edge.tokenize.CPU": {"depth": 3, "limit": 100, "workers": 1},
                     "edge.asr.GPU": {"depth": 0, "limit": 10, "workers": 0}},
          "workers": {"gw-CPU-1": {"name": "gw-CPU-1", "device": "CPU",
                                   "models": {"tokenize": ["all-minilm-l6-v2"]},
                                   "unavailable": {"asr": "no asr bundle"}}}}


def worker_samples(ok: float, bad: float, cpu: float) -> dict:
    return {("edge_jobs_total", (("device", "CPU"), ("status", "ok"), ("task", "tokenize"))): ok,
            ("edge_jobs_total", (("device", "CPU"), ("status", "bad_request"),
                                 ("task", "tokenize"))): bad,
            ("edge_job_run_seconds_sum", (("device", "CPU"), ("task", "tokenize"))): 0.002 * ok,
            ("edge_job_run_seconds_count", (("device", "CPU"), ("task", "tokenize"))): ok,
            ("process_resident_memory_bytes", ()): 200 * 2**20,
            ("process_cpu_seconds_total", ()): cpu}


def test_frame_shows_queues_workers_rates_and_new_errors():
    view = View("gw", status=STATUS, status_at=99.0)
    view.update({}, {"CPU": worker_samples(10, 0, 1.0)}, now=100.0)
    view.update({}, {"CPU": worker_samples(30, 2, 1.5)}, now=102.0)
    text = "\n".join(view.lines(102.0))
    assert "node gw  online  status 3 s ago" in text
    assert "outbox 2 (oldest 1.5 s)  redis 50% of maxmemory" in text
    row = next(line for line in text.splitlines() if line.startswith("tokenize"))
    assert row.split()[:6] == ["tokenize", "11.0", "30", "2", "2.0", "-"]  # 22 jobs in 2 s
    assert "edge.asr.GPU" in text and "<- no worker" in text
    worker = next(line for line in text.splitlines() if line.startswith("gw-CPU-1"))
    assert worker.split()[:4] == ["gw-CPU-1", "CPU", "200", "25"]  # 0.5 CPU s in 2 s
    assert "asr UNAVAILABLE: no asr bundle" in text
    assert "tokenize    bad_request        +2 (worker)" in text


# -- live, under tmux

class Tmux:
    """A private tmux server (its own socket) running one command in a 200x60 pane."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is missing (Debian: tmux)")
        self.base = ["tmux", "-L", f"{name}-{os.getpid()}", "-f", "/dev/null"]
        shell = " ".join(_quote(c) for c in command) + "; echo EXIT=$?; sleep 600"
        subprocess.run([*self.base, "new-session", "-d", "-x", "200", "-y", "60", "-s", "t",
                        "-c", str(ROOT), "env", *[f"{k}={v}" for k, v in env.items()],
                        "sh", "-c", shell], check=True)

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", "t"], capture_output=True,
                              text=True, check=True).stdout

    def wait_for(self, *needles: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"never showed {needles}:\n{text}")
            time.sleep(0.3)

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "t", *keys], check=True)

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, packed_bundles, keyring_file):
    from edgectl.localdaemon import Daemon

    work = tmp_path_factory.mktemp("top")
    d = Daemon(work, packed_bundles("tokenize", "asr"), keyring_file, tasks={
        "tokenize": {"devices": ["CPU"]}, "detokenize": {"devices": ["CPU"]},
        "asr": {"devices": ["CPU"], "max_bytes": 8 << 20}})  # 35 s of 22 kHz speech, base64
    port = free_port_pair()
    d.config.write_text(f"metrics_port = {port}\n" + d.config.read_text())
    d.start_worker(queue="edge.asr.CPU")
    d.start_agent()
    wav = work / "speech.wav"
    # over 30 s of speech: two Whisper windows, two progress notes
    words = "the gateway reports its progress one window at a time. " * 14
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(wav), words], check=True)
    yield d, wav
    d.stop()


def edgectl(d, *args: str) -> list[str]:
    return [sys.executable, "-m", "edgectl.cli", "--config", str(d.config), *args]


@pytest.mark.integration
@pytest.mark.slow
def test_top_shows_the_live_gateway_and_quits_on_q(gateway):
    d, _ = gateway
    tmux = Tmux("edge-top", edgectl(d, "top", "--interval", "0.5"), {"PYTHONPATH": str(ROOT)})
    try:
        text = tmux.wait_for("node test-gw  online", "edge.tokenize.CPU", "edge.asr.CPU",
                             "all-minilm-l6-v2", "whisper-tiny.en", "(none since start)")
        worker = next(line for line in text.splitlines() if line.startswith("vm-") or
                      " CPU " in line and "RSS" not in line)
        assert worker.split()[2].isdigit()  # RSS from the worker's /metrics
        with d.device("dev-top") as dev:
            for i in range(3):
                assert dev.request("tokenize", text="hi", request_id=f"t-{i}").ok
            assert not dev.request("tokenize", text="x", request_id="t-bad",
                                   params={"model": "nope"}).ok
            assert not dev.request("nosuchtask", text="x", request_id="t-unknown").ok
        text = tmux.wait_for("bad_request        +1 (worker)", "unknown_task       +1 (agent)")
        row = next(line for line in text.splitlines() if line.startswith("tokenize "))
        assert row.split()[2:4] == ["3", "1"]  # ok, errors
        tmux.keys("q")
        tmux.wait_for("EXIT=0", timeout=15)
    finally:
        tmux.close()


@pytest.mark.integration
@pytest.mark.slow
def test_submit_draws_a_progress_bar_from_the_progress_topic(gateway):
    d, wav = gateway
    tmux = Tmux("edge-submit", edgectl(d, "submit", "asr", str(wav), "--device-id", "dev-bar"),
                {"PYTHONPATH": str(ROOT)})
    try:
        text = tmux.wait_for("EXIT=0", timeout=90)
        assert "asr [##############################] 100%  window 2/2" in text
        assert '"status": "ok"' in text and "gateway" in text.lower()
    finally:
        tmux.close()
