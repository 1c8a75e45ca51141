"""Demo songs: sine tones with a click on every whole second, so sync between rooms is audible.

``make_tone_wav`` needs nothing but the standard library; the WAV carries its title and artist in
a RIFF ``LIST/INFO`` chunk, which ffprobe reports as tags. ``make_tone_mp3`` needs ffmpeg.
"""

from __future__ import annotations

import io
import math
import shutil
import struct
import subprocess
import sys
import wave
from array import array

from nsync_mqtt.errors import NSyncError

RATE = 44100
TONE_AMPLITUDE = 0.3
CLICK_AMPLITUDE = 0.9
CLICK_S = 0.004
CLICK_HZ = 3000.0


def tone_samples(seconds: float, freq_hz: float, rate: int = RATE) -> array:
    """Mono 16-bit samples: the tone, replaced by a short loud click at each whole second."""
    n = round(seconds * rate)
    w = 2.0 * math.pi * freq_hz / rate
    wc = 2.0 * math.pi * CLICK_HZ / rate
    click_n = max(1, round(CLICK_S * rate))
    tone = 32767 * TONE_AMPLITUDE
    click = 32767 * CLICK_AMPLITUDE
    out = array("h", [int(tone * math.sin(w * i)) for i in range(n)])
    for start in range(0, n, rate):
        for j in range(min(click_n, n - start)):
            out[start + j] = int(click * math.sin(wc * j))
    return out


def _info_chunk(title: str, artist: str) -> bytes:
    def sub(tag: bytes, text: str) -> bytes:
        data = text.encode("utf-8") + b"\0"
        if len(data) % 2:
            data += b"\0"
        return tag + struct.pack("<I", len(data)) + data

    body = b"INFO" + sub(b"INAM", title) + sub(b"IART", artist)
    return b"LIST" + struct.pack("<I", len(body)) + body


def make_tone_wav(
    seconds: float, freq_hz: float, title: str, artist: str = "NSync demo", rate: int = RATE
) -> bytes:
    """A 16-bit stereo WAV of a sine tone with a click every second, tagged title/artist."""
    mono = tone_samples(seconds, freq_hz, rate)
    stereo = array("h", bytes(len(mono) * 4))
    stereo[0::2] = mono
    stereo[1::2] = mono
    if sys.byteorder == "big":  # WAV samples are little endian
        stereo.byteswap()
    return tagged_wav(stereo.tobytes(), title, artist, rate)


def tagged_wav(pcm: bytes, title: str, artist: str = "NSync demo", rate: int = RATE) -> bytes:
    """A WAV of 16-bit little-endian stereo ``pcm``, tagged title/artist."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    riff = buf.getvalue() + _info_chunk(title, artist)
    return riff[:4] + struct.pack("<I", len(riff) - 8) + riff[8:]


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


def make_tone_mp3(
    seconds: float, freq_hz: float, title: str, artist: str = "NSync demo", rate: int = RATE
) -> bytes:
    """The same tone as an MP3 with ID3 title/artist tags (needs ffmpeg on PATH)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise NSyncError("ffmpeg is not installed: cannot encode MP3")
    wav = make_tone_wav(seconds, freq_hz, title, artist, rate)
    cmd = [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-f", "wav", "-i", "pipe:0",
        "-map_metadata", "-1", "-metadata", f"title={title}", "-metadata", f"artist={artist}",
        "-id3v2_version", "3", "-codec:a", "libmp3lame", "-b:a", "128k", "-f", "mp3", "pipe:1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, input=wav, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        msg = proc.stderr.decode("utf-8", "replace").strip()
        raise NSyncError(f"ffmpeg failed to encode MP3: {msg}")
    return proc.stdout
