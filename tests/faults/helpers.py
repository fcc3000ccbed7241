"""What the fault tests share: counting answers per id, waiting on RQ state, a TCP proxy."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from edge.jobs import job_key
from edge.reaper import REAP_AFTER, REAP_INTERVAL
from edgectl.client import DeviceClient
from edgectl.localdaemon import Daemon

# How long to keep listening for a second answer after the first: the reaper answers a job
# REAP_AFTER s after its worker's last beat, on a pass every REAP_INTERVAL s; the margin is the
# relay's way to the device on 2 loaded cores. A shorter watch would miss the reaper's duplicate.
DUPLICATE_WATCH = REAP_AFTER + REAP_INTERVAL + 3.0

TASK_CODES = {"ok", "bad_request", "unsupported_media", "payload_too_large", "unknown_task",
              "busy", "timeout", "model_unavailable", "internal"}


def outcome(body) -> str:
    return "ok" if body.get("status") == "ok" else body["error"]["code"]


def _drain(dev: DeviceClient, rid: str, into: list[str]) -> None:
    into.extend(outcome(body) for body in dev.answers_so_far(rid))


def collect(dev: DeviceClient, ids, timeout: float = 60.0, settle: float = DUPLICATE_WATCH
            ) -> dict[str, list[str]]:
    """Every answer (outcome codes) each id got: waits for one per id, then `settle` s more
    for duplicates (pass `settle=0` and call `watch_duplicates` later to share one watch
    between several collections). Progress notes are not answers."""
    got: dict[str, list[str]] = {rid: [] for rid in ids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rid in ids:
            _drain(dev, rid, got[rid])
        if all(got.values()):
            break
        time.sleep(0.05)
    watch_duplicates(dev, got, since=time.monotonic(), watch=settle)
    return got


def watch_duplicates(dev: DeviceClient, got: dict[str, list[str]], since: float,
                     watch: float = DUPLICATE_WATCH) -> None:
    """Keep listening until `watch` s after `since` (a `time.monotonic()` taken when the
    answers in `got` had come) and add every later answer to `got`."""
    time.sleep(max(0.0, since + watch - time.monotonic()))
    for rid, codes in got.items():
        _drain(dev, rid, codes)


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


def worker_events(daemon: Daemon, event: str) -> list[dict]:
    """Every `event` line the workers have logged so far (their logs are JSON lines)."""
    found = []
    for path in Path(daemon.workdir).glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == event:
                found.append(doc)
    return found


def runs(daemon: Daemon) -> Counter:
    """How many times any worker began to run each request id: the workers' `job_started`
    lines, written before the job runs, so a run that crashed, hung or timed out counts."""
    return Counter(doc.get("job_id") for doc in worker_events(daemon, "job_started"))


def rq_key(device_id: str, rid: str, task: str = "tokenize") -> str:
    return f"rq:job:{job_key(device_id, task, rid)}"


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
