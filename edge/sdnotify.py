"""sd_notify(3) in a few lines: tell systemd we are ready, reloading, stopping or alive.

systemd passes `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace) to a
`Type=notify` service; every message is one datagram of `KEY=value` lines. Outside systemd the
variable is unset and every call is a no-op, so the daemon runs the same in a terminal or a test.
No dependency: the protocol is one `sendto`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("edge.sdnotify")


def notify(*fields: str, env: dict[str, str] | None = None) -> bool:
    """Send `KEY=value` fields to systemd; False when there is no socket (not under systemd)."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not path or not fields:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        # Never fatal: a lost notification costs a start-up timeout, not a crashed service.
        log.warning("sd_notify_failed", socket=path, error=str(exc))
        return False
    return True


def ready(status: str = "") -> bool:
    """READY=1: start-up finished (models compiled / broker connected)."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading(status: str = "reloading") -> bool:
    """RELOADING=1 with MONOTONIC_USEC (systemd >= 253 needs it for Type=notify-reload)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")


def stopping(status: str = "stopping") -> bool:
    """STOPPING=1: a warm shutdown began."""
    return notify("STOPPING=1", f"STATUS={status}")


def status(text: str) -> bool:
    """STATUS=...: the one-line state `systemctl status` shows."""
    return notify(f"STATUS={text}")


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings that keep systemd happy (half of WatchdogSec), or None.

    `$WATCHDOG_PID` names the process the watchdog is meant for; a child that inherited the
    variables must not feed its parent's watchdog.
    """
    source: Mapping[str, str] = env if env is not None else os.environ
    usec, pid = source.get("WATCHDOG_USEC"), source.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


class Watchdog:
    """Sends WATCHDOG=1 every half WatchdogSec while `healthy()` says the process makes progress.

    The pings come from a thread so that a long job (or a long blocking wait for work) does not
    starve them; `healthy` is what keeps the thread honest: when the main loop is stuck, it
    returns False, the pings stop and systemd restarts the service (WatchdogSec later).
    """

    def __init__(self, healthy: Callable[[], bool], interval: float | None = None) -> None:
        self.healthy = healthy
        self.interval = interval if interval is not None else watchdog_interval()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    def start(self) -> Watchdog:
        if self.interval and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                ok = self.healthy()
            except Exception:  # noqa: BLE001 - a failing check counts as unhealthy, logged
                log.exception("watchdog_check_failed")
                ok = False
            if ok:
                notify("WATCHDOG=1")
                self.pings += 1
            else:
                log.error("watchdog_withheld", note="main loop made no progress; systemd will "
                          "restart the service after WatchdogSec")


class Progress:
    """Whether a loop is alive: it beat lately, or the job it is inside is within its time limit.

    A worker's RQ loop beats before every blocking wait for work (at most `dequeue_timeout`
    apart) and after every job. During a job it cannot beat, so a job that is still inside its
    own timeout counts as progress: a 10-minute LCM run under WatchdogSec=120 is healthy. Past
    its timeout RQ's death penalty should have ended it; if it has not (stuck in native code,
    where SIGALRM is never seen) the loop is wedged, the pings stop and systemd restarts us.
    """

    def __init__(self, stall_after: float, grace: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_after, self.grace, self.clock = stall_after, grace, clock
        self.last_beat = clock()
        self._job: tuple[float, float] | None = None  # (started, timeout s)

    def beat(self) -> None:
        self.last_beat = self.clock()

    def begin(self, timeout: float | None) -> None:
        """A job started; `timeout` None or <= 0 means it may run as long as it likes."""
        self._job = (self.clock(), float(timeout) if timeout and timeout > 0 else float("inf"))

    def end(self) -> None:
        self._job = None
        self.beat()

    def healthy(self) -> bool:
        now = self.clock()
        if now - self.last_beat < self.stall_after:
            return True
        job = self._job
        return job is not None and now - job[0] < job[1] + self.grace
