"""The agent's intake (edge/agent.py `Intake`): job messages from paho's thread to the thread
that stores them in batches, bounded by count and bytes (back-pressure to the broker)."""

from __future__ import annotations

import threading
import time

from edge.agent import Intake
from edge.mqtt import Incoming
from edge.protocol import Properties


def _msg(n: int, size: int = 10) -> Incoming:
    return Incoming(f"edge/jobs/tokenize/d{n}", b"x" * size, Properties(), n, 1)


def test_intake_takes_in_order_and_in_batches():
    intake, stop = Intake(max_messages=10, max_bytes=1000), threading.Event()
    for n in range(7):
        assert intake.put(_msg(n), stop)
    assert [m.mid for m in intake.take(5, timeout=0)] == [0, 1, 2, 3, 4]
    assert [m.mid for m in intake.take(5, timeout=0)] == [5, 6]
    assert intake.take(5, timeout=0.01) == []


def test_intake_bounds_messages_and_bytes_and_lets_a_lone_big_message_in():
    stop = threading.Event()
    by_count = Intake(max_messages=2, max_bytes=1000)
    assert by_count.put(_msg(0), stop) and by_count.put(_msg(1), stop)
    stop.set()
    assert not by_count.put(_msg(2), stop)  # full: waits, and gives up at stop
    stop.clear()
    by_bytes = Intake(max_messages=100, max_bytes=100)
    assert by_bytes.put(_msg(0, size=5000), stop)  # alone: always let in
    blocked = threading.Thread(target=by_bytes.put, args=(_msg(1, size=60), stop))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()  # waits for room (back-pressure on paho's thread)
    assert [m.mid for m in by_bytes.take(1, timeout=0)] == [0]
    blocked.join(5)
    assert not blocked.is_alive()
    assert [m.mid for m in by_bytes.take(5, timeout=0)] == [1]
