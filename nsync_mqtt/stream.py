"""What a streaming sink outputs, block by block (no threads, no clock reads).

A streaming sink keeps one output stream open and asks a :class:`Feeder` for its next block:
``render(t_ns, frames)`` returns the frames whose first reaches the DAC at host ``t_ns``
(silence between songs), where each song's frames went (:class:`Segment`, for the sink log and
the sink's position) and which songs ended. The feeder starts a song at its scheduled frame to
the frame (a late start begins at the frame its time dictates), applies the volume in the
stream, replaces or stops a song at its scheduled instant, and keeps a playing song on its
schedule with a :class:`~nsync_mqtt.drift.DriftController`: once per block it measures how far
the frame it is about to output is from where the schedule puts it and inserts or drops single
frames (or jumps, far off). A new schedule for the song that plays, close to where the stream
already is, is a *retime*: the target moves, the stream keeps going and is steered onto it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Protocol

from nsync_mqtt.drift import DriftController, Target, spread

TOL_NS = 50
"""A stop this close after an output frame's instant takes that frame (times are whole
nanoseconds, a frame ~22,676)."""
REANCHOR_S = 0.002
"""A new schedule for the playing song closer than this to where the stream is: steer, don't
restart (a restart would click)."""


class Track(Protocol):
    song: str
    frames: int

    def read(self, frame: int, nframes: int) -> bytes: ...


@dataclass(frozen=True)
class Segment:
    """Output frames ``offset .. offset+frames`` of a block carry song frames ``frame ..``
    (consecutively). ``song`` is None for a song not decoded yet (silence in its place)."""

    offset: int
    t_ns: int
    song: str | None
    frame: int
    frames: int


@dataclass
class Rendered:
    pcm: bytes | None
    segments: list[Segment] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)  # (host ns of the end, song)


@dataclass
class _Play:
    song: str
    track: Track | None
    target: Target
    pos: int | None = None  # the next song frame to output; None before the first
    stop_ns: int | None = None
    key: object = None  # which schedule this is (a retime names it)


def scale_pcm(pcm: bytes, volume: int, sample_width: int) -> bytes:
    """Samples times ``volume``/100 (16-bit or wider little-endian PCM)."""
    if volume >= 100 or not pcm:
        return pcm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # Python >= 3.13: provided by the audioop-lts package

    return audioop.mul(pcm, sample_width, volume / 100.0)


class Feeder:
    """The schedule of one streaming sink, rendered into blocks; see the module docstring."""

    def __init__(
        self,
        rate: int,
        frame_bytes: int = 4,
        sample_width: int = 2,
        controller: DriftController | None = None,
    ) -> None:
        self.rate = rate
        self.frame_bytes = frame_bytes
        self.sample_width = sample_width
        self.ctl = controller if controller is not None else DriftController()
        self.volume = 100
        self.cur: _Play | None = None
        self.next: _Play | None = None
        self._owed = 0.0
        self._end_ns: int | None = None  # where the last rendered block ended
        self.last_error_s: float | None = None

    # -- the schedule

    @property
    def idle(self) -> bool:
        return self.cur is None and self.next is None

    def sounds_from(self) -> int | None:
        """Host ns from which the stream has something to play (the past if a song plays now),
        None while idle."""
        if self.cur is not None and self.cur.pos is not None:
            return -1
        starts = [p.target.at_ns for p in (self.cur, self.next) if p is not None]
        return min(starts) if starts else None

    def play(
        self,
        song: str,
        track: Track | None,
        frame: int,
        at_ns: int,
        speed: float = 1.0,
        key: object = None,
    ) -> bool:
        """Play ``song`` from ``frame`` at host ``at_ns``; True if this only steered the song
        already playing (a retime), False if it replaces what plays or is scheduled. ``key``
        names the schedule, for the retimes that follow it."""
        target = Target(frame, at_ns, speed)
        cur = self.cur
        if (
            cur is not None
            and cur.song == song
            and cur.stop_ns is None
            and cur.pos is not None
            and self._end_ns is not None
            and abs(cur.pos - target.frame_at(self._end_ns, self.rate)) < REANCHOR_S * self.rate
        ):
            cur.target, cur.key = target, key
            if cur.track is None:
                cur.track = track
            self.next = None
            return True
        self.next = _Play(song, track, target, key=key)
        return False

    def retime(
        self, song: str, frame: int, at_ns: int, speed: float = 1.0, key: object = None
    ) -> bool:
        """The same schedule through a newer clock estimate: steer the play of that schedule
        (``key``; without one, the play of ``song`` from ``frame``) onto it, a far-off target by
        a jump; False if no such play is there. Another play of the same song (the position
        before a seek or a restart, until that instant) is left alone."""
        hit = False
        for p in (self.cur, self.next):
            same = p is not None and p.song == song
            if (
                p is not None
                and same
                and (p.key == key if key is not None else p.target.frame == frame)
            ):
                p.target = Target(frame, at_ns, speed)
                hit = True
        return hit

    def attach(self, song: str, track: Track) -> None:
        for p in (self.cur, self.next):
            if p is not None and p.song == song and p.track is None:
                p.track = track

    def stop(self, at_ns: int) -> None:
        """Nothing from host ``at_ns`` on (a scheduled song starting later is dropped)."""
        for p in (self.cur, self.next):
            if p is not None:
                p.stop_ns = at_ns if p.stop_ns is None else min(p.stop_ns, at_ns)
        if self.next is not None and self.next.target.at_ns >= at_ns:
            self.next = None

    def set_volume(self, volume: int) -> None:
        self.volume = max(0, min(100, int(volume)))

    # -- rendering

    def _until(self, t0: int, p: int, n: int, t_ns: int | None, early_ns: int = TOL_NS) -> int:
        """The first output index ``>= p`` (capped at ``n``) whose time is at or after ``t_ns``."""
        if t_ns is None:
            return n
        q = math.ceil((t_ns - early_ns - t0) * self.rate / 1e9)
        return max(p, min(n, q))

    def render(self, t_ns: int, n: int, pcm: bool = True) -> Rendered:
        """The next ``n`` output frames, the first reaching the DAC at host ``t_ns``."""
        out = bytearray() if pcm else None
        res = Rendered(None)
        fb = self.frame_bytes
        p = 0
        steered = False
        marks: list[tuple[int, int]] = []
        # a start goes to the output frame nearest its instant, so frame 0 is never skipped
        half = round(5e8 / self.rate)
        while p < n:
            t = t_ns + round(p * 1e9 / self.rate)
            nxt = self.next
            if nxt is not None and nxt.target.at_ns <= t + half:
                self.cur, self.next, nxt = nxt, None, None
                self.ctl.restart()
                steered, marks = False, []
            cur = self.cur
            if cur is not None and cur.stop_ns is not None and cur.stop_ns <= t + TOL_NS:
                self.cur = None
                continue
            if cur is None or (cur.pos is None and cur.target.at_ns > t + half):
                # silence until something starts
                starts = [x.target.at_ns for x in (self.cur, self.next) if x is not None]
                q = self._until(t_ns, p + 1, n, min(starts) if starts else None, half)
                if out is not None:
                    out += bytes((q - p) * fb)
                p = q
                continue
            if cur.pos is None:  # the first frame: the one this instant dictates
                cur.pos = max(0, round(cur.target.frame_at(t, self.rate)))
            if not steered:
                steered = True
                err = (cur.pos - cur.target.frame_at(t, self.rate)) / self.rate
                self.last_error_s = err
                c = self.ctl.update(t / 1e9, err)
                if c.jump:
                    cur.pos = max(0, round(cur.target.frame_at(t, self.rate)))
                self._owed, marks = spread(self._owed, c.ppm, n - p)
                marks = [(p + off, sign) for off, sign in marks]
            if cur.track is not None and cur.pos >= cur.track.frames:
                res.finished.append((t, cur.song))
                self.cur = None
                continue
            q = min(
                self._until(t_ns, p + 1, n, cur.stop_ns),
                self._until(t_ns, p + 1, n, nxt.target.at_ns if nxt is not None else None, half),
            )
            while marks and marks[0][0] < p:
                marks.pop(0)
            if marks and marks[0][0] == p:
                _, sign = marks.pop(0)
                if sign < 0:  # drop a frame: skip it
                    cur.pos += 1
                    continue
                # insert a frame: repeat the previous one (or the next, at the start)
                if out is not None:
                    frame = max(0, cur.pos - 1)
                    one = cur.track.read(frame, 1) if cur.track is not None else b""
                    out += scale_pcm(one, self.volume, self.sample_width) or bytes(fb)
                p += 1
                continue
            if marks:
                q = min(q, marks[0][0])
            if cur.track is not None:
                q = min(q, p + cur.track.frames - cur.pos)
            k = q - p
            res.segments.append(
                Segment(p, t, cur.song if cur.track is not None else None, cur.pos, k)
            )
            if out is not None:
                data = cur.track.read(cur.pos, k) if cur.track is not None else b""
                data = scale_pcm(data, self.volume, self.sample_width)
                out += data + bytes(k * fb - len(data))
            cur.pos += k
            p = q
        self._end_ns = t_ns + round(n * 1e9 / self.rate)
        res.pcm = bytes(out) if out is not None else None
        return res
