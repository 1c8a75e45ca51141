"""Clock-offset and rate estimation from ping timestamps (pure: no clock reads).

Every ``ping_interval_s`` a node pings the master: the node stamps ``t1`` (node clock) when it
sends, the master stamps ``t2`` on receipt and ``t3`` when it replies (master clock), the node
stamps ``t4`` on receipt. As in NTP,

    offset = ((t2 - t1) + (t3 - t4)) / 2      (master clock - node clock)
    rtt    = (t4 - t1) - (t3 - t2)

and the sample belongs to the node time ``(t1 + t4) / 2``. A single sample is wrong by half the
difference of its two one-way delays, so its error is bounded by ``(rtt - rtt_min) / 2`` plus the
(unknown, usually tiny) asymmetry of the fastest path. NSync estimates

    offset(t) = a + b * (t - t_ref)

with two time scales:

* **Offset** ``a``: from the lower envelopes of the two one-way delays across the last
  ``window`` samples. Each sample splits into what the request took and what the reply took,
  each plus or minus the offset: ``t2 - t1 = a + up`` and ``t4 - t3 = down - a``. Delays only
  ever add to a path's fastest time, so the smallest ``t2 - t1`` and the smallest ``t4 - t3``
  over the window (each moved to ``t_ref`` along the rate ``b``) carry the two fastest one-way
  trips, and ``a`` is half their difference: exact when the two directions' fastest trips are
  equally fast, whatever the jitter above them and however asymmetric it is. Taking each
  direction's minimum on its own beats keeping the fastest *round trip*: with 0-20 ms of jitter
  each way the fastest of 64 round trips is still ~3 ms, and its halves can differ by half of
  that, while each direction's fastest of 64 is within ~0.3 ms of the floor (offset error p99
  0.6 ms against 2.6 ms for weighting round trips, and 0.06 against 0.17 ms with 0-2 ms).
* **Rate** ``b``: the master's drift relative to the node (crystals differ by up to ~100 ppm,
  which is 0.1 ms per second). It changes only with temperature, so it is measured over a much
  longer span than the offset: every ``window // 4`` samples the envelope offset of that block,
  at its middle, is kept as an anchor, and ``b`` is the Theil-Sen slope (median of pairwise
  slopes, robust to a block spoilt by a burst of load) over the last ``MAX_ANCHORS`` anchors.
  Until the anchors span more time than the window, ``b`` is the weighted least-squares slope of
  the window (weights favour the fastest round trips), and until the window spans
  ``MIN_FIT_SPAN_S`` it is zero (drift over a couple of seconds is below 0.2 ms).

Without the rate term the estimate lags a drifting clock by half the window's span (1.5 ms for
50 ppm over 60 s); with the slope measured only over the window, extrapolating to "now" is what
dominates the error, which the long anchor baseline removes.

* **Long lines** under jitter. The fastest trip of 64 pings is still far from the floor when
  each hop adds 0-20 ms (two hops each way: the fastest of 64 is ~3.5 ms above it), so the
  window alone leaves the offset 1-4 ms off. Each block also keeps its fastest trip each way,
  for the last ``LONG_BLOCKS`` blocks (16 samples a block: about four minutes at 10 pings a
  second). Over those points each direction gets the line below all of them that hugs them
  best (the edge of their lower convex hull above the points' mean time, the linear program of
  Moon, Skelly and Towsley for one-way delays); half the difference of the two lines is the
  offset, and half the difference of their slopes the rate. With 0-20 ms per hop this takes the
  offset error p99 from ~3 ms to ~1 ms (a model of those delays, 10 pings a second). A clock
  whose rate changes (an NTP slew) bends those points, so the long lines are used only while
  they agree with the window's estimate within ``LONG_AGREE`` times the blocks' own scatter
  (from one block to the next); when they do not, every block but the newest few is
  forgotten and the window's estimate is used until the lines have ``MIN_LONG_BLOCKS``
  blocks again.

Times are taken relative to ``t_ref`` (the newest sample) before any product, since clock values
can be ~1e6 s. A master change or a stepped clock shows up as samples far from ``offset_at``;
the caller decides and calls ``reset``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

RTT_FLOOR_S = 0.0002
"""Error floor of the best sample (timestamp jitter, path asymmetry) in the weights."""
RTT_CUTOFF_S = 0.002
"""Samples slower than ``rtt_min + max(RTT_CUTOFF_S, rtt_min)`` carry no weight at all."""
MIN_FIT_SPAN_S = 2.0
"""The window must span this much node time before a slope is fitted from it."""
MAX_ANCHORS = 32
"""Block centroids kept for the rate (32 blocks of 16 pings at 0.1 s: about 50 s)."""
LONG_BLOCKS = 150
"""Blocks whose fastest trips the long lines are fitted over (150 of 16 pings: 4 minutes)."""
MIN_LONG_BLOCKS = 8
"""Blocks the long lines need before they are used."""
KEEP_BLOCKS = 4
"""Blocks kept when the long lines disagree with the window (a rate change)."""
LONG_AGREE = 3.0
"""The long lines stand while the window's estimate is within this many times the median
change of a block's estimate from one block to the next (plus ``LONG_FLOOR_S``)."""
LONG_FLOOR_S = 50e-6


@dataclass(frozen=True)
class Sample:
    """One accepted ping: node-clock midpoint, offset (master - node) and round trip, seconds."""

    t_local: float
    offset: float
    rtt: float

    @property
    def up(self) -> float:
        """``t2 - t1``: the request's trip plus the offset."""
        return self.offset + self.rtt / 2

    @property
    def down(self) -> float:
        """``t4 - t3``: the reply's trip minus the offset."""
        return self.rtt / 2 - self.offset


def _weights(samples: Sequence[Sample], rtt_min: float) -> list[float]:
    cutoff = rtt_min + max(RTT_CUTOFF_S, rtt_min)
    return [0.0 if s.rtt > cutoff else 1.0 / (s.rtt - rtt_min + RTT_FLOOR_S) ** 2 for s in samples]


def _centroid(
    samples: Sequence[Sample], weights: Sequence[float], t_ref: float
) -> tuple[float, float]:
    """Weighted mean of (t_local - t_ref, offset)."""
    total = math.fsum(weights)
    t = math.fsum(w * (s.t_local - t_ref) for s, w in zip(samples, weights, strict=True)) / total
    o = math.fsum(w * s.offset for s, w in zip(samples, weights, strict=True)) / total
    return t, o


def _envelope_offset(samples: Iterable[Sample], rate: float, t_ref: float) -> float:
    """The offset at ``t_ref`` from the fastest trip each way (moved there along ``rate``)."""
    up = down = math.inf
    for x in samples:
        shift = rate * (x.t_local - t_ref)
        up = min(up, x.up - shift)
        down = min(down, x.down + shift)
    return (up - down) / 2


def _lower_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(y0, slope)`` of the line ``y0 + slope * t`` below every ``(t, y)`` (sorted by t) that
    minimises their summed height above it: the lower convex hull's edge over the mean t."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    if len(hull) == 1:
        return hull[0][1], 0.0
    t_mean = math.fsum(t for t, _ in points) / len(points)
    i = 1
    while i < len(hull) - 1 and hull[i][0] < t_mean:
        i += 1
    (x1, y1), (x2, y2) = hull[i - 1], hull[i]
    slope = (y2 - y1) / (x2 - x1)
    return y1 - slope * x1, slope


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 1], of a non-empty sorted sequence."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


MAX_RATE = 1e-3  # 1000 ppm: ten times the worst crystal; an estimate beyond it is clamped


class ClockEstimator:
    """Estimates ``master_clock - node_clock`` as a line in node time; see the module docstring."""

    def __init__(
        self, window: int = 64, calibration_samples: int = 8, max_rtt_s: float = 0.5
    ) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be positive, got {calibration_samples}")
        if not max_rtt_s > 0:
            raise ValueError(f"max_rtt_s must be positive, got {max_rtt_s}")
        self.window = window
        self.calibration_samples = calibration_samples
        self.max_rtt_s = max_rtt_s
        self._block = max(2, window // 4)
        self.reset()

    def reset(self) -> None:
        """Forget everything (the master changed, or a clock was stepped)."""
        self._samples: deque[Sample] = deque(maxlen=self.window)
        self._anchors: deque[tuple[float, float]] = deque(maxlen=MAX_ANCHORS)
        self._since_anchor = 0
        self._accepted = 0
        self._anchor_rate: float | None = None
        self._t_ref = 0.0
        self._a = 0.0
        self._b = 0.0
        self._last_t1 = -math.inf
        # per block, its fastest trip each way: (t, t2 - t1) and (t, t4 - t3), node time
        self._blocks: deque[tuple[float, float, float, float]] = deque(maxlen=LONG_BLOCKS)
        self._long: tuple[float, float, float] | None = None  # (t0, offset at t0, rate)
        self.long_resets = 0

    def add(self, t1: float, t2: float, t3: float, t4: float) -> Sample | None:
        """Take one ping's four timestamps; returns the sample, or None if it was rejected."""
        if not all(math.isfinite(t) for t in (t1, t2, t3, t4)):
            return None
        if t4 < t1 or t3 < t2:
            return None
        if t1 <= self._last_t1:
            return None  # a duplicate (a QoS 1 redelivery) or an answer to an older ping
        self._last_t1 = t1
        rtt = (t4 - t1) - (t3 - t2)
        if rtt < 0 or rtt > self.max_rtt_s:
            return None
        sample = Sample(t_local=t1 + (t4 - t1) / 2, offset=((t2 - t1) + (t3 - t4)) / 2, rtt=rtt)
        self._samples.append(sample)
        self._accepted += 1
        self._since_anchor += 1
        if self._since_anchor >= self._block:
            self._add_anchor()
        self._refit()
        return sample

    def _add_anchor(self) -> None:
        block = list(self._samples)[-self._since_anchor :]
        self._since_anchor = 0
        t_mid = (block[0].t_local + block[-1].t_local) / 2
        self._anchors.append((t_mid, _envelope_offset(block, self._b, t_mid)))
        self._anchor_rate = self._theil_sen() if len(self._anchors) >= 3 else None
        up = min(block, key=lambda x: x.up)
        down = min(block, key=lambda x: x.down)
        self._blocks.append((up.t_local, up.up, down.t_local, down.down))
        self._long = None
        if len(self._blocks) >= MIN_LONG_BLOCKS:
            self._fit_long()

    def _fit_long(self) -> None:
        """The long lines over the blocks' fastest trips (see the module docstring)."""
        blocks = self._blocks
        t0 = blocks[-1][2]
        u0, su = _lower_line([(tu - t0, yu) for tu, yu, _, _ in blocks])
        d0, sd = _lower_line([(td - t0, yd) for _, _, td, yd in blocks])
        rate = (su - sd) / 2
        if abs(rate) > MAX_RATE:
            return
        offset0 = (u0 - d0) / 2
        # how far one block's estimate strays from the next: the noise of a few blocks'
        # estimate, measured so that a bend in the points (what is tested) does not inflate it
        each = [(yu - yd) / 2 - rate * ((tu + td) / 2 - t0) for tu, yu, td, yd in blocks]
        scatter = statistics.median(abs(b - a) for a, b in itertools.pairwise(each))
        recent = list(self._samples)[-self._block * KEEP_BLOCKS :]
        short = _envelope_offset(recent, rate, t0)
        if abs(short - offset0) > LONG_AGREE * scatter + LONG_FLOOR_S:
            # the rate changed (or a step the caller has not caught): start the lines afresh
            for _ in range(len(blocks) - KEEP_BLOCKS):
                blocks.popleft()
            self.long_resets += 1
            return
        self._long = (t0, offset0, rate)

    def _theil_sen(self) -> float:
        anchors = list(self._anchors)
        slopes = [
            (o2 - o1) / (t2 - t1)
            for i, (t1, o1) in enumerate(anchors)
            for t2, o2 in anchors[i + 1 :]
            if t2 != t1
        ]
        return statistics.median(slopes)

    def _refit(self) -> None:
        samples = self._samples
        t_ref = samples[-1].t_local
        self._t_ref = t_ref
        if self._long is not None:
            t0, offset0, rate = self._long
            self._b = rate
            self._a = offset0 + rate * (t_ref - t0)
            return
        weights = _weights(samples, min(s.rtt for s in samples))
        t_mean, o_mean = _centroid(samples, weights, t_ref)
        span = max(s.t_local for s in samples) - min(s.t_local for s in samples)
        anchor_span = self._anchors[-1][0] - self._anchors[0][0] if self._anchors else 0.0
        if self._anchor_rate is not None and anchor_span >= span:
            b = self._anchor_rate
        elif span >= MIN_FIT_SPAN_S:
            sxx = math.fsum(
                w * (s.t_local - t_ref - t_mean) ** 2 for s, w in zip(samples, weights, strict=True)
            )
            sxy = math.fsum(
                w * (s.t_local - t_ref - t_mean) * (s.offset - o_mean)
                for s, w in zip(samples, weights, strict=True)
            )
            b = sxy / sxx if sxx > 0 else 0.0
        else:
            b = 0.0
        b = min(MAX_RATE, max(-MAX_RATE, b))  # no crystal drifts more; beyond is noise
        self._b = b
        self._a = _envelope_offset(samples, b, t_ref)

    @property
    def calibrated(self) -> bool:
        """True once ``calibration_samples`` samples were accepted (since the last reset)."""
        return self._accepted >= self.calibration_samples

    @property
    def rate_ppm(self) -> float:
        """Drift of the master's clock relative to the node's, in ppm (0.0 until measurable)."""
        return self._b * 1e6

    def offset_at(self, t_local: float) -> float | None:
        """Estimated ``master - node`` at node time ``t_local``; None before the first sample."""
        if not self._samples:
            return None
        return self._a + self._b * (t_local - self._t_ref)

    def to_master(self, t_local: float) -> float:
        """Node time -> master time. Raises ValueError before the first sample."""
        if not self._samples:
            raise ValueError("no clock samples yet")
        return t_local + self._a + self._b * (t_local - self._t_ref)

    def to_local(self, t_master: float) -> float:
        """Master time -> node time, the inverse of ``to_master``."""
        if not self._samples:
            raise ValueError("no clock samples yet")
        return self._t_ref + (t_master - self._t_ref - self._a) / (1.0 + self._b)

    @property
    def sample_count(self) -> int:
        """Samples in the window."""
        return len(self._samples)

    def rtt_estimate(self) -> float | None:
        """90th percentile of the window's round trips: a slow-ish but typical rtt, or None."""
        if not self._samples:
            return None
        return _percentile(sorted(s.rtt for s in self._samples), 0.9)

    def stats(self) -> dict[str, Any]:
        """JSON-friendly summary for the node's retained state."""
        rtts = sorted(s.rtt for s in self._samples)
        newest = self._samples[-1].t_local if self._samples else None
        return {
            "offset_s": None if newest is None else self.offset_at(newest),
            "rate_ppm": self.rate_ppm,
            "rtt_min_s": rtts[0] if rtts else None,
            "rtt_median_s": statistics.median(rtts) if rtts else None,
            "samples": len(rtts),
            "calibrated": self.calibrated,
            "long_lines": self._long is not None,
        }


def lead_time(
    rtts: Iterable[float | None], lead_min_s: float, lead_max_s: float, factor: float
) -> float:
    """How far ahead the master schedules a start: ``factor`` times the slowest known rtt,
    clamped to [lead_min_s, lead_max_s]. Unknown (None or non-finite) rtts are skipped; with none
    known the result is ``lead_min_s``."""
    if lead_min_s > lead_max_s:
        raise ValueError(f"lead_min_s ({lead_min_s}) exceeds lead_max_s ({lead_max_s})")
    known = [r for r in rtts if r is not None and math.isfinite(r)]
    wanted = factor * max(known) if known else lead_min_s
    return min(max(wanted, lead_min_s), lead_max_s)
