"""Exponential backoff with jitter, for reconnects and plugin restarts."""

from __future__ import annotations

import random
from typing import Literal

#: How a delay is drawn below its ceiling (the doubling step, at most ``cap``):
#: "equal" between half the ceiling and the ceiling (never below ``floor``);
#: "full" anywhere between 0 and the ceiling, from the first retry on (what
#: spreads a fleet's reconnects best); "none" the ceiling itself, every time.
Jitter = Literal["equal", "full", "none"]


class Backoff:
    """Delays that double from ``floor`` up to ``cap``, drawn at random below that ceiling.

    The jitter spreads a fleet's reconnects after a broker outage so that the
    devices do not all knock at once. ``jitter="full"`` draws each delay
    uniformly between 0 and the ceiling (AWS's "full jitter"), also the first
    one: a thousand devices that lost the broker at the same moment then come
    back spread over the whole first second, not all at once after it.
    ``"none"`` gives the same delays every time (floor, 2 x floor, ...), for
    comparison. ``rng`` may be given for tests.
    """

    def __init__(
        self,
        floor: float,
        cap: float,
        *,
        jitter: Jitter = "equal",
        rng: random.Random | None = None,
    ) -> None:
        self.floor = max(0.01, floor)
        self.cap = max(self.floor, cap)
        self.jitter = jitter
        self.attempts = 0
        self._random = rng or random

    def ceiling(self) -> float:
        """The largest delay the next attempt can draw."""
        return min(self.cap, self.floor * 2 ** min(self.attempts, 32))

    def next(self) -> float:
        """The delay before the next attempt, in seconds."""
        ceiling = self.ceiling()
        self.attempts += 1
        return self._draw(ceiling)

    def longest(self) -> float:
        """A delay near the cap, and the doubling stays there: for a destination that
        said it is busy or over its quota. Between half the cap and the cap (the
        cap itself with ``jitter="none"``): spread, but never short."""
        self.attempts = max(self.attempts, 33)
        if self.jitter == "none":
            return self.cap
        return self._random.uniform(0.5 * self.cap, self.cap)

    def _draw(self, ceiling: float) -> float:
        if self.jitter == "none":
            return ceiling
        if self.jitter == "full":
            return max(0.001, self._random.uniform(0.0, ceiling))
        return max(self.floor, ceiling * self._random.uniform(0.5, 1.0))

    def reset(self) -> None:
        """Start again from the floor (after a success)."""
        self.attempts = 0
