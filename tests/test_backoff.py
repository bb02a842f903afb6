"""Backoff: full jitter from the first retry, none for comparison, and "busy" waits."""

from __future__ import annotations

import random
import statistics

from edge_agent.backoff import Backoff
from edge_agent.errors import SinkUnavailable
from edge_agent.forwarder import _retry_delay


def draws(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next() for _ in range(count)]


def test_full_jitter_spreads_the_first_retry_over_zero_to_the_floor():
    rng = random.Random(7)
    firsts = []
    for _ in range(2000):
        backoff = Backoff(1.0, 60.0, jitter="full", rng=rng)
        firsts.append(backoff.next())
    assert all(0 < d <= 1.0 for d in firsts)
    # Uniform on [0, 1]: a tenth in each tenth, the mean one half.
    tenths = [sum(int(d * 10) == k for d in firsts) for k in range(10)]
    assert min(tenths) > 120 and max(tenths) < 280, tenths
    assert abs(statistics.mean(firsts) - 0.5) < 0.05


def test_full_jitter_ceiling_doubles_up_to_the_cap():
    backoff = Backoff(1.0, 8.0, jitter="full", rng=random.Random(1))
    ceilings = []
    for _ in range(6):
        ceilings.append(backoff.ceiling())
        assert 0 < backoff.next() <= ceilings[-1]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.ceiling() == 1.0


def test_no_jitter_is_the_same_on_every_device():
    fleet = [draws(Backoff(0.5, 4.0, jitter="none"), 6) for _ in range(3)]
    assert fleet[0] == fleet[1] == fleet[2] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_equal_jitter_stays_between_half_the_ceiling_and_the_ceiling():
    backoff = Backoff(1.0, 60.0, rng=random.Random(3))
    for ceiling in (1.0, 2.0, 4.0, 8.0):
        delay = backoff.next()
        assert max(1.0, ceiling / 2) <= delay <= ceiling


def test_a_busy_destination_gets_a_wait_near_the_cap():
    rng = random.Random(11)
    backoff = Backoff(1.0, 60.0, jitter="full", rng=rng)
    busy = SinkUnavailable("the broker refused the connection: Server busy", busy=True)
    waits = [_retry_delay(backoff, busy) for _ in range(200)]
    assert all(30.0 <= w <= 60.0 for w in waits)
    assert max(waits) - min(waits) > 20  # still spread across a fleet
    assert Backoff(1.0, 60.0, jitter="none").longest() == 60.0
    # After a busy answer the doubling stays at the cap until a success resets it.
    assert backoff.ceiling() == 60.0
    assert 0 < _retry_delay(backoff, SinkUnavailable("refused")) <= 60.0
    backoff.reset()
    assert _retry_delay(backoff, SinkUnavailable("refused")) <= 1.0
