"""The queue's age clock: seconds that only move forward, also across restarts.

``max_age`` must not drop a backlog because the wall clock stepped (NTP fixing
a device without a real-time clock moves it by days at once). Ages are
therefore measured on ``CLOCK_BOOTTIME`` (seconds since boot, suspend
included, never stepped), shifted by an offset kept in the queue database:

- the same boot (the kernel's boot id is unchanged): the same offset, so an
  agent restart changes nothing;
- a new boot: the clock goes on from the last value saved before the reboot,
  so time the device was powered off does not count. (It cannot be measured
  without trusting the wall clock, which is exactly what may be wrong then.)
"""

from __future__ import annotations

import time

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id; "" where the kernel does not say (the clock then goes on as after
    a reboot, which never ages anything too early)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def since_boot() -> float:
    """Seconds since boot, suspend included; never stepped."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class AgeClock:
    """Seconds on the queue's own time line (see the module docstring)."""

    def __init__(self, offset: float, boot: str = "") -> None:
        self.offset = offset
        #: The boot this offset is for.
        self.boot = boot

    @classmethod
    def resume(cls, saved: tuple[str, float, float] | None) -> AgeClock:
        """The clock for this boot, from the saved (boot id, offset, last value)."""
        boot = boot_id()
        if saved is None:
            return cls(0.0, boot)
        saved_boot, offset, last = saved
        if saved_boot and saved_boot == boot:
            return cls(offset, boot)
        return cls(last - since_boot(), boot)

    def now(self) -> float:
        return since_boot() + self.offset
