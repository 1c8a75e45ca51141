"""The drift controller and the streaming feeder, on literal times (no threads, no sleeping).

A fake DAC consumes the feeder's blocks at ``rate × (1 + ppm·1e-6)`` of host time, like a real
crystal off by ``ppm``; the truth of each frame's time comes from the segments the feeder
returns, checked against the schedule it was given.
"""

from __future__ import annotations

import itertools
import math
import random
import struct
from dataclasses import dataclass

import pytest

from nsync_mqtt.drift import MAX_PPM, DacClock, DriftController, Target, spread
from nsync_mqtt.stream import Feeder, Rendered, Segment

RATE = 44100
BLOCK = 2205  # 50 ms
NS = 1_000_000_000


@dataclass
class FakeTrack:
    """Frame k holds the samples (k mod 2**15, k // 2**15), so the output names its frames."""

    song: str
    frames: int

    def read(self, frame: int, nframes: int) -> bytes:
        frame = max(0, frame)
        n = max(0, min(nframes, self.frames - frame))
        return b"".join(struct.pack("<hh", k % 32768, k // 32768) for k in range(frame, frame + n))


def frames_in(pcm: bytes) -> list[int]:
    return [a + 32768 * b for a, b in struct.iter_unpack("<hh", pcm)]


Timed = list[tuple[int, Segment]]


class Dac:
    """A DAC whose crystal is ``ppm`` off: output frame j plays at ``t0 + j / (rate(1+ppm))``."""

    def __init__(self, feeder: Feeder, ppm: float = 0.0, t0: int = 10 * NS) -> None:
        self.feeder, self.ppm, self.t0, self.j = feeder, ppm, t0, 0

    def time_of(self, j: int) -> int:
        return self.t0 + round(j * NS / (RATE * (1 + self.ppm * 1e-6)))

    def block(
        self, n: int = BLOCK, pcm: bool = False
    ) -> tuple[Rendered, list[tuple[int, Segment]]]:
        """One block; each segment with its true DAC time."""
        out = self.feeder.render(self.time_of(self.j), n, pcm=pcm)
        timed = [(self.time_of(self.j + s.offset), s) for s in out.segments]
        self.j += n
        return out, timed

    def run(self, seconds: float, target: Target, start_s: float = 0.0) -> list[float]:
        """Blocks for ``seconds``; the error (s) of each segment's first frame against
        ``target`` from ``start_s`` on."""
        errors = []
        end = self.t0 + round(seconds * NS)
        while self.time_of(self.j) < end:
            _, timed = self.block()
            for t, s in timed:
                if t >= self.t0 + start_s * NS:
                    errors.append((t - target.time_of(s.frame, RATE)) / NS)
        return errors


def p99(values: list[float]) -> float:
    xs = sorted(abs(v) for v in values)
    return xs[int(0.99 * (len(xs) - 1))]


# --------------------------------------------------------------------------- the controller


def test_spread_puts_whole_frames_evenly_and_carries_the_fraction() -> None:
    owed, marks = spread(0.0, 500.0, 8000)  # 4 frames over 8000
    assert marks == [(1000, 1), (3000, 1), (5000, 1), (7000, 1)] and owed == pytest.approx(0)
    owed, marks = spread(0.0, -100.0, 2205)  # 0.2205 of a frame: owed, nothing yet
    assert marks == [] and owed == pytest.approx(-0.2205)
    for _ in range(4):
        owed, marks = spread(owed, -100.0, 2205)
    assert marks == [(1102, -1)] and owed == pytest.approx(-0.1025)


def test_controller_is_quiet_on_schedule_and_pulls_back_an_offset() -> None:
    ctl = DriftController()
    assert ctl.update(0.0, 0.0).ppm == 0.0
    c = ctl.update(0.05, 100e-6)  # 0.1 ms ahead: insert frames (slow down)
    assert 0 < c.ppm <= MAX_PPM and not c.jump
    c = ctl.update(0.10, -100e-6)
    assert c.ppm == pytest.approx(ctl.drift_ppm + 2.0 * 0.0)  # median of (0, +0.1, -0.1) ms


def test_controller_saturates_then_jumps_beyond_the_hard_threshold() -> None:
    ctl = DriftController()
    for i in range(5):
        c = ctl.update(i * 0.05, 0.003)
    assert c.ppm == MAX_PPM and not c.jump
    assert ctl.drift_ppm < MAX_PPM  # no wind-up while pinned at the cap
    c = ctl.update(0.30, 0.050)
    assert not c.jump  # one wild sample does not move the median past 5 ms
    c = ctl.update(0.35, 0.050)
    assert not c.jump
    c = ctl.update(0.40, 0.050)  # now three of the five
    assert c.jump and ctl.jumps == 1


def test_controller_ignores_non_finite_errors() -> None:
    ctl = DriftController()
    assert ctl.update(0.0, float("nan")).ppm == 0.0
    assert ctl.update(0.0, float("inf")) == ctl.update(0.05, float("-inf"))


def test_controller_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        DriftController(max_ppm=-1)
    with pytest.raises(ValueError):
        DriftController(median_of=0)


# --------------------------------------------------------------------------- the feeder


@pytest.mark.parametrize("ppm", [100.0, -100.0, 37.0])
def test_a_drifting_dac_stays_on_schedule_and_its_drift_is_learnt(ppm: float) -> None:
    feeder = Feeder(RATE)
    dac = Dac(feeder, ppm)
    target = Target(0, dac.t0 + NS // 10)
    feeder.play("s", FakeTrack("s", RATE * 700), 0, target.at_ns)
    errors = dac.run(600.0, target)  # ten minutes
    settled = errors[len(errors) // 60 :]  # after the first ten seconds
    assert p99(settled) < 30e-6  # a frame is 22.7 µs
    assert max(abs(e) for e in errors) < 0.1e-3
    # the DAC runs ppm fast: the feeder repeats frames at that rate to hold the song back
    assert feeder.ctl.drift_ppm == pytest.approx(ppm, abs=2.0)
    assert feeder.ctl.jumps == 0


def test_without_correction_the_same_dac_drifts_away() -> None:
    feeder = Feeder(RATE, controller=DriftController(max_ppm=0.0, hard_s=1.0))
    dac = Dac(feeder, 100.0)
    target = Target(0, dac.t0)
    feeder.play("s", FakeTrack("s", RATE * 70), 0, target.at_ns)
    errors = dac.run(60.0, target)
    assert errors[-1] == pytest.approx(-6e-3, rel=0.02)  # 100 ppm for a minute: 6 ms early


def test_a_master_clock_running_slow_is_followed_through_the_speed() -> None:
    """The schedule's own speed (the master's clock seen from here) differs from 1 by 80 ppm
    and is refreshed by retimes, as pings refine the estimate."""
    feeder = Feeder(RATE)
    dac = Dac(feeder, -40.0)
    rng = random.Random(7)
    true = Target(0, dac.t0, speed=1 - 80e-6)
    feeder.play("s", FakeTrack("s", RATE * 200), 0, true.at_ns, true.speed)
    errors = []
    for _ in range(120):  # two minutes, a retime every second with a slightly wrong estimate
        noisy = Target(0, true.at_ns + rng.randint(-20_000, 20_000), true.speed)
        feeder.retime("s", noisy.frame, noisy.at_ns, noisy.speed)
        errors += dac.run((dac.time_of(dac.j) - dac.t0) / NS + 1.0, true)
    assert p99(errors[len(errors) // 12 :]) < 60e-6  # the estimate's own noise is 20 µs
    assert feeder.ctl.jumps == 0


def test_a_far_retime_is_reached_by_one_jump() -> None:
    feeder = Feeder(RATE)
    dac = Dac(feeder)
    target = Target(0, dac.t0)
    feeder.play("s", FakeTrack("s", RATE * 60), 0, target.at_ns)
    dac.run(2.0, target)
    moved = Target(0, target.at_ns + 20_000_000)  # 20 ms later
    feeder.retime("s", moved.frame, moved.at_ns)
    errors = dac.run(4.0, moved)
    assert feeder.ctl.jumps == 1
    assert p99(errors[-20:]) < 25e-6


def test_pcm_carries_the_song_frames_with_corrections_and_volume() -> None:
    feeder = Feeder(RATE)
    dac = Dac(feeder, 0.0)
    track = FakeTrack("s", RATE * 5)
    feeder.play("s", track, 100, dac.t0 + 10 * NS // RATE)  # frame 100 at output frame 10
    out, _ = dac.block(n=50, pcm=True)
    assert out.pcm is not None and len(out.pcm) == 50 * 4
    assert out.pcm[:40] == bytes(40)  # silence before the start
    assert frames_in(out.pcm[40:]) == list(range(100, 140))
    # a schedule 1 ms ahead of the stream: the corrector drops frames (here: at full rate)
    feeder.retime("s", 100, dac.t0 + 10 * NS // RATE - 1_000_000)
    seen = []
    for _ in range(40):
        out, _ = dac.block(pcm=True)
        assert out.pcm is not None
        seen += frames_in(out.pcm)
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert set(steps) == {1, 2} and steps.count(2) >= 20  # single frames skipped, never more
    feeder.set_volume(50)
    out, _ = dac.block(n=4, pcm=True)
    assert out.pcm is not None
    assert frames_in(out.pcm) == [(k % 32768) // 2 + 32768 * (k // 32768 // 2) for k in
                                  range(seen[-1] + 1, seen[-1] + 5)]  # fmt: skip


def test_inserted_frames_repeat_the_previous_one() -> None:
    feeder = Feeder(RATE)
    dac = Dac(feeder)
    feeder.play("s", FakeTrack("s", RATE * 5), 0, dac.t0)
    feeder.retime("s", 0, dac.t0 + 1_000_000)  # the stream is 1 ms ahead: hold it back
    seen = []
    for _ in range(40):
        out, _ = dac.block(pcm=True)
        assert out.pcm is not None
        seen += frames_in(out.pcm)
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert set(steps) == {0, 1} and steps.count(0) >= 20


def test_stop_replace_and_finish_land_on_their_frames() -> None:
    feeder = Feeder(RATE)
    dac = Dac(feeder)
    feeder.play("a", FakeTrack("a", 3000), 0, dac.t0)
    out, timed = dac.block(n=4000)
    # "a" ends after 3000 frames: reported with the time its end reaches the DAC
    assert out.finished == [(dac.time_of(3000), "a")]
    assert [(s.song, s.frame, s.frames) for _, s in timed] == [("a", 0, 3000)]
    assert feeder.idle
    feeder.play("b", FakeTrack("b", 10_000), 0, dac.time_of(4100))
    _, timed = dac.block(n=500)
    assert [(t, s.song, s.frame, s.frames) for t, s in timed] == [(dac.time_of(4100), "b", 0, 400)]
    feeder.play("c", FakeTrack("c", 10_000), 500, dac.time_of(5000))  # replaces b then
    feeder.stop(dac.time_of(5600))
    out, timed = dac.block(n=2000)
    assert [(t, s.song, s.frame, s.frames) for t, s in timed] == [
        (dac.time_of(4500), "b", 400, 500),
        (dac.time_of(5000), "c", 500, 600),
    ]
    assert out.finished == [] and feeder.idle


def test_a_nearby_play_of_the_same_song_steers_instead_of_restarting() -> None:
    feeder = Feeder(RATE)
    dac = Dac(feeder)
    feeder.play("s", FakeTrack("s", RATE * 10), 0, dac.t0)
    dac.block()
    assert feeder.play("s", None, 0, dac.t0 + 1_000_000)  # 1 ms: steer
    _, timed = dac.block()
    assert timed[0][1].frame == BLOCK  # no restart
    assert not feeder.play("s", None, 0, dac.t0 + 10_000_000)  # 10 ms: a new start
    _, timed = dac.block()
    assert timed[0][1].frame != 2 * BLOCK


def test_a_song_not_decoded_yet_keeps_its_place_in_silence() -> None:
    feeder = Feeder(RATE)
    dac = Dac(feeder)
    feeder.play("s", None, 0, dac.t0)
    out, timed = dac.block(pcm=True)
    assert out.pcm == bytes(BLOCK * 4)
    assert [(s.song, s.frame) for _, s in timed] == [(None, 0)]
    feeder.attach("s", FakeTrack("s", RATE))
    out, timed = dac.block(n=10, pcm=True)
    assert out.pcm is not None and frames_in(out.pcm) == list(range(BLOCK, BLOCK + 10))


def test_a_retime_of_a_seek_leaves_the_position_before_it_alone() -> None:
    """Until a seek's instant the song plays on from where it was; the retimes that follow the
    seek's schedule steer the seek, not the play it will replace."""
    feeder = Feeder(RATE)
    dac = Dac(feeder)
    feeder.play("s", FakeTrack("s", RATE * 60), 0, dac.t0)
    dac.block()
    seek_at = dac.time_of(4 * BLOCK)
    assert not feeder.play("s", None, 30 * RATE, seek_at)  # a seek to 30 s, 3 blocks ahead
    assert feeder.retime("s", 30 * RATE, seek_at + 2_000, 1.0)  # only the seek moves
    assert not feeder.retime("s", 7, seek_at, 1.0)  # no play from frame 7
    frames = []
    for _ in range(5):
        _, timed = dac.block()
        frames += [(s.frame, s.frames) for _, s in timed]
    assert frames[:3] == [(BLOCK, BLOCK), (2 * BLOCK, BLOCK), (3 * BLOCK, BLOCK)]
    assert feeder.ctl.jumps == 0
    assert frames[3][0] == 30 * RATE  # the seek, on its (retimed) instant


def test_a_retime_names_its_schedule_so_a_restart_from_the_same_frame_waits_its_turn() -> None:
    """Back to the start of the song playing: the new schedule and the old one both begin at
    frame 0; the retimes carry the new one's key and leave the old play alone."""
    feeder = Feeder(RATE)
    dac = Dac(feeder)
    feeder.play("s", FakeTrack("s", RATE * 60), 0, dac.t0, key="first")
    for _ in range(10):
        dac.block()
    restart_at = dac.time_of(14 * BLOCK)
    feeder.play("s", None, 0, restart_at, key="again")
    assert feeder.retime("s", 0, restart_at + 3_000, key="again")
    assert not feeder.retime("s", 0, restart_at, key="gone")
    seen = []
    for _ in range(6):
        _, timed = dac.block()
        seen += [(s.frame, s.frames) for _, s in timed]
    assert seen[:4] == [(k * BLOCK, BLOCK) for k in range(10, 14)]  # the first play goes on
    assert seen[4][0] == 0 and feeder.ctl.jumps == 0  # then the restart, on its instant


# --------------------------------------------------------------------------- the DAC's line


def test_the_dac_line_averages_jittery_wandering_reports_and_keeps_the_drift() -> None:
    """Reports around a DAC 60 ppm fast, with 40 µs of jitter and a 200 µs wander over 20 s:
    the line stays within a few µs of the truth where single reports are 240 µs off."""
    rng = random.Random(5)
    dac = DacClock(RATE, 441)
    worst_report = worst_line = 0.0
    for k in range(100 * 120):  # two minutes of 10 ms blocks
        j = k * 441
        truth = 10 * NS + round(j * NS / (RATE * (1 + 60e-6)))
        wander = 100_000 * math.sin(2 * math.pi * k / 2000)  # ±100 µs, 20 s period
        report = truth + round(wander + rng.gauss(0, 40_000))
        line = dac.add(j, report)
        if k > 100 * 60:
            worst_report = max(worst_report, abs(report - truth))
            worst_line = max(worst_line, abs(line - truth))
    assert worst_report > 200_000
    assert worst_line < 60_000
    assert dac.breaks == 0


def test_a_jump_in_the_reports_restarts_the_line() -> None:
    dac = DacClock(RATE, 441)
    for k in range(1500):  # past the settling (whose reports are not in the line)
        dac.add(k * 441, 10 * NS + round(k * 441 * NS / RATE))
    j = 1500 * 441
    later = 10 * NS + round(j * NS / RATE) + 50_000_000  # the device restarted, 50 ms later
    assert dac.add(j, later) == later and dac.breaks == 1
    assert dac.add(j + 441, later + round(441 * NS / RATE)) == later + round(441 * NS / RATE)


def test_a_fresh_streams_settling_reports_stay_out_of_the_line() -> None:
    """PulseAudio's reports of a new stream are off by up to 0.3 ms over its first 8 s, then
    only jitter: fitted in, that settling bent the line (0.2-0.3 ms off from 15 to 35 s of
    stream in the real-stack runs)."""
    rng = random.Random(9)
    dac = DacClock(RATE, 441)
    worst_line = 0.0
    for k in range(100 * 60):  # a minute of 10 ms blocks
        j = k * 441
        truth = 10 * NS + round(j * NS / RATE)
        t = k / 100
        settling = 300_000 * max(0.0, 1 - t / 8)  # late at first, then right
        report = truth + round(settling + rng.gauss(0, 10_000))
        line = dac.add(j, report)
        if t < 8:
            assert line == report  # used as they are while settling
        if t >= 25:  # the line, from the settled reports only
            worst_line = max(worst_line, abs(line - truth))
    assert worst_line < 15_000
    assert dac.breaks == 0
