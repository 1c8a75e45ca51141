"""A real audio stack without a sound card, and what it played.

:class:`PulseAudio` runs a private PulseAudio daemon (its own runtime directory, so it never
touches a user's) with a null sink paced by the host clock (``nsync_null``) and one remap sink
per channel of it (``nsync_left``, ``nsync_right``): a process started with
``env(sink="nsync_left")`` plays, through ALSA's ``pulse``/``default`` device, into the left
channel only. ``record`` captures the null sink's monitor: the ground truth of what played.

:func:`click_track` makes a song of single-sample clicks; :func:`click_offsets` finds each
click in the left and the right channel of a recording and returns how far apart the two
channels played it (the peak of their cross-correlation, which for a click track is exactly the
distance between matching clicks, to the sample).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

from nsync_mqtt.tones import tagged_wav

RATE = 44100
START_TIMEOUT_S = 10.0
CLICK = 20000


def available() -> bool:
    """PulseAudio and its tools are installed."""
    return all(shutil.which(t) for t in ("pulseaudio", "pactl", "parecord"))


class PulseAudio:
    """A private PulseAudio daemon with ``nsync_null`` and its left/right remap sinks."""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir) / "pulse-runtime"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(workdir) / "pulseaudio.log"

    @property
    def socket(self) -> Path:
        return self.dir / "pulse" / "native"

    def env(self, sink: str | None = None) -> dict[str, str]:
        """Environment for a client of this daemon (``sink``: where its streams go)."""
        env = {"XDG_RUNTIME_DIR": str(self.dir), "PULSE_SERVER": f"unix:{self.socket}"}
        if sink is not None:
            env["PULSE_SINK"] = sink
        return env

    def _run(self, *args: str) -> str:
        out = subprocess.run(
            list(args),
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def start(self) -> PulseAudio:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "pulseaudio",
                    "-n",
                    "--daemonize=no",
                    "--exit-idle-time=-1",
                    "--disallow-exit",
                    "-L",
                    "module-null-sink sink_name=nsync_null rate=44100",
                    "-L",
                    f"module-native-protocol-unix auth-anonymous=1 socket={self.socket}",
                ],
                env={**os.environ, **self.env()},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pulseaudio did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        for side, channel in (("left", "front-left"), ("right", "front-right")):
            self._run(
                "pactl",
                "load-module",
                "module-remap-sink",
                f"sink_name=nsync_{side}",
                "master=nsync_null",
                "channels=1",
                f"master_channel_map={channel}",
                "channel_map=mono",
                "remix=no",
            )
        self._run("pactl", "set-default-sink", "nsync_null")
        return self

    def record(self, path: Path) -> subprocess.Popen[bytes]:
        """Start recording the null sink's monitor (raw s16le stereo 44.1 kHz) into ``path``.
        A low-latency recording also keeps the idle sink from stalling starts."""
        return subprocess.Popen(
            [
                "parecord",
                "--device=nsync_null.monitor",
                "--latency-msec=10",
                "--raw",
                "--format=s16le",
                f"--rate={RATE}",
                "--channels=2",
                str(path),
            ],
            env={**os.environ, **self.env()},
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> PulseAudio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_recording(rec: subprocess.Popen[bytes]) -> None:
    if rec.poll() is None:
        rec.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            rec.wait(5)
    if rec.poll() is None:
        rec.kill()
        rec.wait()


def click_track(path: Path, seconds: float, every_s: float = 0.1, title: str = "Clicks") -> Path:
    """A WAV of single-sample clicks every ``every_s``, tagged with ``title``."""
    frames = int(seconds * RATE)
    period = int(every_s * RATE)
    data = bytearray(frames * 4)
    for k in range(period // 2, frames, period):
        struct.pack_into("<hh", data, k * 4, CLICK, CLICK)
    path.write_bytes(tagged_wav(bytes(data), title))
    return path


def clicks(raw: bytes, channel: int, threshold: int = CLICK // 4) -> list[int]:
    """Frame indices of the clicks in one channel of a raw s16le stereo recording."""
    samples = memoryview(raw)[: len(raw) - len(raw) % 4].cast("h")
    found: list[int] = []
    last = -RATE
    for i in range(channel, len(samples), 2):
        if abs(samples[i]) >= threshold and i // 2 - last > 100:
            last = i // 2
            found.append(last)
    return found


def click_offsets(raw: bytes, max_lag_frames: int = 2205) -> list[tuple[int, int]]:
    """``(frame, right - left)`` for every click heard in both channels within
    ``max_lag_frames`` of each other: how much later the right channel played it."""
    left, right = clicks(raw, 0), clicks(raw, 1)
    out = []
    j = 0
    for k in left:
        while j < len(right) and right[j] < k - max_lag_frames:
            j += 1
        if j < len(right) and abs(right[j] - k) <= max_lag_frames:
            out.append((k, right[j] - k))
    return out
