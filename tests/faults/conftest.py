"""Fixtures of the fault suite: a private daemon per test and worker processes on cue."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from edge import constants as C
from edge.localdaemon import Daemon

QUEUE = "edge.tokenize.CPU"


@pytest.fixture
def daemon(tmp_path, tokenizer_bundles, keyring_file):
    """Redis + Mosquitto + agent, no worker yet (each test starts the workers it needs)."""
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file)
    try:
        yield d
    finally:
        d.stop()


def worker_name(proc: subprocess.Popen) -> str:
    return f"{socket.gethostname()}-CPU-{proc.pid}".replace(".", "_")


def start_worker(d: Daemon, fault: bool = False, timeout: float = 120.0) -> subprocess.Popen:
    """A normal (or a misbehaving) CPU worker; returns once it beats."""
    module = "tests.faults.fault_worker" if fault else "workers.worker"
    proc = d._spawn(module, "--device", "CPU", log=f"worker-{len(d.workers)}.log")
    d.workers.append(proc)
    key = C.ALIVE_KEY.format(queue=QUEUE)
    deadline = time.monotonic() + timeout
    while d.conn.zscore(key, worker_name(proc)) is None:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("worker never beat")
        time.sleep(0.1)
    return proc
