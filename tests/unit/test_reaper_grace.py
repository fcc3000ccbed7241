"""When the reaper may judge a heartbeat's age (`edge.reaper.Grace`), on a fake clock.

Each pass reads Redis' clock and the stamp of the previous pass any reaper made; after an
outage no age is judged for the grace, so workers get time to beat again.
"""

from __future__ import annotations

import pytest

from edge.reaper import STEP_TOLERANCE, Grace

GRACE, MAX_GAP, INTERVAL = 20.0, 7.5, 2.0
T0 = 1_800_000_000.0  # Redis' clock at the first pass


class FakeClock:
    """This host's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def steady_passes(grace: Grace, clock: FakeClock, n: int, now: float) -> float:
    """`n` passes INTERVAL s apart on both clocks; returns Redis' time of the last one."""
    watched = None
    for _ in range(n):
        assert grace.observe(now, watched) is None
        assert not grace.holding()
        watched, now = now, now + INTERVAL
        clock.t += INTERVAL
    return watched


def test_steady_passes_never_hold():
    clock = FakeClock()
    grace = Grace(GRACE, MAX_GAP, clock)
    steady_passes(grace, clock, 50, T0)
    assert not grace.holding()


def test_a_failed_pass_holds_from_the_next_pass_that_reaches_redis_for_the_grace():
    clock = FakeClock()
    grace = Grace(GRACE, MAX_GAP, clock)
    last = steady_passes(grace, clock, 3, T0)
    for _ in range(30):  # a minute of failing passes: nothing is judged meanwhile anyway
        grace.failed()
        clock.t += INTERVAL
    back = last + 60
    assert grace.observe(back, last) is not None
    held_from = clock.t
    watched, now = back, back + INTERVAL
    while clock.t + INTERVAL < held_from + GRACE:  # steady passes meanwhile do not extend it
        clock.t += INTERVAL
        assert grace.observe(now, watched) is None
        assert grace.holding()  # the grace counts from Redis' return, not from the failure
        watched, now = now, now + INTERVAL
    clock.t = held_from + GRACE
    assert not grace.holding()


def test_a_gap_since_any_reapers_last_pass_holds():
    """Redis came back from an outage (its data on disk) and this agent is new, or every
    agent was stopped: the last stamp is a minute old in Redis' own clock."""
    clock = FakeClock()
    grace = Grace(GRACE, MAX_GAP, clock)
    assert grace.observe(T0 + 60, T0) is not None
    assert grace.holding()
    clock.t += GRACE
    assert not grace.holding()


def test_a_first_pass_on_a_redis_no_reaper_watched_does_not_hold():
    grace = Grace(GRACE, MAX_GAP, FakeClock())
    assert grace.observe(T0, None) is None
    assert not grace.holding()


@pytest.mark.parametrize("step", [-3600.0, -2 * STEP_TOLERANCE, 2 * STEP_TOLERANCE, 3600.0],
                         ids=["back-1h", "back-small", "ahead-small", "ahead-1h"])
def test_redis_clock_stepping_unlike_ours_holds(step):
    clock = FakeClock()
    grace = Grace(GRACE, MAX_GAP, clock)
    last = steady_passes(grace, clock, 3, T0)
    # the next pass, INTERVAL s later on this host, finds Redis' clock stepped
    assert grace.observe(last + INTERVAL + step, last) is not None
    assert grace.holding()
    clock.t += GRACE
    assert not grace.holding()


def test_drift_within_the_tolerance_is_no_step():
    clock = FakeClock()
    grace = Grace(GRACE, MAX_GAP, clock)
    last = steady_passes(grace, clock, 3, T0)
    clock.t += INTERVAL
    assert grace.observe(last + INTERVAL + STEP_TOLERANCE / 2, last) is None
    assert not grace.holding()
