"""Private Redis and Mosquitto processes on free local ports (for `make demo` and the tests).

They run from Debian's binaries (`redis-server`, `mosquitto`), keep their files in a folder of
their own, and can be stopped, killed and restarted on the same port to play faults.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{name} did not listen on {port} within {timeout} s")


_running: set[LocalService] = set()


def stop_all() -> int:
    """Stop every server this process started and has not stopped (a safety net for tests)."""
    left = list(_running)
    for service in left:
        service.stop()
    return len(left)


class LocalService:
    """A child server process bound to one port for its whole life (restarts keep the port)."""

    binary = ""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if shutil.which(self.binary) is None and not Path(self.binary).exists():
            raise RuntimeError(f"{self.binary} is not installed (make setup installs it)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> Self:
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _running.add(self)
        _wait_port(self.port, timeout, self.proc, self.binary)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (Redis saves its AOF, Mosquitto its persistence)."""
        _running.discard(self)
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash."""
        _running.discard(self)
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(LocalService):
    """redis-server with an append-only file fsynced on every write."""

    binary = "redis-server"

    def __init__(self, workdir: Path, port: int | None = None, appendfsync: str = "always") -> None:
        super().__init__(workdir, port)
        self.appendfsync = appendfsync

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "", "--appendonly", "yes",
                "--appendfsync", self.appendfsync, "--maxmemory-policy", "noeviction",
                "--daemonize", "no", "--logfile", ""]


class MosquittoServer(LocalService):
    """mosquitto with persistence (so sessions and queued QoS 1 messages survive a restart)."""

    binary = "/usr/sbin/mosquitto"

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        super().__init__(workdir, port)
        self.extra_conf = extra_conf

    def command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"user {getpass.getuser()}\n"  # as root it would switch to `mosquitto`
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"  # else Nagle + delayed ACK add ~40 ms to every answer
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\n" + self.extra_conf)
        return [self.binary, "-c", str(conf)]
