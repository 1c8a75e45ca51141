"""Limits against a hostile (or broken) client on a shared broker, pure: take ``now`` and inputs.

- :data:`PAYLOAD_LIMITS`: the largest payload a node reads on each kind of topic it
  subscribes to. A bigger one is dropped before it is parsed and counted as rejected.
- :class:`RateLimiter`: a token bucket per client (its ``reply_to``): a burst, then a sustained
  rate. The keys are remote ids, so the map is bounded: past ``max_keys`` the buckets that are
  full again (as good as new) are forgotten first, then the least recently used. A client can
  name itself anew for every command; one more bucket, shared by all clients, caps them all
  together.

The defaults are generous: a client that waits for each reply (the CLI, Home Assistant, the
benchmarks, one command after another at 1-3 ms each) is never limited; a client that floods
commands without waiting is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB

# The largest payload read on each kind of topic (bytes). The internal messages are small except
# ``sync`` (the whole player state: up to MAX_PLAYLIST_LEN song hashes and their manifests) and
# ``sync_req`` (every song a node holds); a chunk frame is a chunk (MAX_CHUNK_SIZE at most) and
# its JSON header; a node state lists the songs a node holds.
PAYLOAD_LIMITS: dict[str, int] = {
    "internal": 4 * MIB,
    "chunk": 8 * MIB + 64 * KIB,
    "command": 64 * KIB,
    "node_state": 2 * MIB,
    "ha_status": 64,
}

COMMAND_BURST = 1000  # commands a client may send at once ...
COMMAND_RATE = 500.0  # ... and per second after that
MAX_CLIENTS_TRACKED = 1024  # buckets kept (one per reply_to seen lately)
ALL_COMMAND_BURST = 2000  # commands all clients together may send at once ...
ALL_COMMAND_RATE = 1000.0  # ... and per second after that

CLIENT = "client"  # RateLimiter.check: this client is over its rate
ALL = "all"  # ... all clients together are over theirs


def oversize(kind: str, size: int, limits: dict[str, int] | None = None) -> bool:
    """Is a payload of ``size`` bytes on a topic of ``kind`` over its limit? (An unknown kind
    has no limit here: its handler checks what it reads.)"""
    limit = (PAYLOAD_LIMITS if limits is None else limits).get(kind)
    return limit is not None and size > limit


@dataclass
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` was last brought up to date

    def level(self, now: float, burst: float, rate: float) -> float:
        """The tokens at ``now``: refilled at ``rate`` since ``at``, up to ``burst``."""
        return min(burst, self.tokens + max(0.0, now - self.at) * rate)

    def refill(self, now: float, burst: float, rate: float) -> None:
        self.tokens, self.at = self.level(now, burst, rate), max(self.at, now)


class RateLimiter:
    """Token buckets keyed by client: ``allow(now, key)`` takes one token from ``key``'s bucket
    (``burst`` tokens when new, refilled at ``rate`` per second up to ``burst``) and says whether
    there was one. Holds at most ``max_keys`` buckets. All keys also draw on one shared bucket
    of ``total_burst`` tokens refilled at ``total_rate``; a command refused by one bucket takes
    no token from the other."""

    def __init__(
        self,
        burst: float = COMMAND_BURST,
        rate: float = COMMAND_RATE,
        max_keys: int = MAX_CLIENTS_TRACKED,
        total_burst: float = ALL_COMMAND_BURST,
        total_rate: float = ALL_COMMAND_RATE,
    ) -> None:
        for b, r in ((burst, rate), (total_burst, total_rate)):
            if not (b >= 1 and r > 0 and math.isfinite(b) and math.isfinite(r)):
                raise ValueError(f"rate limiter: burst >= 1 and rate > 0, got {b}, {r}")
        if max_keys < 1:
            raise ValueError(f"rate limiter: max_keys must be positive, got {max_keys}")
        self.burst = float(burst)
        self.rate = float(rate)
        self.total_burst = float(total_burst)
        self.total_rate = float(total_rate)
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}  # insertion order = least recently used first
        self._total = _Bucket(self.total_burst, -math.inf)
        self.refused = 0

    def check(self, now: float, key: str) -> str | None:
        """Take a token for ``key``: None if there was one, else which limit refused it
        (``CLIENT`` or ``ALL``)."""
        b = self._buckets.pop(key, None)
        if b is None:
            self._make_room(now)
            b = _Bucket(self.burst, now)
        else:
            b.refill(now, self.burst, self.rate)
        self._buckets[key] = b  # the most recently used now
        t = self._total
        t.refill(now, self.total_burst, self.total_rate)
        refused = CLIENT if b.tokens < 1.0 else ALL if t.tokens < 1.0 else None
        if refused is None:
            b.tokens -= 1.0
            t.tokens -= 1.0
        else:
            self.refused += 1
        return refused

    def allow(self, now: float, key: str) -> bool:
        return self.check(now, key) is None

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_keys:
            return
        full = [
            k for k, b in self._buckets.items() if b.level(now, self.burst, self.rate) >= self.burst
        ]
        for k in full:
            del self._buckets[k]  # full again: a new bucket would be the same
        while len(self._buckets) >= self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)
