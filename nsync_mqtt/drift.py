"""Keeping a playing stream on the master's schedule (pure: no clock reads, no threads).

A streaming sink outputs frames continuously; its DAC consumes them at the DAC crystal's rate,
which differs from the master's clock by up to ~100 ppm (6 ms a minute), and the node's estimate
of the master's clock moves a little with every ping. So, once per block, the sink compares the
song frame it is about to output with the frame the schedule (:class:`Target`) puts at the
instant that frame will reach the DAC, and :class:`DriftController` turns the difference into a
correction:

* **soft**: insert (repeat) or drop single frames at a rate of at most ``max_ppm`` (500 ppm,
  one frame in 2,000: inaudible), spread evenly over the block (:func:`spread`). The rate is a
  PI controller on the median of the last few errors: the proportional part removes an offset
  in about ``1/kp`` seconds, the integral part learns the DAC's own drift (kept across songs, so
  the next song starts already compensated) and leaves no steady error behind it;
* **hard**: above ``hard_s`` (5 ms, a clock estimate that jumped, a sink that stalled) the
  stream jumps to the scheduled frame at once: a short skip or a repeat, then soft again.

Sign convention: an error ``e > 0`` means the stream is *ahead* (it is about to play a frame
that should come later), so it inserts frames; ``e < 0``, it drops them.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

MAX_PPM = 500.0
"""Fastest soft correction: one frame inserted or dropped per 2,000 (Snapcast's cap too)."""
HARD_RESYNC_S = 0.005
"""A median error beyond this is corrected by a jump, not by rate."""
KP_PER_S = 2.0
KI_PER_S2 = 1.0
"""PI gains: with ``ki = (kp/2)**2`` the loop is critically damped (no overshoot), time
constant ``2/kp`` = 1 s; a DAC 100 ppm off then strays at most ~40 µs before it is learnt."""
MEDIAN_OF = 5
"""Errors in the median the controller acts on (a DAC timestamp can jitter)."""
MAX_DT_S = 0.5
"""Longest interval integrated at once (a stall must not wind the integral up)."""


@dataclass(frozen=True)
class Target:
    """Where the schedule puts a song: ``frame`` reaches the DAC at host ``at_ns``, and the song
    advances ``speed`` seconds per host second (the master's clock rate seen from this host)."""

    frame: int
    at_ns: int
    speed: float = 1.0

    def frame_at(self, t_ns: int, rate: int) -> float:
        """The song frame (fractional) the schedule puts at host ``t_ns``."""
        return self.frame + (t_ns - self.at_ns) * 1e-9 * rate * self.speed

    def time_of(self, frame: float, rate: int) -> int:
        """Host ns at which the schedule plays song ``frame``."""
        return self.at_ns + round((frame - self.frame) / (rate * self.speed) * 1e9)


@dataclass(frozen=True)
class Correction:
    """What the stream does next: jump to the scheduled frame, or change rate by ``ppm``
    (positive: insert frames, negative: drop)."""

    ppm: float
    jump: bool = False


class DriftController:
    """PI control of a stream's error against its schedule; see the module docstring."""

    def __init__(
        self,
        max_ppm: float = MAX_PPM,
        kp: float = KP_PER_S,
        ki: float = KI_PER_S2,
        hard_s: float = HARD_RESYNC_S,
        median_of: int = MEDIAN_OF,
    ) -> None:
        if not (max_ppm >= 0 and kp >= 0 and ki >= 0 and hard_s > 0 and median_of >= 1):
            raise ValueError("drift controller: gains and limits must be non-negative")
        self.max_rate = max_ppm * 1e-6
        self.kp = kp
        self.ki = ki
        self.hard_s = hard_s
        self._errors: deque[float] = deque(maxlen=median_of)
        self._integral = 0.0
        self._last: float | None = None
        self.jumps = 0

    @property
    def drift_ppm(self) -> float:
        """The learnt correction rate (the DAC's drift against the schedule), ppm."""
        return self._integral * 1e6

    def restart(self) -> None:
        """A new song or a seek: forget the recent errors, keep the learnt drift."""
        self._errors.clear()
        self._last = None

    def update(self, now: float, error_s: float) -> Correction:
        """One measurement at ``now`` (seconds): the stream is ``error_s`` ahead of schedule."""
        if not math.isfinite(error_s):
            return Correction(self._integral * 1e6)
        self._errors.append(error_s)
        e = statistics.median(self._errors)
        dt = 0.0 if self._last is None else min(MAX_DT_S, max(0.0, now - self._last))
        self._last = now
        if abs(e) > self.hard_s:
            self.jumps += 1
            self._errors.clear()
            return Correction(self._integral * 1e6, jump=True)
        u = self.kp * e + self._integral
        saturated = abs(u) >= self.max_rate and (u > 0) == (e > 0)
        if not saturated:  # anti-windup: no learning while the output is pinned
            self._integral += self.ki * e * dt
            self._integral = max(-self.max_rate, min(self.max_rate, self._integral))
            u = self.kp * e + self._integral
        u = max(-self.max_rate, min(self.max_rate, u))
        return Correction(u * 1e6)


DAC_FIT_WINDOW_S = 30.0
"""Span of reported DAC times one line is fitted through (their jitter and wander average out)."""
DAC_REFIT_EVERY = 100
"""Reports between two fits; in between the last line is extended."""
DAC_LINE_SPAN_S = 15.0
"""Reports must span this long before the line is used (over a shorter span a wander of the
reports passes for a drift); until then each report is taken as it is."""
DAC_BREAK_S = 0.002
"""A report this far off the line is a break (an underrun, a restarted device): start over."""
DAC_SETTLE_S = 10.0
"""A fresh stream's reports (and those after a break) settle for a few seconds (PulseAudio's:
±0.3 ms over the first 8 s, then tens of µs): so long they are used as they are but kept out
of the line, which they would bend for the next 30 s."""


class DacClock:
    """A line through a stream's reported DAC times: output frame ``j`` reaches the DAC at
    host ``t(j) = t0 + (j - j0) * ns_per_frame``, fitted by least squares over the last
    ``window_s``. A sound server's latency reports jitter by tens of microseconds and wander by
    a few hundred over tens of seconds; the DAC itself only drifts (a slope). So the stream is
    steered against the line, not against each report, once the reports span
    ``DAC_LINE_SPAN_S`` (before, and after a break, each report as it is). The reports of a
    stream's first ``DAC_SETTLE_S`` (and of as long after a break) are kept out of the line.
    Pure: fed ``(j, t_ns)`` pairs."""

    def __init__(self, rate: int, block_frames: int, window_s: float = DAC_FIT_WINDOW_S) -> None:
        self.rate = rate
        self._points: deque[tuple[int, int]] = deque(
            maxlen=max(8, round(window_s * rate / block_frames))
        )
        self._line: tuple[int, int, float] | None = None  # (j0, t0, ns per frame)
        self._since = 0
        self.breaks = 0
        self._settle_frames = round(DAC_SETTLE_S * rate)
        self._settled_from: int | None = None  # the first frame whose report may go in the line

    def add(self, j: int, t_ns: int) -> int:
        """A report: frame ``j`` reaches the DAC at ``t_ns``; returns the line's time for it."""
        line = self._line
        if line is not None and abs(self._at(line, j) - t_ns) > DAC_BREAK_S * 1e9:
            self.breaks += 1
            self._points.clear()
            line = self._line = None
            self._settled_from = j + self._settle_frames
        if self._settled_from is None:
            self._settled_from = j + self._settle_frames
        if j < self._settled_from:
            return t_ns  # settling: as it is, and not in the line
        self._points.append((j, t_ns))
        self._since += 1
        if line is None or self._since >= DAC_REFIT_EVERY:
            line = self._line = self._fit()
            self._since = 0
        if j - self._points[0][0] < DAC_LINE_SPAN_S * self.rate:
            return t_ns  # too short a span for a line yet
        return self._at(line, j)

    def _at(self, line: tuple[int, int, float], j: int) -> int:
        j0, t0, slope = line
        return t0 + round((j - j0) * slope)

    def _fit(self) -> tuple[int, int, float]:
        pts = self._points
        j0, t0 = pts[-1]
        nominal = 1e9 / self.rate
        if len(pts) < 8:
            return j0, t0, nominal
        xs = [j - j0 for j, _ in pts]
        ys = [t - t0 - x * nominal for (_, t), x in zip(pts, xs, strict=True)]
        n = len(xs)
        mx, my = math.fsum(xs) / n, math.fsum(ys) / n
        sxx = math.fsum((x - mx) ** 2 for x in xs)
        sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        b = sxy / sxx if sxx > 0 else 0.0
        b = max(-nominal * 1e-3, min(nominal * 1e-3, b))  # no crystal is 1000 ppm off
        # the line at the newest report: my + b * (0 - mx)
        return j0, t0 + round(my - b * mx), nominal + b


def spread(owed: float, ppm: float, frames: int) -> tuple[float, list[tuple[int, int]]]:
    """Corrections for the next ``frames`` output frames at ``ppm``, given the fraction of a
    frame ``owed`` from earlier blocks: the new fraction owed, and ``(offset, +1|-1)`` pairs
    spread evenly over the block (+1: insert a frame before ``offset``, -1: drop one there)."""
    owed += frames * ppm * 1e-6
    whole = math.trunc(owed)
    owed -= whole
    if whole == 0 or frames <= 0:
        return owed, []
    sign = 1 if whole > 0 else -1
    count = abs(whole)
    return owed, [(int((i + 0.5) * frames / count), sign) for i in range(count)]
