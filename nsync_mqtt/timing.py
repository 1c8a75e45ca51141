"""Timing constants, in one place, with units in their names.

Relations that must hold (checked by ``Timing.validate``):
- heartbeat_interval_s is well below election_timeout_min_s (a quarter by default, at most a
  third), so a few lost heartbeats never start an election. Each heartbeat wakes every
  follower; how fast a dead master is noticed is set by the election timeout, not by this;
- election_timeout_min_s < election_timeout_max_s (the random spread avoids split votes);
- ack_timeout_s is below the client's default timeout (3 s), so the client hears the failure
  rather than its own timeout;
- lead_min_s <= lead_max_s: the master schedules starts at least lead_min_s ahead, more when the
  observed round trips are slow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from nsync_mqtt.errors import ConfigError


@dataclass(frozen=True)
class Timing:
    heartbeat_interval_s: float = 0.1
    election_timeout_min_s: float = 0.4
    election_timeout_max_s: float = 0.8
    ping_interval_s: float = 0.1
    calibration_pings: int = 8
    ack_timeout_s: float = 2.0
    lead_min_s: float = 0.08
    lead_max_s: float = 1.0
    lead_rtt_factor: float = 4.0
    upload_idle_timeout_s: float = 5.0

    def validate(self) -> Timing:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{f.name}: must be a positive number, got {v!r}")
        if self.heartbeat_interval_s * 3 > self.election_timeout_min_s:
            raise ConfigError(
                "heartbeat_interval_s: must be at most a third of election_timeout_min_s"
            )
        if self.election_timeout_min_s >= self.election_timeout_max_s:
            raise ConfigError("election_timeout_min_s: must be below election_timeout_max_s")
        if self.lead_min_s > self.lead_max_s:
            raise ConfigError("lead_min_s: must not exceed lead_max_s")
        return self
