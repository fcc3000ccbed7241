"""sd_notify over a real datagram socket, the watchdog's pacing and its health rule."""

from __future__ import annotations

import os
import socket
import time

import pytest

from edge import sdnotify


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_ready_sends_one_datagram_with_status(notify_socket):
    assert sdnotify.ready("serving tokenize")
    assert notify_socket.recv(4096).decode() == "READY=1\nSTATUS=serving tokenize"


def test_reloading_carries_monotonic_usec(notify_socket):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    fields = dict(line.split("=", 1) for line in notify_socket.recv(4096).decode().split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= before + 10_000_000


def test_abstract_namespace_socket(monkeypatch):
    name = f"edge-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert sdnotify.stopping()
        assert sock.recv(4096).startswith(b"STOPPING=1")
    finally:
        sock.close()


def test_without_systemd_every_call_is_a_quiet_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert sdnotify.status("x") is False  # logged, never raised


def test_watchdog_interval_is_half_of_watchdog_sec_and_only_for_our_pid():
    env = {"WATCHDOG_USEC": "120000000"}
    assert sdnotify.watchdog_interval(env) == 60.0
    assert sdnotify.watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 60.0
    assert sdnotify.watchdog_interval({**env, "WATCHDOG_PID": "1"}) is None  # our parent's
    assert sdnotify.watchdog_interval({}) is None


def test_watchdog_pings_while_healthy_and_withholds_when_not(notify_socket):
    healthy = [True]
    dog = sdnotify.Watchdog(lambda: healthy[0], interval=0.05).start()
    try:
        assert notify_socket.recv(64) == b"WATCHDOG=1"
        healthy[0] = False
        time.sleep(0.2)
        notify_socket.settimeout(0.01)
        while True:  # drain what was sent before the switch
            try:
                notify_socket.recv(64)
            except (socket.timeout, BlockingIOError):
                break
        notify_socket.settimeout(0.3)
        with pytest.raises(socket.timeout):
            notify_socket.recv(64)
    finally:
        dog.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_long_job_within_its_timeout_is_healthy_a_wedged_one_is_not():
    clock = FakeClock()
    p = sdnotify.Progress(stall_after=120, grace=30, clock=clock)
    p.begin(timeout=600)  # a 10-minute LCM job, WatchdogSec far shorter
    clock.now += 500
    assert p.healthy()
    clock.now += 129  # 629 s: past its timeout + grace, RQ's death penalty never landed
    assert p.healthy() is True  # still < 600 + 30
    clock.now += 2
    assert p.healthy() is False
    p.end()
    assert p.healthy()


def test_an_idle_loop_must_keep_beating():
    clock = FakeClock()
    p = sdnotify.Progress(stall_after=120, clock=clock)
    clock.now += 119
    assert p.healthy()
    p.beat()
    clock.now += 121
    assert not p.healthy()
