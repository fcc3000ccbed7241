"""What the fault tests share: counting answers per id, waiting on RQ state, a TCP proxy."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from edge.client import DeviceClient
from edge.jobs import job_key
from edge.localdaemon import Daemon

TASK_CODES = {"ok", "bad_request", "unsupported_media", "payload_too_large", "unknown_task",
              "busy", "timeout", "model_unavailable", "internal"}


def outcome(body) -> str:
    return "ok" if body.get("status") == "ok" else body["error"]["code"]


def collect(dev: DeviceClient, ids, timeout: float = 60.0, settle: float = 1.5
            ) -> dict[str, list[str]]:
    """Every answer (outcome codes) each id got: waits for one per id, then `settle` s more
    for duplicates. Progress notes are not answers."""
    got: dict[str, list[str]] = {rid: [] for rid in ids}
    deadline = time.monotonic() + timeout

    def drain(rid: str) -> None:
        box = dev._box(rid)
        while True:
            try:
                kind, msg, _ = box.get_nowait()
            except queue.Empty:
                return
            if kind != "progress":
                got[rid].append(outcome(json.loads(msg.payload)))

    while time.monotonic() < deadline:
        for rid in ids:
            drain(rid)
        if all(got.values()):
            break
        time.sleep(0.05)
    time.sleep(settle)
    for rid in ids:
        drain(rid)
    return got


def assert_promise(got: dict[str, list[str]], *, allowed=TASK_CODES, once: bool = True) -> None:
    """Every id answered; with `once`, exactly once; every answer one the design allows;
    all answers to one id agree."""
    missing = [rid for rid, codes in got.items() if not codes]
    assert not missing, f"no answer to {len(missing)} ids, e.g. {missing[:5]}"
    for rid, codes in got.items():
        assert set(codes) <= set(allowed), (rid, codes)
        assert len(set(codes)) == 1, f"{rid} got different answers {codes}"
        if once:
            assert len(codes) == 1, f"{rid} answered {len(codes)} times"


def runs(daemon: Daemon) -> Counter:
    """How many times each request id was run by any worker (from the workers' JSON logs)."""
    count: Counter = Counter()
    for path in Path(daemon.workdir).glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"job_done"' in line or '"job_error"' in line:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                count[doc.get("job_id")] += 1
    return count


def assert_ran_at_most_once(daemon: Daemon, ids) -> None:
    counts = runs(daemon)
    twice = {rid: counts[rid] for rid in ids if counts[rid] > 1}
    assert not twice, f"run more than once: {twice}"


def rq_key(device_id: str, rid: str) -> str:
    return f"rq:job:{job_key(device_id, rid)}"


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_status(daemon: Daemon, device_id: str, rid: str, status: str,
                timeout: float = 30.0) -> None:
    key = rq_key(device_id, rid)
    wait_for(lambda: (daemon.conn.hget(key, "status") or b"").decode() == status, timeout,
             f"{rid} {status}")


class TcpProxy:
    """A local TCP forwarder that a test can cut (drop every connection, refuse new ones)
    or pause (hold bytes: a partition where packets vanish but sockets stay up)."""

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port, self.delay = target_port, delay
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()  # both directions
        self.flowing.set()
        self.upstream_flowing = threading.Event()  # client -> target only
        self.upstream_flowing.set()
        self.accepting = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                if up:
                    self.upstream_flowing.wait()
                if not self.accepting:
                    break  # cut while we held these bytes: they are lost
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        """Drop every connection (and the bytes held) and refuse new ones until `heal()`."""
        self.accepting = False
        self.flowing.set()
        self.upstream_flowing.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def hold_upstream(self) -> None:
        """Let bytes reach the client but hold everything it sends (acks, publishes)."""
        self.upstream_flowing.clear()

    def heal(self) -> None:
        self.accepting = True
        self.flowing.set()
        self.upstream_flowing.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()
