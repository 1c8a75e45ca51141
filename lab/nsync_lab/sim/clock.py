"""A node's clock on simulated time: ``local = offset + true × (1 + ppm·1e-6)``.

It has the shape of ``nsync_mqtt.clock.Clock`` (``now`` / ``to_host`` / ``from_host``) where
"host" means the world's true simulated time, so node code that schedules on its own clock and
converts to host time for sinks runs unchanged. Unlike the real clock it can be stepped (the
local reading jumps, as when NTP steps a clock) and have its drift changed mid-run; a drift
change keeps the current local reading continuous.

``to_true`` / ``to_host`` convert with the current offset and drift: a time converted before a
step or drift change is not re-mapped afterwards (the same is true of a real clock).
"""

from __future__ import annotations

from .world import World


class SimClock:
    __slots__ = ("_scale", "drift_ppm", "offset_s", "world")

    def __init__(self, world: World, offset_s: float = 0.0, drift_ppm: float = 0.0) -> None:
        self.world = world
        self.offset_s = float(offset_s)
        self.drift_ppm = float(drift_ppm)
        self._scale = 1.0 + self.drift_ppm * 1e-6

    def now(self) -> float:
        """This node's local reading now."""
        return self.offset_s + self.world.now * self._scale

    def from_true(self, true_t: float) -> float:
        """Local reading at true simulated time ``true_t``."""
        return self.offset_s + true_t * self._scale

    def to_true(self, local_t: float) -> float:
        """True simulated time at which the local clock reads ``local_t``."""
        return (local_t - self.offset_s) / self._scale

    # nsync_mqtt.clock.Clock compatibility ("host" = true simulated time)
    def from_host(self, host_t: float) -> float:
        return self.from_true(host_t)

    def to_host(self, t: float) -> float:
        return self.to_true(t)

    def step(self, delta_s: float) -> None:
        """The local clock jumps by ``delta_s`` (either sign) at the current true time."""
        self.offset_s += delta_s

    def set_drift(self, drift_ppm: float) -> None:
        """Change the rate from now on; the current local reading does not jump."""
        local = self.now()
        self.drift_ppm = float(drift_ppm)
        self._scale = 1.0 + self.drift_ppm * 1e-6
        self.offset_s = local - self.world.now * self._scale
