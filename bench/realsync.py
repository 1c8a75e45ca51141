"""Sync through a real audio stack: two players into the left and right channels of one
PulseAudio null sink, the sink's monitor recorded, the channels compared click by click.

    .venv/bin/python bench/realsync.py --seconds 60              # NSync's stream sink
    .venv/bin/python bench/realsync.py --seconds 60 --snapcast   # and Snapcast, same run

A private PulseAudio daemon (nsync_lab.pulse) runs a null sink, paced by the host clock, with a
remap sink for each of its channels. NSync: a 3-node cluster on Mosquitto; n1 plays through
its stream sink (PortAudio -> ALSA ``default`` -> PulseAudio) into the left channel, n2 into
the right, n3 on a virtual sink. A click track (one single-sample click every 100 ms) is
loaded and played; the monitor recording gives, for every click, how much later the right
channel played it than the left (to the sample, 22.7 µs): the true skew of two nodes, through
the whole audio stack, over time. Also measured: command->schedule (from ``nsync play`` to the
instant the master scheduled the first frame, exact from the virtual sink) and
command->sound (to the first click in the recording, mapped onto host time through the
recording's own timeline: a few ms uncertain).

``--snapcast``: snapserver (pipe source, pcm codec, 44.1 kHz) with two snapclients, one per
channel through the same ALSA -> PulseAudio path, fed the same clicks in real time; measured the
same way. Writes bench/results/realsync-<broker>.json.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
from common import broker, conditions, percentile, record, table

from nsync_lab.pulse import RATE, PulseAudio, click_offsets, click_track, clicks, stop_recording
from nsync_lab.testing import NodeCluster, NodeSpec, free_port, ok, wait_port
from nsync_mqtt.sinklog import read_log

STREAM_SETTLE_S = 10.0
CLICK_EVERY_S = 0.1
FIRST_CLICK_S = CLICK_EVERY_S / 2  # click_track puts the first click half a period in


class Recording:
    """parecord of the null sink's monitor, with its timeline: (host time, bytes written)
    samples of the growing file map recorded frames onto host time."""

    def __init__(self, pulse: PulseAudio, path: Path) -> None:
        self.path = path
        self.proc = pulse.record(path)
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        last = -1
        while not self._stop.is_set():
            size = self.path.stat().st_size if self.path.exists() else 0
            if size != last:
                self.timeline.append((time.monotonic(), size))
                last = size
            time.sleep(0.001)

    def stop(self) -> bytes:
        stop_recording(self.proc)
        self._stop.set()
        self._thread.join()
        return self.path.read_bytes()

    def host_time(self, frame: int) -> float | None:
        """When ``frame`` was captured: the first moment the file held it, minus nothing (an
        upper bound, within parecord's 10 ms latency)."""
        need = (frame + 1) * 4
        for t, size in self.timeline:
            if size >= need:
                return t
        return None


def skew_summary(offsets: list[tuple[int, int]]) -> dict[str, Any]:
    lags_ms = [lag * 1e3 / RATE for _, lag in offsets]
    if not lags_ms:
        return {"clicks": 0}
    mags = [abs(x) for x in lags_ms]
    return {
        "clicks": len(lags_ms),
        "mean_ms": round(sum(lags_ms) / len(lags_ms), 4),
        "p50_ms": round(percentile(mags, 50), 4),
        "p99_ms": round(percentile(mags, 99), 4),
        "max_ms": round(max(mags), 4),
        "distinct_ms": sorted({round(x, 4) for x in lags_ms})[:12],
    }


def run_nsync(pulse: PulseAudio, tmp: Path, seconds: float, broker_kind: str) -> dict[str, Any]:
    song_path = click_track(tmp / "clicks.wav", seconds + 5, CLICK_EVERY_S, "Clicks")
    with broker(broker_kind, tmp) as b:
        specs = [
            NodeSpec("n1", sink="stream", env=pulse.env("nsync_left")),
            NodeSpec("n2", sink="stream", env=pulse.env("nsync_right")),
            NodeSpec("n3", sink="virtual"),
        ]
        cluster = NodeCluster(b.url, tmp / "cluster", specs)
        opened = time.monotonic()
        with cluster, cluster.watch() as watcher:
            cluster.wait_ready(timeout_s=60)
            with cluster.client(timeout=30.0) as client:
                song = str(ok(client.load_song(song_path))["params"]["song"])
                ok(client.enqueue_song(song))
                # every node decodes the song, and its stream settles (PulseAudio adapts its
                # latency in the first seconds after a stream opens)
                time.sleep(max(1.0, opened + STREAM_SETTLE_S - time.monotonic()))
                rec = Recording(pulse, tmp / "nsync.raw")
                time.sleep(0.5)
                t_cmd = time.monotonic()
                ok(client.play())
                time.sleep(seconds)
                # each stream's own view: underruns, DAC-line breaks, hard resyncs, learnt drift
                sinks = {n: st.get("sink") for n, st in watcher.node_states().items()}
                ok(client.stop())
                time.sleep(0.3)
                raw = rec.stop()
        virtual = [blk for blk in read_log(cluster.sink_log("n3")) if blk.song == song]
        streams = {n: [blk for blk in read_log(cluster.sink_log(n)) if blk.song == song]
                   for n in ("n1", "n2")}  # fmt: skip
    result: dict[str, Any] = {"skew": skew_summary(click_offsets(raw))}
    result["offsets_over_time"] = _over_time(click_offsets(raw))
    result["sinks"] = sinks
    result["first_clicks_ms"] = [round(lag * 1e3 / RATE, 4) for _, lag in click_offsets(raw)[:50]]
    if virtual:
        first = virtual[0]
        scheduled = first.t_ns - round(first.frame * 1e9 / RATE)
        result["command_to_schedule_ms"] = round((scheduled / 1e9 - t_cmd) * 1e3, 2)
        for n, blocks in streams.items():
            if blocks:  # where the stream sink believed its first frame reached the DAC
                b0 = blocks[0]
                believed = b0.t_ns - round(b0.frame * 1e9 / RATE) - scheduled
                result[f"{n}_believed_vs_schedule_ms"] = round(believed / 1e6, 3)
        heard = clicks(raw, 0)
        t_heard = rec.host_time(heard[0]) if heard else None
        if t_heard is not None:
            result["command_to_sound_ms"] = round((t_heard - FIRST_CLICK_S - t_cmd) * 1e3, 1)
    return result


def _over_time(offsets: list[tuple[int, int]], window_s: float = 5.0) -> list[dict[str, Any]]:
    """Mean and spread of the offset in windows of the recording: is it held over the song?"""
    out = []
    if not offsets:
        return out
    w = int(window_s * RATE)
    start = offsets[0][0]
    bucket: list[int] = []
    for frame, lag in offsets:
        if frame - start >= w and bucket:
            out.append(_bucket(start, bucket))
            start, bucket = frame, []
        bucket.append(lag)
    out.append(_bucket(start, bucket))
    return out


def _bucket(start: int, lags: list[int]) -> dict[str, Any]:
    ms = [x * 1e3 / RATE for x in lags]
    return {
        "t_s": round(start / RATE, 1),
        "mean_ms": round(sum(ms) / len(ms), 4),
        "max_abs_ms": round(max(abs(x) for x in ms), 4),
    }


def run_snapcast(pulse: PulseAudio, tmp: Path, seconds: float) -> dict[str, Any]:
    fifo = tmp / "snapfifo"
    os.mkfifo(fifo)
    port = free_port()
    (tmp / "snapserver.conf").write_text("")
    log = (tmp / "snapcast.log").open("ab")
    server = subprocess.Popen(
        [
            "snapserver",
            "-c",
            str(tmp / "snapserver.conf"),
            "--stream.source",
            f"pipe://{fifo}?name=default&sampleformat=44100:16:2&mode=read",
            "--stream.sampleformat",
            "44100:16:2",
            "--stream.codec",
            "pcm",
            "--stream.port",
            str(port),
            "--stream.bind_to_address",
            "127.0.0.1",
            "--tcp.enabled",
            "false",
            "--http.enabled",
            "false",
            "--server.datadir",
            str(tmp),
            "--logging.sink",
            "stderr",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    clients: list[subprocess.Popen[bytes]] = []
    writer: threading.Thread | None = None
    try:
        wait_port(port, 10.0, server)
        for side in ("left", "right"):
            cmd = ["snapclient", "-h", "127.0.0.1", "-p", str(port), "--hostID", side,
                   "--player", "alsa", "--logsink", "stderr"]  # fmt: skip
            clients.append(
                subprocess.Popen(
                    cmd,
                    env={**os.environ, **pulse.env(f"nsync_{side}")},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(2.0)  # both clients connected and synced
        pcm = _click_pcm(tmp, seconds + 2)
        rec = Recording(pulse, tmp / "snapcast.raw")
        time.sleep(0.5)
        t_start = time.monotonic()
        writer = threading.Thread(target=_feed, args=(fifo, pcm), daemon=True)
        writer.start()
        time.sleep(seconds + 1.5)  # Snapcast's 1 s buffer, then the measured span
        raw = rec.stop()
    finally:
        for c in clients:
            c.terminate()
        server.terminate()
        for p in (*clients, server):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
        if writer is not None:
            writer.join(timeout=5)
    result: dict[str, Any] = {"skew": skew_summary(click_offsets(raw))}
    result["offsets_over_time"] = _over_time(click_offsets(raw))
    heard = clicks(raw, 0)
    t_heard = rec.host_time(heard[0]) if heard else None
    if t_heard is not None:
        result["feed_to_sound_ms"] = round((t_heard - FIRST_CLICK_S - t_start) * 1e3, 1)
    return result


def _click_pcm(tmp: Path, seconds: float) -> bytes:
    import wave

    path = click_track(tmp / "snap-clicks.wav", seconds, CLICK_EVERY_S)
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes())


def _feed(fifo: Path, pcm: bytes) -> None:
    """Write ``pcm`` into the fifo at real time, 20 ms at a time."""
    step = int(0.02 * RATE) * 4
    with contextlib.suppress(BrokenPipeError), fifo.open("wb") as f:
        t0 = time.monotonic()
        for i, off in enumerate(range(0, len(pcm), step)):
            f.write(pcm[off : off + step])
            f.flush()
            time.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))


def main() -> None:
    ap = common.arg_parser(__doc__ or "")
    ap.set_defaults(broker="mosquitto")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--snapcast", action="store_true", help="measure Snapcast the same way")
    args = ap.parse_args()
    before = conditions()
    result: dict[str, Any] = {"seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="nsync-realsync-") as d:
        tmp = Path(d)
        with PulseAudio(tmp) as pulse:
            keep = pulse.record(tmp / "keepalive.raw")  # an idle null sink stalls starts
            try:
                result["nsync"] = run_nsync(pulse, tmp, args.seconds, args.broker)
                if args.snapcast:
                    result["snapcast"] = run_snapcast(pulse, tmp, args.seconds)
            finally:
                stop_recording(keep)
    path = record("realsync", args.broker, before, result)
    rows = [
        [who, r["skew"].get("clicks", 0), r["skew"].get("p50_ms", "-"),
         r["skew"].get("p99_ms", "-"), r["skew"].get("max_ms", "-"),
         r.get("command_to_sound_ms", r.get("feed_to_sound_ms", "-"))]
        for who, r in result.items() if isinstance(r, dict)
    ]  # fmt: skip
    print(table(["player", "clicks", "p50 ms", "p99 ms", "max ms", "to sound ms"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
