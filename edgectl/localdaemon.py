"""A whole daemon on one machine: private Mosquitto and Redis, an agent and workers as processes.

Used by `make demo` and by the integration and fault tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import redis
from paho.mqtt.enums import CallbackAPIVersion

from edge import constants as C
from edgectl.client import DeviceClient
from edgectl.localservices import MosquittoServer, RedisServer

ROOT = Path(__file__).resolve().parents[1]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, *, node: str, mqtt_port: int, redis_url: str, bundle_dir: Path,
                 keyring_file: Path, tasks: dict[str, dict[str, Any]],
                 extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """A daemon TOML pointing at private services."""
    lines = [f"node = {_toml(node)}", f"bundle_dir = {_toml(bundle_dir)}",
             'log_format = "json"', "", "[keyring]", f"file = {_toml(keyring_file)}",
             "env = \"EDGE_TEST_NO_KEYRING_ENV\"",
             "", "[mqtt]", 'host = "127.0.0.1"', f"port = {mqtt_port}",
             f"client_id = {_toml('agent-' + node)}",
             "", "[redis]", f"url = {_toml(redis_url)}"]
    for section, values in (extra or {}).items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
    for task, values in tasks.items():
        lines += ["", f"[tasks.{task}]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """Mosquitto + Redis + `edge-agent` + `edge-worker` processes, all private to one run."""

    def __init__(self, workdir: Path, bundle_dir: Path, keyring_file: Path,
                 tasks: dict[str, dict[str, Any]] | None = None, node: str = "test-gw",
                 extra: dict[str, dict[str, Any]] | None = None,
                 appendfsync: str = "always") -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", appendfsync=appendfsync).start()
        self.broker = MosquittoServer(workdir / "mosquitto").start()
        self.node = node
        self.tasks = tasks or {"tokenize": {"devices": ["CPU"]},
                               "detokenize": {"devices": ["CPU"]}}
        self.config = write_config(workdir / "edge.toml", node=node,
                                   mqtt_port=self.broker.port, redis_url=self.redis.url,
                                   bundle_dir=bundle_dir, keyring_file=keyring_file,
                                   tasks=self.tasks, extra=extra)
        self.agent: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.conn = redis.Redis.from_url(self.redis.url)

    # -- processes

    def _spawn(self, module: str, *args: str, log: str) -> subprocess.Popen:
        # as in the systemd units: numpy's BLAS threads must not spin on OpenVINO's cores
        env = dict(os.environ, EDGE_CONFIG=str(self.config), PYTHONUNBUFFERED="1",
                   OPENBLAS_NUM_THREADS="1")
        out = open(self.workdir / log, "ab")
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)

    def start_agent(self, wait: bool = True) -> subprocess.Popen:
        self.agent = self._spawn("edge.agent", log="agent.log")
        if wait:
            self.wait_online()
        return self.agent

    def start_worker(self, device: str = "CPU", wait: bool = True,
                     queue: str = "edge.tokenize.CPU") -> subprocess.Popen:
        proc = self._spawn("workers.worker", "--device", device, log=f"worker-{device}.log")
        self.workers.append(proc)
        if wait:
            self.wait_worker(queue, proc)
        return proc

    def start(self) -> Daemon:
        """Start a CPU worker and the agent; on any failure stop everything started so far."""
        try:
            self.start_worker()
            self.start_agent()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_worker(self, queue: str, proc: subprocess.Popen | None = None,
                    timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        key = C.ALIVE_KEY.format(queue=queue)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{self.log('worker-CPU.log')}")
            if self.conn.zcount(key, time.time() - C.ALIVE_WINDOW, "+inf"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"no worker on {queue}:\n{self.log('worker-CPU.log')}")

    def wait_online(self, timeout: float = 30.0) -> dict:
        """Wait for the agent's retained status to say online; return it."""
        got = threading.Event()
        doc: dict = {}

        def on_message(client, userdata, msg):
            body = json.loads(msg.payload)
            if body.get("online"):
                doc.update(body)
                got.set()

        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        c.on_message = on_message
        c.connect("127.0.0.1", self.broker.port)
        c.subscribe(C.STATUS_TOPIC.format(node=self.node), qos=1)
        c.loop_start()
        try:
            if not got.wait(timeout):
                raise TimeoutError(f"agent not online:\n{self.log('agent.log')}")
        finally:
            c.disconnect()
            c.loop_stop()
        return doc

    def device(self, device_id: str = "dev-1", **kwargs) -> DeviceClient:
        return DeviceClient("127.0.0.1", self.broker.port, device_id=device_id, **kwargs).connect()

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in [*self.workers, self.agent]:
            if proc is not None and proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.terminate()
        for proc in [*self.workers, self.agent]:
            if proc is not None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.broker.stop()
        self.redis.stop()
