"""Clocks.

A node's clock reads ``host_monotonic * (1 + ppm * 1e-6) + offset`` seconds. On a real Pi both
offset and ppm are zero; ``--clock-offset`` and ``--clock-drift-ppm`` let one machine behave like
several machines with unsynchronised clocks. All scheduling inside a node is done on its own clock;
only the sinks convert to host time (``to_host``), because audio hardware (and the virtual DAC)
is paced by the host.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this node's clock."""
        ...

    def to_host(self, t: float) -> float:
        """Host monotonic seconds at which this clock reads ``t``."""
        ...

    def from_host(self, host_t: float) -> float:
        """This clock's reading at host monotonic seconds ``host_t``."""
        ...


class SimClock:
    """``host_monotonic × (1 + ppm·1e-6) + offset``; HostClock is the zero case."""

    def __init__(self, offset_s: float = 0.0, drift_ppm: float = 0.0) -> None:
        self.offset_s = float(offset_s)
        self.drift_ppm = float(drift_ppm)
        self._scale = 1.0 + self.drift_ppm * 1e-6

    def now(self) -> float:
        return time.monotonic() * self._scale + self.offset_s

    def from_host(self, host_t: float) -> float:
        return host_t * self._scale + self.offset_s

    def to_host(self, t: float) -> float:
        return (t - self.offset_s) / self._scale


def HostClock() -> SimClock:
    return SimClock(0.0, 0.0)


class FakeClock:
    """A clock tests advance by hand; host time and node time are the same."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t

    def to_host(self, t: float) -> float:
        return t

    def from_host(self, host_t: float) -> float:
        return host_t
