"""Fixtures of the fault suite: a private daemon per test and worker processes on cue."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from edge import constants as C
from edgectl.localdaemon import Daemon

QUEUE = "edge.tokenize.CPU"


@pytest.fixture
def daemon(tmp_path, tokenizer_bundles, keyring_file):
    """Redis + Mosquitto + agent, no worker yet (each test starts the workers it needs)."""
    # one device stands in for many here: its own quota must not be what a fault test meets
    d = Daemon(tmp_path, tokenizer_bundles, keyring_file,
               tasks={"tokenize": {"devices": ["CPU"], "device_limit": 100},
                      "detokenize": {"devices": ["CPU"], "device_limit": 100}})
    try:
        yield d
    finally:
        d.stop()


def worker_name(proc: subprocess.Popen) -> str:
    return f"{socket.gethostname()}-CPU-{proc.pid}".replace(".", "_")


def spawn_worker(d: Daemon, fault: bool = False, *fault_args: str) -> subprocess.Popen:
    """A normal (or a misbehaving, see `fault_worker`) CPU worker process, its own log."""
    module = "tests.faults.fault_worker" if fault or fault_args else "workers.worker"
    proc = d._spawn(module, *fault_args, "--device", "CPU", log=f"worker-{len(d.workers)}.log")
    d.workers.append(proc)
    return proc


def start_worker(d: Daemon, fault: bool = False, timeout: float = 120.0) -> subprocess.Popen:
    """A normal (or a misbehaving) CPU worker; returns once it beats."""
    proc = spawn_worker(d, fault)
    key = C.ALIVE_KEY.format(queue=QUEUE)
    deadline = time.monotonic() + timeout
    while d.conn.zscore(key, worker_name(proc)) is None:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("worker never beat")
        time.sleep(0.1)
    return proc
