"""Decoding songs to a PCM cache on disk, and the sinks that play them.

Every song is decoded once, ahead of time, to raw 16-bit little-endian stereo at 44.1 kHz
(``<cache>/<song>.<frames>.pcm``), because decoding a whole MP3 takes about a second (much more
on a Pi). ffmpeg's output is streamed to the file, never held whole in memory. The frame count
in the name is checked against the file's size when the song is first used: a file cut short (a
power cut before the disk wrote it all) is removed and decoded again, never played short.

Sinks take *host* monotonic times: the node converts its own clock with ``Clock.to_host`` before
calling them, because audio hardware (and the virtual DAC) is paced by the host.

- ``VirtualSink`` plays into a JSON-lines log, one line per block of at most 50 ms, stamped with
  the host time at which the block's first frame reaches its virtual DAC. It is the ground truth
  for measuring sync between nodes (see ``nsync_mqtt.sinklog``).
- ``NullSink`` keeps time the same way and outputs nothing.
- ``SimpleaudioSink`` plays on the default ALSA device through simpleaudio.

A sink commits audio to its DAC a few milliseconds ahead. What is committed is played: a stop or
a new play whose host time falls inside an already committed block takes effect at the end of
that block (at most 50 ms later), and a late start begins at the frame its host time dictates.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import wave
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsync_mqtt.drift import DacClock
from nsync_mqtt.errors import ConfigError, NSyncError
from nsync_mqtt.guard import Faults
from nsync_mqtt.messages import HASH_RE
from nsync_mqtt.stream import REANCHOR_S, Feeder, scale_pcm

log = logging.getLogger(__name__)

RATE = 44100
CHANNELS = 2
SAMPLE_WIDTH = 2
FRAME_BYTES = CHANNELS * SAMPLE_WIDTH

BLOCK_S = 0.05
"""Longest block a sink commits (and the virtual sink logs) at once."""
BLOCK_NS = round(BLOCK_S * 1e9)
COMMIT_AHEAD_NS = 5_000_000
"""The virtual sink commits (logs) a block this long before its first frame reaches the DAC."""
LATE_START_MARGIN_NS = 2_000_000
"""After an idle spell the virtual stream resumes this far in the future, so its first block is
committed before it plays."""
SIMPLEAUDIO_LATENCY_S = 0.1
SINK_ERROR_PAUSE_S = 0.05  # the sink thread waits this long after a failed turn
"""simpleaudio opens ALSA "default" on every play; sound reaches the DAC about this much later."""

FinishedCallback = Callable[[str], None]


class DecodeError(NSyncError):
    """A song file could not be decoded to PCM."""


class AudioDeviceError(NSyncError):
    """The audio output (library or device) is not available."""


# --------------------------------------------------------------------------- probing / decoding


def sniff(head: bytes) -> str | None:
    """The audio container a file's first 12 bytes announce, or None: a cheap check that
    refuses obvious non-audio at once (the full decode still decides)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    return None


def _probe_wav(p: Path) -> dict[str, Any] | None:
    """Title, artist and duration of a RIFF/WAVE file, read in Python (no ffprobe process)."""
    info: dict[str, str] = {}
    rate = block_align = data_size = 0
    with p.open("rb") as f:
        head = f.read(12)
        if sniff(head) != "wav":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                break
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(size)
                if len(fmt) >= 14:
                    rate = struct.unpack_from("<I", fmt, 4)[0]
                    block_align = struct.unpack_from("<H", fmt, 12)[0]
            elif cid == b"data":
                data_size = size
                f.seek(size, os.SEEK_CUR)
            elif cid == b"LIST":
                body = f.read(size)
                if body[:4] == b"INFO":
                    pos = 4
                    while pos + 8 <= len(body):
                        sid, ssize = body[pos : pos + 4], struct.unpack_from("<I", body, pos + 4)[0]
                        text = body[pos + 8 : pos + 8 + ssize].split(b"\0", 1)[0]
                        info[sid.decode("latin-1")] = text.decode("utf-8", "replace")
                        pos += 8 + ssize + (ssize & 1)
            else:
                f.seek(size, os.SEEK_CUR)
            if size & 1:
                f.seek(1, os.SEEK_CUR)
    duration = data_size / (rate * block_align) if rate and block_align else None
    return {
        "title": info.get("INAM") or _stem_title(p),
        "artist": info.get("IART") or None,
        "album": info.get("IPRD") or None,
        "duration_s": duration,
    }


def probe(path: Path | str) -> dict[str, Any]:
    """Title, artist and duration of a song file; never raises.

    WAV headers and INFO tags are read in Python; other formats ask ffprobe. Without tags the
    title is the file name's stem (None for a file stored under its hash) and the artist None.
    """
    p = Path(path)
    with contextlib.suppress(OSError, struct.error, ValueError):
        wav = _probe_wav(p)
        if wav is not None:
            return wav
    title: str | None = None
    artist: str | None = None
    album: str | None = None
    duration: float | None = None
    try:
        from pydub.utils import mediainfo

        info = mediainfo(str(p))
        tags = {str(k).lower(): v for k, v in (info.get("TAG") or {}).items()}
        title = tags.get("title") or None
        artist = tags.get("artist") or None
        album = tags.get("album") or None
        if info.get("duration") not in (None, "", "N/A"):
            duration = float(info["duration"])
    except Exception as err:  # ffprobe missing or unreadable file: fall back below
        log.debug("probe %s: %s", p, err)
    if duration is None:
        with contextlib.suppress(Exception), wave.open(str(p), "rb") as w:
            duration = w.getnframes() / w.getframerate()
    return {
        "title": title or _stem_title(p),
        "artist": artist,
        "album": album,
        "duration_s": duration,
    }


def _stem_title(p: Path) -> str | None:
    """A file's name as its title, unless it is the store's hash name (the title then comes
    from the name the song was loaded under, see ``SongStore.set_name``)."""
    return None if HASH_RE.fullmatch(p.stem) else p.stem


class PcmTrack:
    """A decoded song on disk: raw s16le stereo at ``RATE``."""

    def __init__(self, song: str, path: Path) -> None:
        self.song = song
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.frames = os.fstat(self._fd).st_size // FRAME_BYTES
        self.duration_s = self.frames / RATE

    def read(self, frame: int, nframes: int) -> bytes:
        """Frames ``[frame, frame + nframes)``; shorter at the end of the song, empty past it."""
        frame = max(0, frame)
        n = min(nframes, self.frames - frame)
        if n <= 0:
            return b""
        return os.pread(self._fd, n * FRAME_BYTES, frame * FRAME_BYTES)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"PcmTrack({self.song[:12]}, {self.frames} frames)"


def _is_wav(path: Path) -> bool:
    with contextlib.suppress(OSError), path.open("rb") as f:
        head = f.read(12)
        return head[:4] == b"RIFF" and head[8:12] == b"WAVE"
    return False


def too_long(max_seconds: float) -> str:
    minutes = max_seconds / 60
    unit = "minute" if minutes == 1 else "minutes"
    return f"longer than the limit of {minutes:g} {unit} (max_song_minutes)"


def _gist(err: Exception) -> str:
    """An error's message without ffmpeg's banner: its first line, and the last line of any
    output it quotes (where ffmpeg says what was wrong)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} ({lines[-1]})"


DECODE_BLOCK_BYTES = 1 << 20
"""Decoded audio is written to the cache this much at a time."""


def _ffmpeg() -> str | None:
    return shutil.which("ffmpeg")


def _pump(
    read: Callable[[], bytes],
    out: Any,
    limit: int | None,
    convert: Callable[[bytes], bytes] | None = None,
) -> tuple[int, bool]:
    """Copy the blocks ``read()`` returns (converted) to ``out`` until it returns none (then
    True) or more than ``limit`` bytes were written (then False); with the bytes written."""
    written = 0
    while limit is None or written <= limit:
        block = read()
        if not block:
            return written, True
        if convert is not None:
            block = convert(block)
        out.write(block)
        written += len(block)
    return written, False


def _copy_wav(src: Path, out: Any, limit: int | None) -> int | None:
    """Copy a plain PCM WAV already in the cache's layout to ``out`` (the bytes written), or
    None if ``src`` is not one."""
    try:
        w = wave.open(str(src), "rb")  # noqa: SIM115 (closed below; the open alone is guarded)
    except (OSError, EOFError, wave.Error, struct.error, ValueError):
        return None
    with w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (
            CHANNELS,
            SAMPLE_WIDTH,
            RATE,
        ):
            return None
        return _pump(lambda: w.readframes(DECODE_BLOCK_BYTES // FRAME_BYTES), out, limit)[0]


def _decode_to(src: Path, out: Any, limit: int | None) -> int:
    """Write ``src`` as s16le stereo ``RATE`` PCM to the binary file ``out``, a block at a time;
    stop once more than ``limit`` bytes were written. Returns the bytes written."""
    copied = _copy_wav(src, out, limit)
    if copied is not None:
        return copied
    ffmpeg = _ffmpeg()
    if ffmpeg is not None:
        kept = _ffmpeg_to(ffmpeg, src, out, limit, downmix=False)
        if kept is None:  # more than two channels: ffmpeg mixes them down
            out.seek(0)
            out.truncate()
            kept = _ffmpeg_to(ffmpeg, src, out, limit, downmix=True)
        assert kept is not None
        return kept
    if not _is_wav(src):
        raise DecodeError(f"cannot decode {src.name}: ffmpeg is not installed")
    return _pydub_wav_to(src, out)


def _wav_stream_channels(stream: Any) -> int | None:
    """Read a streamed WAV's header up to its ``data`` chunk from ``stream`` (a buffered pipe:
    ``read(n)`` returns fewer than n bytes only at its end); its channel count, or None if the
    stream is not such a WAV (ffmpeg then says why on stderr)."""
    head = stream.read(12)
    if sniff(head) != "wav":
        return None
    channels = None
    while True:
        chunk = stream.read(8)
        if len(chunk) < 8:
            return None
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"data":
            return channels
        if size > 1 << 20:  # a header chunk is small; this is no header
            return None
        body = stream.read(size + (size & 1))
        if cid == b"fmt " and len(body) >= 4:
            channels = struct.unpack_from("<H", body, 2)[0]


def _mono_to_stereo(samples: bytes) -> bytes:
    """s16le mono samples as stereo, each sample in both channels (an odd byte at the end, which
    only a broken stream has, is dropped)."""
    samples = samples[: len(samples) // 2 * 2]
    out = bytearray(2 * len(samples))
    for i in range(2):
        out[i::4] = samples[i::2]
        out[2 + i :: 4] = samples[i::2]
    return bytes(out)


def _ffmpeg_to(ffmpeg: str, src: Path, out: Any, limit: int | None, downmix: bool) -> int | None:
    """Decode with an ffmpeg process whose output is read a block at a time. ffmpeg keeps the
    channels (a mono song is copied to both channels here, at full level, where ffmpeg would
    lower it 3 dB); with more than two channels this returns None unless ``downmix``."""
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(src), "-vn"]
    if limit is not None:  # ffmpeg stops a second past the limit by itself, too
        cmd += ["-t", f"{limit / (RATE * FRAME_BYTES) + 1.0:.3f}"]
    cmd += ["-map_metadata", "-1", "-fflags", "+bitexact", "-acodec", "pcm_s16le"]
    cmd += ["-ar", str(RATE), *(["-ac", str(CHANNELS)] if downmix else []), "-f", "wav", "pipe:1"]
    written = 0
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
        )
        stream = proc.stdout
        assert stream is not None
        channels: int | None = None
        ended = False  # ffmpeg closed its output: it is exiting and is waited for, not killed
        try:
            channels = _wav_stream_channels(stream)
            if channels in (1, 2):  # (a buffered pipe's blocks hold whole samples)
                convert = _mono_to_stereo if channels == 1 else None
                read = functools.partial(stream.read, DECODE_BLOCK_BYTES // 2)
                written, ended = _pump(read, out, limit, convert)
        finally:
            if not ended:  # refused, over the limit, or failed: no need to finish
                proc.kill()
            stream.close()
            code = proc.wait()
        if channels is not None and channels > 2 and not downmix:
            return None
        if channels in (1, 2) and (code == 0 or not ended):  # whole, or over the limit
            return written
        size = errors.seek(0, os.SEEK_END)
        errors.seek(max(0, size - 4096))
        said = errors.read().decode("utf-8", "replace").strip()
        if not said:
            said = f"ffmpeg exited with {code}" if code else f"{channels} channels"
        raise DecodeError(f"cannot decode {src.name}: {_gist(Exception(said))}")


def _pydub_wav_to(src: Path, out: Any) -> int:
    """A WAV in another layout, converted by pydub without ffmpeg (a WAV is uncompressed, so it
    is held in memory at a few times its own size, which the store's limits already bound)."""
    try:
        from pydub import AudioSegment

        seg = AudioSegment.from_file(str(src), format="wav")
        seg = seg.set_frame_rate(RATE).set_channels(CHANNELS).set_sample_width(SAMPLE_WIDTH)
        data = seg.raw_data
    except Exception as err:
        raise DecodeError(f"cannot decode {src.name}: {_gist(err)}") from err
    out.write(data)
    return len(data)


class PcmCache:
    """Decoded songs under ``root``, one ``<song>.<frames>.pcm`` file each (module doc)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._tracks: dict[str, PcmTrack] = {}
        self.rebuilt = 0  # cache files found cut short (or unreadable) and removed
        for old in self.root.glob("*.pcm"):  # an older layout, without the frame count
            if old.name.count(".") == 1:
                old.unlink(missing_ok=True)
        for tmp in self.root.glob("*.tmp*"):  # a decode cut off by a crash
            tmp.unlink(missing_ok=True)

    def _path(self, song: str, frames: int) -> Path:
        return self.root / f"{song}.{frames}.pcm"

    def _find(self, song: str) -> PcmTrack | None:
        """The song's cache file if it is whole; a file of the wrong size is removed."""
        for path in self.root.glob(f"{song}.*.pcm"):
            frames_s = path.name[len(song) + 1 : -len(".pcm")]
            try:
                whole = frames_s.isdigit() and path.stat().st_size == int(frames_s) * FRAME_BYTES
            except OSError:
                whole = False
            if whole:
                return PcmTrack(song, path)
            log.warning("decoded audio of %s… is cut short: decoding it again", song[:12])
            self.rebuilt += 1
            path.unlink(missing_ok=True)
        return None

    def get(self, song: str) -> PcmTrack | None:
        with self._lock:
            track = self._tracks.get(song)
            if track is None:
                track = self._find(song)
                if track is not None:
                    self._tracks[song] = track
            return track

    def decode(self, song: str, src_path: Path | str, max_seconds: float | None = None) -> PcmTrack:
        """Decode ``src_path`` (blocking: seconds for a long MP3); returns a cached song as is.

        The PCM is streamed to disk a block at a time (``DECODE_BLOCK_BYTES``), never held whole
        in memory. With ``max_seconds``, a song that plays longer is refused (DecodeError) having
        written no more than that: a small compressed file cannot fill memory or disk with PCM.
        A disk that fills up while writing leaves nothing behind."""
        cached = self.get(song)
        if cached is not None:
            return cached
        src = Path(src_path)
        limit = None if max_seconds is None else math.ceil(max_seconds * RATE) * FRAME_BYTES
        tmp = self.root / f"{song}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            with tmp.open("wb") as out:
                written = _decode_to(src, out, limit)
            if limit is not None and written > limit:
                assert max_seconds is not None
                raise DecodeError(too_long(max_seconds))
            if written < FRAME_BYTES:
                raise DecodeError(f"cannot decode {src.name}: no audio in it")
            frames = written // FRAME_BYTES
            if written % FRAME_BYTES:
                os.truncate(tmp, frames * FRAME_BYTES)
            os.replace(tmp, self._path(song, frames))
        except OSError as err:  # the disk is full, say
            raise DecodeError(f"cannot write the decoded audio of {src.name}: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)
        track = self.get(song)
        assert track is not None
        return track

    def remove(self, song: str) -> None:
        """Forget ``song``; a sink still holding its track reads on until it lets go."""
        with self._lock:
            self._tracks.pop(song, None)
            for path in self.root.glob(f"{song}.*.pcm"):
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- sinks


class Sink(ABC):
    """Plays songs at host monotonic times."""

    rate: int = RATE
    on_finished: FinishedCallback | None = None
    """Called from the sink's own thread once a song's last frame has been played."""
    faults: Faults = Faults(log)
    """Where the sink thread counts (and logs) the failures it survives."""

    def _survive(self, err: Exception) -> None:
        """One turn of the sink thread failed: count it and go on after a pause (a failure that
        repeats must not spin the thread)."""
        self.faults.record("sink thread", err)
        time.sleep(SINK_ERROR_PAUSE_S)

    @abstractmethod
    def play(
        self,
        song: str,
        track: PcmTrack | None,
        frame: int,
        at_host: float,
        speed: float = 1.0,
        key: object = None,
    ) -> bool:
        """Play ``song`` from ``frame`` when host ``time.monotonic()`` reaches ``at_host``, the
        song advancing ``speed`` seconds per host second (the master's clock seen from here).

        A time in the past starts at the frame that time dictates, ``frame + (now-at_host)·rate``.
        Replaces whatever plays or is scheduled (the current song plays on until then). Without a
        track (not decoded yet) the sink plays silence until ``attach``, then the song from the
        frame time dictates. If ``song`` already plays within ``REANCHOR_S`` of this schedule it
        keeps playing (steered onto it where the sink can): returns True then, else False.
        ``key`` names the schedule for the retimes that follow it.
        """

    def retime(  # noqa: B027
        self, song: str, frame: int, at_host: float, speed: float = 1.0, key: object = None
    ) -> None:
        """The schedule of the song playing, through a newer clock estimate: a sink that can
        correct steers onto it; the others ignore it."""

    def sync_stats(self) -> dict[str, Any]:
        """How far the output is from its schedule (sinks that measure it)."""
        return {}

    @abstractmethod
    def attach(self, song: str, track: PcmTrack) -> None:
        """The decode of ``song`` finished; ignored unless ``song`` is playing or scheduled."""

    @abstractmethod
    def stop(self, at_host: float | None = None) -> None:
        """Stop at host time ``at_host`` (None: now); nothing after it is played."""

    @abstractmethod
    def set_volume(self, volume: int) -> None:
        """Volume 0..100."""

    @abstractmethod
    def position(self) -> tuple[str | None, int | None]:
        """The song and frame playing now; (None, None) when idle."""

    @abstractmethod
    def close(self) -> None:
        """Stop the sink's thread and close its files."""


def _ns(t: float) -> int:
    return round(t * 1e9)


@dataclass(frozen=True)
class _Played:
    song: str
    frame: int
    frames: int
    t_ns: int
    end_ns: int


class _FeederSink(Sink):
    """What the virtual and the stream sink share: a :class:`~nsync_mqtt.stream.Feeder`
    behind a lock, the blocks that went out lately (for ``position``), and shutting down the
    sink's own thread. Subclasses set the attributes in ``__init__``."""

    feeder: Feeder
    _guard: Any  # the lock (or condition) the feeder is used under
    _cond: threading.Condition  # guards _recent; wakes the sink's thread
    _recent: list[_Played]
    _dac_rate: float  # frames per second of host time at the DAC
    _closed: bool
    _thread: threading.Thread
    _log: Any

    def _changed(self) -> None:
        """The schedule changed (the guard is held)."""

    def play(
        self,
        song: str,
        track: PcmTrack | None,
        frame: int,
        at_host: float,
        speed: float = 1.0,
        key: object = None,
    ) -> bool:
        with self._guard:
            kept = self.feeder.play(song, track, frame, _ns(at_host), speed, key)
            self._changed()
            return kept

    def retime(
        self, song: str, frame: int, at_host: float, speed: float = 1.0, key: object = None
    ) -> None:
        with self._guard:
            self.feeder.retime(song, frame, _ns(at_host), speed, key)

    def attach(self, song: str, track: PcmTrack) -> None:
        with self._guard:
            self.feeder.attach(song, track)
            self._changed()

    def stop(self, at_host: float | None = None) -> None:
        with self._guard:
            self.feeder.stop(time.monotonic_ns() if at_host is None else _ns(at_host))
            self._changed()

    def set_volume(self, volume: int) -> None:
        with self._guard:
            self.feeder.set_volume(volume)

    def position(self) -> tuple[str | None, int | None]:
        now = time.monotonic_ns()
        with self._cond:
            for c in reversed(self._recent):
                if c.t_ns <= now < c.end_ns:
                    offset = int((now - c.t_ns) * self._dac_rate / 1e9)
                    return c.song, c.frame + min(offset, c.frames - 1)
        return None, None

    def sync_stats(self) -> dict[str, Any]:
        """The corrector's view: last error, learnt drift, hard resyncs."""
        with self._guard:
            err = self.feeder.last_error_s
            return {
                "error_ms": None if err is None else round(err * 1e3, 4),
                "dac_drift_ppm": round(self.feeder.ctl.drift_ppm, 2),
                "resyncs": self.feeder.ctl.jumps,
            }

    def _remember(self, played: _Played) -> None:
        """A block of a song went out (``_cond`` held)."""
        self._recent = [*self._recent[-7:], played]

    def _end_thread(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        if self._log is not None:
            self._log.close()


class VirtualSink(_FeederSink):
    """A virtual streaming DAC paced by the host clock, logging what it plays (``log_path`` may
    be None).

    Its output stream is open from the sink's creation: output frame ``j`` reaches the DAC at
    ``t0 + j / (rate × (1 + dac_drift_ppm·1e-6))`` host seconds, like a real DAC whose crystal
    is off by ``dac_drift_ppm``. A :class:`~nsync_mqtt.stream.Feeder` decides what each block
    holds and keeps the song on its schedule against that drift, exactly as the streaming sink
    does against a real DAC. Blocks are committed ``COMMIT_AHEAD_NS`` before they play; while
    idle nothing is committed or logged.
    """

    def __init__(
        self, log_path: Path | str | None, dac_drift_ppm: float = 0.0, rate: int = RATE
    ) -> None:
        self.rate = rate
        self.on_finished = None
        self.feeder = Feeder(rate, FRAME_BYTES, SAMPLE_WIDTH)
        self._eff_rate = rate * (1.0 + dac_drift_ppm * 1e-6)
        self._block_frames = max(1, int(rate * BLOCK_S))
        self._log = open(log_path, "a", buffering=1) if log_path is not None else None  # noqa: SIM115
        self._cond = threading.Condition()
        self._guard = self._cond
        self._dac_rate = self._eff_rate
        self._t0 = time.monotonic_ns()
        self._j = 0  # the next output frame to commit
        self._resume = True  # idle: on the next play, skip the frames that went by
        self._finishes: list[tuple[int, str]] = []
        self._recent: list[_Played] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nsync-virtual-sink", daemon=True)
        self._thread.start()

    @property
    def volume(self) -> int:
        return self.feeder.volume

    def _changed(self) -> None:
        self._cond.notify_all()

    def close(self) -> None:
        self._end_thread()

    # -- sink thread

    def _dac_ns(self, j: int) -> int:
        return self._t0 + round(j * 1e9 / self._eff_rate)

    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    due = self._step()
                    if due is None:
                        return
            except Exception as err:
                self._survive(err)
                continue
            for song in due:
                self._notify_finished(song)

    def _step(self) -> list[str] | None:
        """Commit blocks that are due; wait for the next event. None when closed."""
        while not self._closed:
            now = time.monotonic_ns()
            due = [song for t, song in self._finishes if t <= now]
            if due:
                self._finishes = [(t, s) for t, s in self._finishes if t > now]
                return due
            wake = min((t for t, _ in self._finishes), default=None)
            start = self.feeder.sounds_from()
            if start is None:
                self._resume = True
            elif start - now > COMMIT_AHEAD_NS + BLOCK_NS:
                self._resume = True  # nothing to play for a while: commit nothing till then
                start -= COMMIT_AHEAD_NS + BLOCK_NS
                wake = start if wake is None else min(wake, start)
            else:
                if self._resume:  # the stream resumes at the first frame still ahead
                    first = (now + LATE_START_MARGIN_NS - self._t0) * self._eff_rate / 1e9
                    self._j = max(self._j, math.ceil(first))
                    self._resume = False
                t = self._dac_ns(self._j)
                if t - COMMIT_AHEAD_NS <= now:
                    self._commit_block()
                    continue
                wake = t - COMMIT_AHEAD_NS if wake is None else min(wake, t - COMMIT_AHEAD_NS)
            timeout = None if wake is None else max(0.0, (wake - now) / 1e9)
            self._cond.wait(timeout)
        return None

    def _commit_block(self) -> None:
        j, n = self._j, self._block_frames
        out = self.feeder.render(self._dac_ns(j), n, pcm=False)
        self._j = j + n
        for seg in out.segments:
            t_ns, end_ns = self._dac_ns(j + seg.offset), self._dac_ns(j + seg.offset + seg.frames)
            if seg.song is not None:
                self._remember(_Played(seg.song, seg.frame, seg.frames, t_ns, end_ns))
            if self._log is not None:
                line = {
                    "t_ns": t_ns,
                    "song": seg.song,
                    "frame": seg.frame,
                    "frames": seg.frames,
                    "rate": self.rate,
                }
                self._log.write(json.dumps(line, separators=(",", ":")) + "\n")
        for off_ns, song in out.finished:
            # the feeder's times assume the nominal rate within the block; the DAC's are exact
            k = round((off_ns - self._dac_ns(j)) * self.rate / 1e9)
            self._finishes.append((self._dac_ns(j + k), song))

    def _notify_finished(self, song: str) -> None:
        cb = self.on_finished
        if cb is None:
            return
        try:
            cb(song)
        except Exception:
            log.exception("on_finished(%s) failed", song)


class NullSink(VirtualSink):
    """Keeps time like the virtual sink (position, on_finished) and outputs nothing."""

    def __init__(self, dac_drift_ppm: float = 0.0, rate: int = RATE) -> None:
        super().__init__(None, dac_drift_ppm, rate)


# --------------------------------------------------------------------------- simpleaudio


@dataclass
class _Request:
    song: str
    track: PcmTrack | None
    frame: int
    at_host: float
    stop_at: float | None = None


@dataclass
class _Active:
    req: _Request
    play_obj: Any
    frame: int
    start_host: float
    end_host: float
    volume: int


class SimpleaudioSink(Sink):
    """Real audio through simpleaudio on ALSA "default".

    simpleaudio has no timing feedback: each play is started ``SIMPLEAUDIO_LATENCY_S`` before its
    host time. A volume change restarts the song at the frame time dictates.
    """

    POLL_S = 0.02

    def __init__(self, rate: int = RATE) -> None:
        try:
            import simpleaudio
        except Exception as err:
            raise AudioDeviceError(f"simpleaudio is not available: {err}") from err
        try:
            simpleaudio.play_buffer(bytes(FRAME_BYTES * 64), CHANNELS, SAMPLE_WIDTH, rate).stop()
        except Exception as err:
            raise AudioDeviceError(f"no audio output device: {err}") from err
        self._sa = simpleaudio
        self.rate = rate
        self.on_finished = None
        self._volume = 100
        self._cond = threading.Condition()
        self._req: _Request | None = None
        self._active: _Active | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nsync-simpleaudio", daemon=True)
        self._thread.start()

    def play(
        self,
        song: str,
        track: PcmTrack | None,
        frame: int,
        at_host: float,
        speed: float = 1.0,
        key: object = None,
    ) -> bool:
        playing, position = self.position()
        if playing == song and position is not None:
            expected = frame + (time.monotonic() - at_host) * self.rate
            if abs(expected - position) < REANCHOR_S * self.rate:
                return True  # restarting to move a fraction of a millisecond would click
        with self._cond:
            self._req = _Request(song, track, frame, at_host)
            self._cond.notify_all()
        return False

    def attach(self, song: str, track: PcmTrack) -> None:
        with self._cond:
            if self._req is not None and self._req.song == song and self._req.track is None:
                self._req.track = track
                self._cond.notify_all()

    def stop(self, at_host: float | None = None) -> None:
        with self._cond:
            at = time.monotonic() if at_host is None else at_host
            reqs = [self._req, self._active.req if self._active else None]
            for r in reqs:
                if r is not None:
                    r.stop_at = at if r.stop_at is None else min(r.stop_at, at)
            self._cond.notify_all()

    def set_volume(self, volume: int) -> None:
        with self._cond:
            self._volume = max(0, min(100, int(volume)))
            self._cond.notify_all()

    def position(self) -> tuple[str | None, int | None]:
        with self._cond:
            a = self._active
            if a is None:
                return None, None
            return a.req.song, a.frame + max(0, int((time.monotonic() - a.start_host) * self.rate))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=2.0)
        if self._active is not None:
            self._active.play_obj.stop()
            self._active = None

    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    if self._closed:
                        return
                    finished = self._step(time.monotonic())
                    if finished is None:
                        continue
            except Exception as err:  # a device error, an unreadable PCM file
                self._survive(err)
                continue
            if finished and self.on_finished is not None:
                try:
                    self.on_finished(finished)
                except Exception:
                    log.exception("on_finished(%s) failed", finished)

    def _halt(self) -> None:
        if self._active is not None:
            self._active.play_obj.stop()
            self._active = None

    def _step(self, now: float) -> str | None:
        """One turn of the worker (lock held): returns a finished song, "" after waiting, or
        None to go round again at once."""
        req, a = self._req, self._active
        if req is not None and req.stop_at is not None and now >= req.stop_at:
            self._req = None
            return None
        if a is not None:
            if a.req.stop_at is not None and now >= a.req.stop_at:
                self._halt()
                return None
            if now >= a.end_host and not a.play_obj.is_playing():
                self._active = None
                if self._req is a.req:
                    self._req = None
                return a.req.song
            replaced = req is not a.req and (
                req is None or now >= req.at_host - SIMPLEAUDIO_LATENCY_S
            )
            if replaced or (req is a.req and a.volume != self._volume):
                self._halt()
                return None
        elif req is not None and req.track is not None:
            start = max(req.at_host, now + SIMPLEAUDIO_LATENCY_S)
            if now >= start - SIMPLEAUDIO_LATENCY_S:
                frame = req.frame + max(0, round((start - req.at_host) * self.rate))
                pcm = scale_pcm(req.track.read(frame, req.track.frames), self._volume, SAMPLE_WIDTH)
                if not pcm:
                    self._req = None
                    return req.song
                obj = self._sa.play_buffer(pcm, CHANNELS, SAMPLE_WIDTH, self.rate)
                end = start + len(pcm) / FRAME_BYTES / self.rate
                self._active = _Active(req, obj, frame, start, end, self._volume)
                return None
        wakes = [now + self.POLL_S] if a is not None and now >= a.end_host else []
        if a is not None:
            wakes += [a.end_host] + ([a.req.stop_at] if a.req.stop_at is not None else [])
        if req is not None:
            wakes.append(req.at_host - SIMPLEAUDIO_LATENCY_S)
            if req.stop_at is not None:
                wakes.append(req.stop_at)
        future = [w for w in wakes if w > now]
        self._cond.wait(min(future) - now if future else None)
        return ""


# --------------------------------------------------------------------------- the streaming sink

STREAM_BLOCK_FRAMES = 441
"""Frames per callback of the streaming sink (10 ms): its corrector measures this often."""
STREAM_CLOCK_WINDOW = 64
"""Callbacks over which the stream clock's offset to host time is taken (their minimum)."""
STREAM_LATENCY_S = 0.04
"""Output latency asked of the device: well below the master's shortest lead (80 ms), so a
start scheduled that far ahead is rendered in time."""


class StreamSink(_FeederSink):
    """One output stream kept open on an audio device (PortAudio, through ``sounddevice``),
    fed block by block by a :class:`~nsync_mqtt.stream.Feeder`.

    PortAudio tells each callback when its first frame will reach the DAC
    (``outputBufferDacTime``, on the stream's clock, mapped here onto host monotonic time);
    the feeder compares that with the schedule and steers by single frames. Between songs the
    stream plays silence. Volume is applied in the stream. ``log_path`` (optional) gets the
    virtual sink's JSON lines, stamped with the DAC times PortAudio reported.
    """

    def __init__(
        self,
        device: str | int | None = None,
        rate: int = RATE,
        log_path: Path | str | None = None,
        block_frames: int = STREAM_BLOCK_FRAMES,
        latency_s: float = STREAM_LATENCY_S,
    ) -> None:
        try:
            import sounddevice
        except Exception as err:  # the module, or the PortAudio library under it
            raise AudioDeviceError(f"sounddevice (PortAudio) is not available: {err}") from err
        self.rate = rate
        self.on_finished = None
        self.feeder = Feeder(rate, FRAME_BYTES, SAMPLE_WIDTH)
        self.underruns = 0
        self._offsets: deque[float] = deque(maxlen=STREAM_CLOCK_WINDOW)
        self._dac = DacClock(rate, block_frames)
        self._frames_out = 0
        self._guard = threading.Lock()  # the feeder: PortAudio's thread renders under it
        self._cond = threading.Condition()
        self._dac_rate = float(rate)
        self._events: list[tuple[int, str | None, _Played | None]] = []
        self._recent: list[_Played] = []
        self._closed = False
        self._log = open(log_path, "a", buffering=1) if log_path is not None else None  # noqa: SIM115
        self._thread = threading.Thread(target=self._notify, name="nsync-stream", daemon=True)
        self._thread.start()
        try:
            self._stream = sounddevice.RawOutputStream(
                samplerate=rate,
                channels=CHANNELS,
                dtype="int16",
                device=device,
                blocksize=block_frames,
                latency=latency_s,
                callback=self._callback,
            )
            self._stream.start()
        except Exception as err:
            self.close()
            where = "the default device" if device is None else f"device {device!r}"
            raise AudioDeviceError(f"cannot open {where} for output: {err}") from err
        self.device_latency_s = float(self._stream.latency)
        log.info(
            "streaming to %s: %d frames per block, %.1f ms output latency",
            "the default device" if device is None else device,
            block_frames,
            self.device_latency_s * 1e3,
        )

    def sync_stats(self) -> dict[str, Any]:
        stats = super().sync_stats()
        stats["underruns"] = self.underruns
        stats["dac_breaks"] = self._dac.breaks
        return stats

    def close(self) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.stop()
                stream.close()
        self._end_thread()

    # -- PortAudio's thread: render, never block on anything but the feeder's lock

    def _callback(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        now = time.monotonic()
        ahead = time_info.outputBufferDacTime - time_info.currentTime
        if time_info.outputBufferDacTime > 0 and 0 <= ahead < 1.0:
            # PortAudio's stream clock (CLOCK_REALTIME on ALSA) onto host monotonic time: the
            # offset read here is late by however long the callback took to be entered, so
            # the smallest of the recent ones is the truest
            self._offsets.append(now - time_info.currentTime)
            t = time_info.outputBufferDacTime + min(self._offsets)
        else:
            t = now + self.device_latency_s  # a host API without DAC times
        if status.output_underflow:
            self.underruns += 1
        # steer against a line through the reports, not each report (their jitter and wander)
        t_ns = self._dac.add(self._frames_out, round(t * 1e9))
        self._frames_out += frames
        try:
            with self._guard:
                out = self.feeder.render(t_ns, frames, pcm=True)
            assert out.pcm is not None
            outdata[:] = out.pcm
        except Exception as err:  # never let an error stop the stream: play silence
            outdata[:] = bytes(frames * FRAME_BYTES)
            self.faults.record("stream callback", err)
            return
        if out.segments or out.finished:
            with self._cond:
                for seg in out.segments:
                    t = t_ns + round(seg.offset * 1e9 / self.rate)
                    end = t + round(seg.frames * 1e9 / self.rate)
                    played = _Played(seg.song or "", seg.frame, seg.frames, t, end)
                    self._events.append((t, None, played))
                    if seg.song is not None:
                        self._remember(played)
                for t, song in out.finished:
                    self._events.append((t, song, None))
                self._cond.notify_all()

    # -- the notifier thread: log lines, and songs finished once their end reached the DAC

    def _notify(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    now = time.monotonic_ns()
                    logs = [p for _, s, p in self._events if p is not None]
                    due = [s for t, s, p in self._events if p is None and t <= now]
                    if logs or due:
                        self._events = [e for e in self._events if e[2] is None and e[1] not in due]
                        break
                    waits = [t for t, _, p in self._events if p is None]
                    self._cond.wait(None if not waits else max(0.0, (min(waits) - now) / 1e9))
                else:
                    return
            if self._log is not None:
                for p in logs:
                    line = {
                        "t_ns": p.t_ns,
                        "song": p.song or None,
                        "frame": p.frame,
                        "frames": p.frames,
                        "rate": self.rate,
                    }
                    self._log.write(json.dumps(line, separators=(",", ":")) + "\n")
            for song in due:
                if song is not None and self.on_finished is not None:
                    try:
                        self.on_finished(song)
                    except Exception:
                        log.exception("on_finished(%s) failed", song)


def make_sink(
    kind: str, log_path: Path | str | None, dac_drift_ppm: float, device: str | None = None
) -> Sink:
    """The sink named by the ``sink`` setting: auto, stream, simpleaudio, virtual or none.

    ``auto`` is the stream sink wherever PortAudio opens the device, else simpleaudio (which
    cannot correct drift within a song), said in the log."""
    if kind == "auto":
        try:
            return StreamSink(_device(device), log_path=log_path)
        except AudioDeviceError as err:
            log.warning("stream sink unavailable (%s); falling back to simpleaudio", err)
            return SimpleaudioSink()
    if kind == "stream":
        return StreamSink(_device(device), log_path=log_path)
    if kind == "virtual":
        return VirtualSink(log_path, dac_drift_ppm)
    if kind == "none":
        return NullSink(dac_drift_ppm)
    if kind == "simpleaudio":
        return SimpleaudioSink()
    raise ConfigError(
        f"sink: unknown sink {kind!r} (expected auto, stream, simpleaudio, virtual or none)"
    )


def list_output_devices() -> str:
    """The output devices PortAudio offers, one per line (number, name, host API), the default
    marked with ``*``: what ``--audio-device`` takes."""
    try:
        import sounddevice
    except Exception as err:
        raise AudioDeviceError(f"sounddevice (PortAudio) is not available: {err}") from err
    apis = sounddevice.query_hostapis()
    default = sounddevice.default.device[1]
    lines = []
    for i, dev in enumerate(sounddevice.query_devices()):
        if dev["max_output_channels"] > 0:
            mark = "*" if i == default else " "
            api = apis[dev["hostapi"]]["name"]
            lines.append(f"{mark} {i:2d}  {dev['name']}  ({api}, {dev['max_output_channels']} out)")
    return "\n".join(lines) if lines else "no audio output devices"


def _device(device: str | None) -> str | int | None:
    """A PortAudio device: its index (digits) or (part of) its name; None: the default."""
    if device is None or device == "":
        return None
    return int(device) if device.isdigit() else device
