"""Exponential backoff with jitter, for reconnects and plugin restarts."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``floor`` up to ``cap``, each cut by up to half at random.

    The jitter spreads a fleet's reconnects after a broker outage so that the
    devices do not all knock at once.
    """

    def __init__(self, floor: float, cap: float) -> None:
        self.floor = max(0.01, floor)
        self.cap = max(self.floor, cap)
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt, in seconds."""
        ceiling = min(self.cap, self.floor * 2 ** min(self.attempts, 32))
        self.attempts += 1
        return max(self.floor, ceiling * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        """Start again from the floor (after a success)."""
        self.attempts = 0
