"""PCM cache, tones and sinks.

The virtual sink is paced by the host clock, so its tests run it for real: all scenarios share
one run of about 0.4 s (several sinks side by side) and then check the logs exactly.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import threading
import time
import types
import warnings
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nsync_mqtt import audio
from nsync_mqtt.audio import (
    FRAME_BYTES,
    RATE,
    AudioDeviceError,
    DecodeError,
    NullSink,
    PcmCache,
    PcmTrack,
    SimpleaudioSink,
    VirtualSink,
    make_sink,
    probe,
)
from nsync_mqtt.errors import ConfigError
from nsync_mqtt.sinklog import Block, read_log
from nsync_mqtt.tones import ffmpeg_available, make_tone_mp3, make_tone_wav

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # Python >= 3.13: from audioop-lts

BLOCK = 2205  # 50 ms at 44.1 kHz
needs_ffmpeg = pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg not installed")


def wav_file(tmp_path: Path, name: str, seconds: float, freq: float = 440.0) -> Path:
    path = tmp_path / name
    path.write_bytes(make_tone_wav(seconds, freq, title=f"T {name}", artist="Tester"))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> PcmCache:
    return PcmCache(tmp_path / "pcm")


# --------------------------------------------------------------------------- cache and decode


def test_decode_wav_gives_16_bit_stereo_44k_frames(tmp_path: Path, cache: PcmCache) -> None:
    src = wav_file(tmp_path, "a.wav", 0.5)
    track = cache.decode("song-a", src)
    assert track.frames == RATE // 2
    assert track.path.stat().st_size == track.frames * FRAME_BYTES
    with wave.open(str(src)) as w:
        assert track.read(0, track.frames) == w.readframes(w.getnframes())
    assert cache.get("song-a") is track
    assert cache.decode("song-a", tmp_path / "missing.wav") is track  # cached: no decode


@pytest.fixture(params=["ffmpeg", "no-ffmpeg"])
def converter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A WAV in another layout is converted by ffmpeg, or by pydub where ffmpeg is missing."""
    if request.param == "ffmpeg":
        if not ffmpeg_available():
            pytest.skip("ffmpeg not installed")
    else:
        monkeypatch.setattr(audio, "_ffmpeg", lambda: None)
    return str(request.param)


def test_decode_resamples_and_upmixes(tmp_path: Path, cache: PcmCache, converter: str) -> None:
    src = tmp_path / "mono22k.wav"
    with wave.open(str(src), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(b"\x10\x00" * 22050)
    track = cache.decode("mono", src)
    assert abs(track.frames - RATE) <= 2
    mid = track.read(RATE // 2, 1)
    assert mid == b"\x10\x00\x10\x00"


def test_decode_converts_24_bit_samples(tmp_path: Path, cache: PcmCache, converter: str) -> None:
    values = [0, 0x400000, -0x400000, 0x7FFFFF, -0x800000, 0x123456]
    src = tmp_path / "deep.wav"
    with wave.open(str(src), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(3)
        w.setframerate(RATE)
        w.writeframes(b"".join((v & 0xFFFFFF).to_bytes(3, "little") for v in values * 2))
    track = cache.decode("deep", src)
    assert track.frames == len(values)
    pcm = track.read(0, track.frames)
    got = [int.from_bytes(pcm[i : i + 2], "little", signed=True) for i in range(0, 24, 2)]
    assert got == [v >> 8 for v in values * 2]  # the top 16 of the 24 bits


@needs_ffmpeg
def test_decode_mp3(tmp_path: Path, cache: PcmCache) -> None:
    src = tmp_path / "t.mp3"
    src.write_bytes(make_tone_mp3(1.0, 440.0, "Mp3 Tone", "Tester"))
    track = cache.decode("mp3", src)
    assert abs(track.frames - RATE) < 2048  # encoder padding
    assert track.path.stat().st_size == track.frames * FRAME_BYTES


@needs_ffmpeg
def test_decode_mixes_more_than_two_channels_down(tmp_path: Path, cache: PcmCache) -> None:
    src = tmp_path / "surround.wav"
    with wave.open(str(src), "wb") as w:  # 5.1, every channel at the same level
        w.setnchannels(6)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(b"\x00\x10" * 6 * (RATE // 10))
    track = cache.decode("surround", src)
    assert track.frames == RATE // 10
    mid = track.read(RATE // 20, 1)
    left, right = (int.from_bytes(mid[i : i + 2], "little", signed=True) for i in (0, 2))
    assert left == right and left > 0


def test_without_ffmpeg_only_wav_is_decoded(
    tmp_path: Path, cache: PcmCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audio, "_ffmpeg", lambda: None)
    assert cache.decode("wav", wav_file(tmp_path, "a.wav", 0.1)).frames == RATE // 10
    src = tmp_path / "t.flac"
    src.write_bytes(b"fLaC" + bytes(100))
    with pytest.raises(DecodeError, match=r"t\.flac: ffmpeg is not installed"):
        cache.decode("flac", src)
    assert [p.name for p in cache.root.iterdir()] == [f"wav.{RATE // 10}.pcm"]


def test_a_disk_that_fills_up_while_decoding_leaves_nothing(
    tmp_path: Path, cache: PcmCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fill_up(src: Path, out: Any, limit: int | None) -> int:
        out.write(bytes(FRAME_BYTES * 100))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audio, "_decode_to", fill_up)
    with pytest.raises(DecodeError, match=r"cannot write the decoded audio of a\.wav: .*No space"):
        cache.decode("a", wav_file(tmp_path, "a.wav", 0.1))
    assert cache.get("a") is None
    assert list(cache.root.iterdir()) == []


DECODE_IN_A_CHILD = """
import resource, sys
from nsync_mqtt.audio import PcmCache
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
track = PcmCache(sys.argv[2]).decode("long", sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(track.frames, (after - before) * 1024)
"""


@needs_ffmpeg
def test_decoding_streams_to_disk_without_holding_the_song_in_memory(tmp_path: Path) -> None:
    """Ten minutes of FLAC decode to 106 MB of PCM; the decoding process grows by a few MB."""
    import subprocess

    src = _silence_flac(tmp_path / "long.flac", 600.0)
    done = subprocess.run(
        [sys.executable, "-c", DECODE_IN_A_CHILD, str(src), str(tmp_path / "pcm")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    frames, grown = (int(x) for x in done.stdout.split())
    assert frames == 600 * RATE
    assert grown < 16 * 1024 * 1024, f"the decoder grew by {grown / 1e6:.0f} MB"


def test_decode_without_a_file_extension_still_reads_wav(tmp_path: Path, cache: PcmCache) -> None:
    src = wav_file(tmp_path, "blob", 0.1)
    assert cache.decode("blob", src).frames == RATE // 10


@pytest.mark.parametrize("content", [b"", b"this is not audio at all" * 100, b"RIFF\0\0\0\0WAVE"])
def test_undecodable_input_raises_decode_error(
    tmp_path: Path, cache: PcmCache, content: bytes
) -> None:
    src = tmp_path / "bad.mp3"
    src.write_bytes(content)
    with pytest.raises(DecodeError, match=r"bad\.mp3"):
        cache.decode("bad", src)
    assert cache.get("bad") is None
    assert list(cache.root.iterdir()) == []  # no temporary left behind


def test_remove_forgets_the_song(tmp_path: Path, cache: PcmCache) -> None:
    cache.decode("a", wav_file(tmp_path, "a.wav", 0.1))
    cache.remove("a")
    assert cache.get("a") is None
    cache.remove("a")  # idempotent
    assert PcmCache(cache.root).get("a") is None


def test_track_read_edges(tmp_path: Path) -> None:
    path = tmp_path / "x.pcm"
    data = bytes(range(256)) * 4  # 256 frames
    path.write_bytes(data + b"\x01\x02")  # a torn last frame is not a frame
    track = PcmTrack("x", path)
    assert track.frames == 256
    assert track.duration_s == 256 / RATE
    assert track.read(0, 2) == data[:8]
    assert track.read(10, 3) == data[40:52]
    assert track.read(254, 10) == data[-8:]
    assert track.read(256, 1) == b""
    assert track.read(1000, 5) == b""
    assert track.read(5, 0) == b""
    track.close()


def test_probe_reads_tags_and_duration(tmp_path: Path) -> None:
    info = probe(wav_file(tmp_path, "a.wav", 0.25))
    assert info["duration_s"] == pytest.approx(0.25, abs=1e-3)
    if ffmpeg_available():
        assert (info["title"], info["artist"]) == ("T a.wav", "Tester")


def test_probe_never_raises(tmp_path: Path) -> None:
    bad = tmp_path / "Some Song.mp3"
    bad.write_bytes(b"garbage")
    assert probe(bad) == {"title": "Some Song", "artist": None, "album": None, "duration_s": None}
    assert probe(tmp_path / "nope.ogg")["title"] == "nope"


@needs_ffmpeg
def test_mp3_tone_carries_id3_tags(tmp_path: Path) -> None:
    src = tmp_path / "t.mp3"
    src.write_bytes(make_tone_mp3(0.5, 330.0, "Hello", "World"))
    assert src.read_bytes()[:3] == b"ID3"
    info = probe(src)
    assert (info["title"], info["artist"]) == ("Hello", "World")


def test_tone_has_a_click_each_second() -> None:
    raw = make_tone_wav(2.0, 440.0, "x")
    with wave.open(io.BytesIO(raw)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, RATE)
        pcm = w.readframes(w.getnframes())
    peak = [audioop.max(pcm[s * RATE * 4 : s * RATE * 4 + 400], 2) for s in (0, 1)]
    between = audioop.max(pcm[RATE * 2 : RATE * 2 + 400], 2)
    assert min(peak) > 2 * between


# --------------------------------------------------------------------------- virtual sink


def blocks_of(path: Path) -> list[Block]:
    return read_log(path)


def expected_t(start_ns: int, frames_before: int, ppm: float = 0.0) -> int:
    return start_ns + round(frames_before / (RATE * (1 + ppm * 1e-6)) * 1e9)


@dataclass
class Scenario:
    sink: VirtualSink
    log: Path
    finished: list[tuple[str, int]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    blocks: list[Block] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Scenario]:
    """Runs every virtual sink scenario at once (about 0.4 s of real time)."""
    tmp = tmp_path_factory.mktemp("sinks")
    cache = PcmCache(tmp / "pcm")
    long = cache.decode("long", wav_file(tmp, "long.wav", 0.3))
    short = cache.decode("short", wav_file(tmp, "short.wav", 0.1, 660.0))
    runs: dict[str, Scenario] = {}
    for name, ppm in [
        ("plain", 0.0), ("drift", 1000.0), ("late", 0.0), ("stop", 0.0),
        ("attach", 0.0), ("switch", 0.0), ("seek", 0.0),
    ]:  # fmt: skip
        log = tmp / f"{name}.jsonl"
        sc = Scenario(VirtualSink(log, dac_drift_ppm=ppm), log)

        def finished(song: str, sc: Scenario = sc) -> None:
            sc.finished.append((song, time.monotonic_ns()))
            sc.done.set()

        sc.sink.on_finished = finished
        runs[name] = sc

    try:
        at = time.monotonic() + 0.05
        for name in ("plain", "drift", "stop", "switch"):
            runs[name].sink.play("long", long, 0, at)
        runs["seek"].sink.play("long", long, 4410, at)
        runs["stop"].sink.stop(at + 0.06)
        runs["late"].info["called_ns"] = time.monotonic_ns()
        runs["late"].sink.play("long", long, 0, at - 0.15)
        runs["attach"].sink.play("long", None, 0, at)
        timers = [
            threading.Timer(0.11, runs["attach"].sink.attach, ("long", long)),
            threading.Timer(0.08, runs["switch"].sink.play, ("short", short, 0, at + 0.2)),
        ]
        for t in timers:
            t.start()
        assert runs["plain"].sink.position() == (None, None)  # not started yet
        time.sleep(max(0.0, at + 0.125 - time.monotonic()))
        before = time.monotonic()
        runs["plain"].info["position"] = runs["plain"].sink.position()
        runs["plain"].info["position_window"] = (before, time.monotonic())

        for name in ("plain", "drift", "late", "attach", "switch", "seek"):
            assert runs[name].done.wait(2.0), f"{name} never finished"
        for t in timers:
            t.join()
        runs["plain"].info["after"] = runs["plain"].sink.position()
    finally:
        for sc in runs.values():
            sc.sink.close()
    for sc in runs.values():
        sc.blocks = blocks_of(sc.log)
        sc.info["at_ns"] = round(at * 1e9)
        sc.info["long"], sc.info["short"] = long.frames, short.frames
    return runs


HALF_FRAME_NS = 1e9 / RATE / 2


def assert_contiguous(blocks: list[Block], start_frame: int, ppm: float = 0.0) -> int:
    """The blocks continue one another in frames and in DAC time (a virtual DAC running
    ``ppm`` fast); returns how many frames they hold."""
    frames_before = 0
    for b in blocks:
        assert b.frame == start_frame + frames_before
        assert abs(b.t_ns - expected_t(blocks[0].t_ns, frames_before, ppm)) <= 1
        assert 0 < b.frames <= BLOCK
        assert b.rate == RATE
        frames_before += b.frames
    return frames_before


def assert_on_schedule(b: Block, at_ns: int, frame: int) -> None:
    """Block ``b`` plays its first frame where a schedule putting ``frame`` at ``at_ns`` wants
    it, to the frame."""
    assert abs(b.t_ns - (at_ns + (b.frame - frame) * 1e9 / RATE)) <= HALF_FRAME_NS


def test_plays_the_whole_song_on_schedule(played: dict[str, Scenario]) -> None:
    sc = played["plain"]
    at_ns = sc.info["at_ns"]
    first = sc.blocks[0]
    assert first.frame == 0  # on the output frame nearest the start
    assert_on_schedule(first, at_ns, 0)
    assert {b.song for b in sc.blocks} == {"long"}
    assert assert_contiguous(sc.blocks, first.frame) == sc.info["long"] - first.frame
    # on_finished once, after the last frame has been played (the sink is paced in real time)
    assert [s for s, _ in sc.finished] == ["long"]
    assert sc.finished[0][1] >= expected_t(at_ns, sc.info["long"]) - HALF_FRAME_NS


def test_log_lines_are_the_documented_json(played: dict[str, Scenario]) -> None:
    line = json.loads(played["plain"].log.read_text().splitlines()[0])
    assert set(line) == {"t_ns", "song", "frame", "frames", "rate"}
    assert isinstance(line["t_ns"], int)


def test_position_follows_the_dac(played: dict[str, Scenario]) -> None:
    sc = played["plain"]
    at = sc.info["at_ns"] / 1e9
    lo, hi = sc.info["position_window"]
    song, frame = sc.info["position"]
    assert song == "long"
    assert int((lo - at) * RATE) - 1 <= frame <= int((hi - at) * RATE) + 1
    assert sc.info["after"] == (None, None)


def test_dac_drift_shortens_frame_spacing(played: dict[str, Scenario]) -> None:
    """A DAC 1000 ppm fast consumes frames 1000 ppm faster: between blocks that continue one
    another, the time is that of their frames at 1.001 × the rate (plus one frame where the
    corrector repeated one to hold the song back)."""
    blocks = played["drift"].blocks
    assert sum(b.frames for b in blocks) + blocks[0].frame >= played["drift"].info["long"]
    extra = []
    for a, b in itertools.pairwise(blocks):
        assert b.frame == a.end_frame
        spacing = (b.t_ns - a.t_ns) * RATE * 1.001 / 1e9
        extra.append(round(spacing - a.frames, 3))
    assert set(extra) <= {0.0, 1.0}
    assert extra.count(0.0) > len(extra) // 2


def test_late_start_begins_at_the_frame_time_dictates(played: dict[str, Scenario]) -> None:
    sc = played["late"]
    at_ns = sc.info["at_ns"] - 150_000_000
    first = sc.blocks[0]
    assert first.t_ns >= sc.info["called_ns"]
    assert first.t_ns - sc.info["called_ns"] < 20_000_000
    # frame k of the song belongs at at + k/rate: the first block honours that to the frame
    assert_on_schedule(first, at_ns, 0)
    assert assert_contiguous(sc.blocks, first.frame) == sc.info["long"] - first.frame
    assert [s for s, _ in sc.finished] == ["long"]


def test_seek_starts_at_the_given_frame(played: dict[str, Scenario]) -> None:
    sc = played["seek"]
    assert sc.blocks[0].frame == 4410
    assert_on_schedule(sc.blocks[0], sc.info["at_ns"], 4410)
    first = sc.blocks[0].frame
    assert assert_contiguous(sc.blocks, first) == sc.info["long"] - first


def test_stop_ends_the_song_at_its_instant(played: dict[str, Scenario]) -> None:
    sc = played["stop"]
    played_frames = assert_contiguous(sc.blocks, sc.blocks[0].frame)
    last = sc.blocks[-1]
    end_ns = last.t_ns + last.frames * 1e9 / RATE
    assert abs(end_ns - (sc.info["at_ns"] + 60_000_000)) <= 1e9 / RATE  # 60 ms after the start
    assert abs(played_frames - 0.06 * RATE) <= 1
    assert sc.finished == []


def test_silence_until_attach_then_the_frame_time_dictates(played: dict[str, Scenario]) -> None:
    sc = played["attach"]
    songs = [b.song for b in sc.blocks]
    assert songs[0] is None
    assert songs[-1] == "long"
    first_song = songs.index("long")
    assert all(s is None for s in songs[:first_song])
    assert all(s == "long" for s in songs[first_song:])
    # one timeline: silence stands in for the frames it covers
    first = sc.blocks[0].frame
    assert assert_contiguous(sc.blocks, first) == sc.info["long"] - first
    assert_on_schedule(sc.blocks[first_song], sc.info["at_ns"], 0)
    assert [s for s, _ in sc.finished] == ["long"]


def test_play_replaces_the_current_song_at_its_start_time(played: dict[str, Scenario]) -> None:
    sc = played["switch"]
    at_ns = sc.info["at_ns"]
    long_blocks = [b for b in sc.blocks if b.song == "long"]
    short_blocks = [b for b in sc.blocks if b.song == "short"]
    assert sc.blocks == long_blocks + short_blocks
    long_frames = assert_contiguous(long_blocks, long_blocks[0].frame)
    assert abs(long_blocks[0].frame + long_frames - 0.2 * RATE) <= 1  # until at + 0.2 s
    assert short_blocks[0].frame == 0
    assert_on_schedule(short_blocks[0], at_ns + 200_000_000, 0)
    first = short_blocks[0].frame
    assert assert_contiguous(short_blocks, first) == sc.info["short"] - first
    assert [s for s, _ in sc.finished] == ["short"]


def test_nothing_is_logged_while_idle(tmp_path: Path) -> None:
    sink = VirtualSink(tmp_path / "idle.jsonl")
    sink.stop()
    sink.set_volume(30)
    assert sink.position() == (None, None)
    sink.close()
    assert (tmp_path / "idle.jsonl").read_text() == ""


def test_a_scheduled_play_is_replaced_before_it_starts(tmp_path: Path) -> None:
    sink = VirtualSink(tmp_path / "r.jsonl")
    track = PcmTrack("x", _pcm(tmp_path, 10))
    sink.play("x", track, 0, time.monotonic() + 30)
    sink.play("y", None, 0, time.monotonic() + 60)
    sink.stop(time.monotonic() + 45)
    sink.close()
    assert read_log(tmp_path / "r.jsonl") == []


def _pcm(tmp_path: Path, frames: int) -> Path:
    path = tmp_path / "t.pcm"
    path.write_bytes(bytes(range(4)) * frames)
    return path


# --------------------------------------------------------------------------- other sinks


def test_make_sink_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    virtual = make_sink("virtual", tmp_path / "v.jsonl", 5.0)
    none = make_sink("none", None, 0.0)
    try:
        assert type(virtual) is VirtualSink
        assert isinstance(none, NullSink)
    finally:
        virtual.close()
        none.close()
    with pytest.raises(ConfigError, match="sink"):
        make_sink("hifi", None, 0.0)
    monkeypatch.setitem(sys.modules, "simpleaudio", None)  # import fails
    with pytest.raises(AudioDeviceError, match="simpleaudio"):
        make_sink("simpleaudio", None, 0.0)
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    with pytest.raises(AudioDeviceError, match="PortAudio"):
        make_sink("stream", None, 0.0)
    # auto: the stream sink, else simpleaudio; here neither, and the error names the last
    with pytest.raises(AudioDeviceError, match="simpleaudio"):
        make_sink("auto", None, 0.0)


class _FakePlay:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.stopped = False

    def is_playing(self) -> bool:
        return not self.stopped and time.monotonic() < self.end

    def stop(self) -> None:
        self.stopped = True


def _fake_simpleaudio(calls: list[tuple[float, bytes]], fail: bool = False) -> types.ModuleType:
    mod = types.ModuleType("simpleaudio")

    def play_buffer(pcm: bytes, channels: int, width: int, rate: int) -> _FakePlay:
        if fail:
            raise OSError("Error opening PCM device")
        assert (channels, width, rate) == (2, 2, RATE)
        calls.append((time.monotonic(), bytes(pcm)))
        return _FakePlay(len(pcm) / FRAME_BYTES / rate)

    mod.play_buffer = play_buffer  # type: ignore[attr-defined]
    return mod


def test_simpleaudio_without_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "simpleaudio", _fake_simpleaudio([], fail=True))
    with pytest.raises(AudioDeviceError, match="device"):
        SimpleaudioSink()


def test_simpleaudio_late_start_volume_and_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[float, bytes]] = []
    monkeypatch.setitem(sys.modules, "simpleaudio", _fake_simpleaudio(calls))
    track = PcmCache(tmp_path / "pcm").decode("s", wav_file(tmp_path, "s.wav", 0.35))
    sink = SimpleaudioSink()
    calls.clear()  # the device check at construction
    done = threading.Event()
    sink.on_finished = lambda song: done.set() if song == "s" else None
    try:
        sink.set_volume(50)
        called = time.monotonic()
        at = called - 0.2
        sink.play("s", track, 0, at)
        assert done.wait(1.0)
    finally:
        sink.close()
    assert len(calls) == 1
    t_call, pcm = calls[0]
    frame = track.frames - len(pcm) // FRAME_BYTES
    # started now, sounding SIMPLEAUDIO_LATENCY_S later, at the frame that instant dictates
    sounding = t_call + audio.SIMPLEAUDIO_LATENCY_S
    assert abs(frame - (sounding - at) * RATE) < 0.005 * RATE
    assert pcm == audioop.mul(track.read(frame, track.frames), 2, 0.5)


# --- sniff and the in-Python WAV probe ----------------------------------------------------


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"RIFF\x24\x00\x00\x00WAVE", "wav"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00", "mp3"),
        (b"\xff\xfb\x90\x64\x00\x00\x00\x00\x00\x00\x00\x00", "mp3"),
        (b"fLaC\x00\x00\x00\x22\x00\x00\x00\x00", "flac"),
        (b"OggS\x00\x02\x00\x00\x00\x00\x00\x00", "ogg"),
        (b"\x00\x00\x00\x20ftypM4A ", "mp4"),
        (b"FORM\x00\x00\x00\x00AIFF", "aiff"),
        (b"RIFF\x24\x00\x00\x00AVI ", None),
        (b"\x00" * 12, None),
        (b"PK\x03\x04" + b"\x00" * 8, None),
        (b"", None),
    ],
)
def test_sniff_names_audio_containers_and_refuses_the_rest(head: bytes, kind: str | None) -> None:
    assert audio.sniff(head) == kind


def test_wav_probe_reads_tags_and_duration_without_ffprobe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydub.utils

    def no_ffprobe(*a: Any, **k: Any) -> Any:
        raise AssertionError("ffprobe must not be needed for a WAV file")

    monkeypatch.setattr(pydub.utils, "mediainfo", no_ffprobe)
    p = tmp_path / "song.wav"
    p.write_bytes(make_tone_wav(1.25, 440.0, "Título", "Ärtist"))
    assert audio.probe(p) == {
        "title": "Título",
        "artist": "Ärtist",
        "album": None,
        "duration_s": 1.25,
    }
    bare = tmp_path / "bare.wav"
    with wave.open(str(bare), "wb") as w:  # no INFO chunk: the stem is the title
        w.setnchannels(1)
        w.setsampwidth(3)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00\x00" * 4000)
    assert audio.probe(bare) == {"title": "bare", "artist": None, "album": None, "duration_s": 0.5}


def _silence_flac(path: Path, seconds: float) -> Path:
    """Seconds of silence as FLAC: a few KB a minute, hundreds of MB once decoded."""
    import subprocess

    cmd = ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo"]
    subprocess.run([*cmd, "-t", str(seconds), "-c:a", "flac", str(path)], check=True, timeout=60)
    return path


@needs_ffmpeg
def test_a_song_longer_than_the_limit_is_refused_without_decoding_it_all(tmp_path: Path) -> None:
    src = _silence_flac(tmp_path / "long.flac", 200.0)
    assert src.stat().st_size < 100_000
    cache = PcmCache(tmp_path / "pcm")
    with pytest.raises(DecodeError, match="longer than the limit of 1 minute"):
        cache.decode("c" * 56, src, max_seconds=60.0)
    assert cache.get("c" * 56) is None and not list((tmp_path / "pcm").iterdir())
    track = cache.decode("c" * 56, src, max_seconds=240.0)  # within the limit: decoded whole
    assert track.frames == 200 * 44100


def test_a_wav_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "long.wav"
    src.write_bytes(make_tone_wav(3.0, 440.0, "Long", "Tester"))
    with pytest.raises(DecodeError, match="longer than the limit of"):
        PcmCache(tmp_path / "pcm").decode("d" * 56, src, max_seconds=2.0)


def test_a_cache_file_cut_short_is_removed_and_decoded_again(tmp_path: Path) -> None:
    cache = PcmCache(tmp_path / "pcm")
    track = cache.decode("a", wav_file(tmp_path, "a.wav", 0.1))
    frames = track.frames
    (path,) = (tmp_path / "pcm").glob("a.*.pcm")
    assert path.name == f"a.{frames}.pcm"
    # a power cut before the disk wrote it all: a restarted node finds it short
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    fresh = PcmCache(tmp_path / "pcm")
    assert fresh.get("a") is None and fresh.rebuilt == 1
    assert list((tmp_path / "pcm").iterdir()) == []
    assert fresh.decode("a", wav_file(tmp_path, "a.wav", 0.1)).frames == frames
    assert PcmCache(tmp_path / "pcm").get("a") is not None


def test_leftovers_of_an_older_layout_or_a_crash_are_cleared(tmp_path: Path) -> None:
    root = tmp_path / "pcm"
    root.mkdir()
    (root / "a.pcm").write_bytes(bytes(400))  # no frame count: not trusted
    (root / "b.tmp123.456").write_bytes(bytes(40))
    cache = PcmCache(root)
    assert cache.get("a") is None
    assert list(root.iterdir()) == []
