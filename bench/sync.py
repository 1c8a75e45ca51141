"""Sync between nodes over a long run, at their (virtual) DACs, with drifting clocks and DACs.

    .venv/bin/python bench/sync.py --nodes 3 --minutes 10 --jitter-ms 0
    .venv/bin/python bench/sync.py --nodes 5 --minutes 10 --jitter-ms 20

Real node processes on loopback, each with a virtual sink (the ground truth: every block's host
time at its DAC, design.md §2.3) and its own simulated clock and DAC: clock offsets up to ±1 h,
clock drift and DAC drift up to ±100 ppm (the first two nodes get the extremes, -100 and +100,
the others random values in between). With ``--jitter-ms J`` every node reaches the broker
through a fault proxy adding a uniform 0..J ms to each chunk, both ways. A client loads songs,
plays, and every 15-30 s does one of: seek, pause (then play 1-3 s later), forward, backward,
volume.

Skew is measured every 10 ms of song: for each frame the first node played, the spread (latest
minus earliest) of the host times at which the nodes played that same frame (the same play,
matched by time). Reported: p50/p99/max over the whole run, over the first second after each
start (play, seek, forward, backward, a song change) and over the rest; each node's
deviation from the nodes' median; the nodes' CPU use; a PNG (and SVG) of each node's deviation
against time. Writes bench/results/sync-<N>n-<J>ms-<broker>.json/.png/.svg.
"""

from __future__ import annotations

import bisect
import math
import random
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import common
from bench_clock import StateRecorder
from common import broker, conditions, cpu_seconds, percentile, record, table

from nsync_lab.faultproxy import FaultProxy
from nsync_lab.testing import NodeCluster, NodeSpec, ok
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.sinklog import Block, read_log
from nsync_mqtt.tones import make_tone_mp3

RATE = 44100
SAMPLE_FRAMES = 441  # a skew sample every 10 ms of song
MATCH_NS = 200_000_000  # the same frame played by two nodes within this is the same play
AFTER_START_S = 1.0
SONG_S = 200.0
SONGS = 4
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def specs(n: int, rng: random.Random, proxies: list[FaultProxy] | None) -> list[NodeSpec]:
    clock = [-100.0, 100.0] + [rng.uniform(-100, 100) for _ in range(n - 2)]
    dac = [100.0, -100.0] + [rng.uniform(-100, 100) for _ in range(n - 2)]
    out = []
    for i in range(n):
        url = f"mqtt://127.0.0.1:{proxies[i].port}" if proxies else None
        out.append(
            NodeSpec(
                f"n{i + 1}",
                clock_offset=rng.uniform(-3600, 3600),
                clock_drift_ppm=round(clock[i], 1),
                dac_drift_ppm=round(dac[i], 1),
                broker_url=url,
            )
        )
    return out


# --------------------------------------------------------------------------- the workload


def workload(client: NSyncClient, seconds: float, rng: random.Random) -> list[tuple[float, str]]:
    """Random commands until ``seconds`` have passed; (host time, what) of each."""
    events: list[tuple[float, str]] = []
    end = time.monotonic() + seconds
    while True:
        wait = rng.uniform(15, 30)
        if time.monotonic() + wait > end:
            time.sleep(max(0.0, end - time.monotonic()))
            return events
        time.sleep(wait)
        what = rng.choice(["seek", "pause", "forward", "backward", "volume"])
        if what == "seek":
            reply = client.seek(round(rng.uniform(0, SONG_S - 30), 1))
        elif what == "pause":
            reply = client.pause()
            time.sleep(rng.uniform(1, 3))
            events.append((time.monotonic(), "pause"))
            reply = client.play()
            what = "play"
        elif what == "forward":
            reply = client.forward()
        elif what == "backward":
            reply = client.backward()
        else:
            reply = client.volume(rng.randint(20, 100))
        events.append((time.monotonic(), what if reply.get("success") else f"{what} (refused)"))


# --------------------------------------------------------------------------- analysis


class Played:
    """One node's blocks of each song, in time order, to find a frame near a time."""

    def __init__(self, blocks: list[Block]) -> None:
        self.by_song: dict[str, list[Block]] = defaultdict(list)
        for b in blocks:
            if b.song is not None:
                self.by_song[b.song].append(b)
        self.times = {s: [b.t_ns for b in bs] for s, bs in self.by_song.items()}

    def time_of(self, song: str, k: int, near_ns: int) -> int | None:
        blocks, times = self.by_song.get(song, []), self.times.get(song, [])
        i = bisect.bisect_left(times, near_ns - MATCH_NS)
        while i < len(blocks) and times[i] <= near_ns + MATCH_NS:
            if blocks[i].contains(song, k):
                return blocks[i].time_of(k)
            i += 1
        return None


def skew_samples(logs: dict[str, list[Block]]) -> list[tuple[int, dict[str, int]]]:
    """(time, {node: time it played the frame}) every SAMPLE_FRAMES frames of the first node's
    playback that at least two nodes played."""
    nodes = list(logs)
    played = {n: Played(logs[n]) for n in nodes}
    ref = nodes[0]
    out = []
    for b in logs[ref]:
        if b.song is None:
            continue
        first = -(-b.frame // SAMPLE_FRAMES) * SAMPLE_FRAMES
        for k in range(first, b.end_frame, SAMPLE_FRAMES):
            t_ref = b.time_of(k)
            times = {ref: t_ref}
            for n in nodes[1:]:
                t = played[n].time_of(b.song, k, t_ref)
                if t is not None:
                    times[n] = t
            if len(times) >= 2:
                out.append((t_ref, times))
    return out


def summary_us(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50) / 1e6, 4),
        "p99_ms": round(percentile(values, 99) / 1e6, 4),
        "max_ms": round(max(values) / 1e6, 4),
    }


def starts_of(logs: dict[str, list[Block]], events: list[tuple[float, str]]) -> list[int]:
    """Host ns of every start: each command, and each new play run in the first node's log."""
    starts = [round(t * 1e9) for t, _ in events]
    prev: Block | None = None
    for b in next(iter(logs.values())):
        if b.song is None:
            continue
        gap = prev is None or prev.song != b.song or b.frame != prev.end_frame
        if gap or b.t_ns - prev.time_of(prev.end_frame) > 1_000_000:  # type: ignore[union-attr]
            starts.append(b.t_ns)
        prev = b
    return sorted(starts)


SETTLED_S = 240.0
"""From this long after the first play on, the clock estimates have their full long lines."""


def analyse(logs: dict[str, list[Block]], events: list[tuple[float, str]]) -> dict[str, Any]:
    samples = skew_samples(logs)
    starts = starts_of(logs, events)
    settled_ns = round((events[0][0] + SETTLED_S) * 1e9) if events else 0
    spread_all, spread_after, spread_steady, spread_settled = [], [], [], []
    deviation: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for t, times in samples:
        spread = max(times.values()) - min(times.values())
        spread_all.append(spread)
        if t >= settled_ns:
            spread_settled.append(spread)
        i = bisect.bisect_right(starts, t) - 1
        after = i >= 0 and t - starts[i] < AFTER_START_S * 1e9
        (spread_after if after else spread_steady).append(spread)
        mid = statistics.median(times.values())
        for n, tn in times.items():
            deviation[n].append((t, tn - mid))
    per_node = {n: summary_us([abs(d) for _, d in devs]) for n, devs in sorted(deviation.items())}
    return {
        "samples": len(samples),
        "starts": len(starts),
        "skew": summary_us(spread_all),
        "skew_after_start": summary_us(spread_after),
        "skew_steady": summary_us(spread_steady),
        f"skew_from_{SETTLED_S:.0f}_s": summary_us(spread_settled),
        "deviation_from_median": per_node,
        "_series": deviation,
    }


def clock_errors(
    updates: list[tuple[float, str, dict[str, Any]]],
    node_specs: list[NodeSpec],
    since: float = -math.inf,
) -> dict[str, Any]:
    """Each follower's published offset estimate against the truth at the time it arrived
    (host time ``since`` on)."""
    clocks = {s.id: (s.clock_offset, s.clock_drift_ppm * 1e-6) for s in node_specs}
    per_node: dict[str, list[float]] = defaultdict(list)
    for host_t, node, doc in updates:
        if host_t < since:
            continue
        master = doc.get("master")
        est = (doc.get("clock") or {}).get("offset_s")
        if doc.get("role") != "follower" or master not in clocks or est is None:
            continue
        (mo, mr), (no, nr) = clocks[master], clocks[node]
        truth = (host_t * (1 + mr) + mo) - (host_t * (1 + nr) + no)
        per_node[node].append(abs(est - truth) * 1e9)
    return {n: summary_us(v) for n, v in sorted(per_node.items())}


# --------------------------------------------------------------------------- plots


def plot(series: dict[str, list[tuple[int, float]]], t0: int, path: Path, title: str) -> None:
    """Each node's deviation from the median (ms) against time (s), as PNG and SVG."""
    w, h, pad = 1000, 360, 40
    t_end = max((t for s in series.values() for t, _ in s), default=t0 + 1) - t0
    worst = max((abs(d) for s in series.values() for _, d in s), default=0.0) / 1e6
    y_max = max(0.1, min(5.0, worst * 1.1))  # ms, clipped at ±5 ms

    def xy(t: int, d: float) -> tuple[int, int]:
        x = pad + int((t - t0) / t_end * (w - 2 * pad))
        y = h // 2 - int(max(-y_max, min(y_max, d / 1e6)) / y_max * (h // 2 - pad))
        return x, y

    pixels: dict[tuple[int, int], tuple[int, int, int]] = {}
    for x in range(pad, w - pad):
        pixels[(x, h // 2)] = (160, 160, 160)
        for frac in (-1, -0.5, 0.5, 1):
            pixels[(x, h // 2 - int(frac * (h // 2 - pad)))] = (225, 225, 225)
    for s in range(0, int(t_end / 1e9) + 1, 60):
        x = pad + int(s * 1e9 / t_end * (w - 2 * pad))
        for y in range(h - pad, h - pad + 6):
            pixels[(x, y)] = (0, 0, 0)
    polylines = []
    for i, (node, devs) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        pts = [xy(t, d) for t, d in devs]
        for x, y in pts:
            pixels[(x, y)] = colour
        step = max(1, len(pts) // 4000)
        polylines.append((node, colour, pts[::step]))
    common.write_png_rgb(path.with_suffix(".png"), w, h, pixels)
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{pad}" y="16">{title}</text>',
        f'<text x="4" y="{h // 2 + 4}">0</text>',
        f'<text x="4" y="{pad + 4}">+{y_max:.2g} ms</text>',
        f'<text x="4" y="{h - pad + 4}">-{y_max:.2g} ms</text>',
        f'<text x="{w - pad - 120}" y="{h - 8}">time, ticks every 60 s</text>',
    ]
    for i, (node, colour, pts) in enumerate(polylines):
        rgb = "rgb({},{},{})".format(*colour)
        coords = " ".join(f"{x},{y}" for x, y in pts)
        svg.append(f'<polyline fill="none" stroke="{rgb}" stroke-width="1" points="{coords}"/>')
        svg.append(f'<text x="{w - pad - 60}" y="{30 + 14 * i}" fill="{rgb}">{node}</text>')
    svg.append("</svg>\n")
    path.with_suffix(".svg").write_text("\n".join(svg))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = common.arg_parser(__doc__ or "")
    ap.set_defaults(broker="mosquitto")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", metavar="DIR", help="copy the nodes' logs and sink logs here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    before = conditions()
    name = f"sync-{args.nodes}n-{args.jitter_ms:g}ms"
    with (
        tempfile.TemporaryDirectory(prefix="nsync-sync-") as tmp,
        broker(args.broker, Path(tmp)) as b,
    ):
        proxies: list[FaultProxy] = []
        try:
            if args.jitter_ms > 0:
                for i in range(args.nodes):
                    p = FaultProxy("127.0.0.1", b.port).start()
                    p.jitter(args.jitter_ms / 1000, seed=args.seed * 100 + i)
                    proxies.append(p)
            node_specs = specs(args.nodes, rng, proxies)
            cluster = NodeCluster(b.url, Path(tmp) / "cluster", node_specs)
            with cluster:
                cluster.wait_ready(timeout_s=60)
                recorder = StateRecorder(b.url, cluster.cluster)
                with cluster.client(timeout=30.0) as client:
                    for i in range(SONGS):
                        path = Path(tmp) / f"song{i}.mp3"  # 3 MB, not a 35 MB WAV
                        path.write_bytes(make_tone_mp3(SONG_S, 330.0 + 110 * i, f"Song {i}"))
                        song = str(ok(client.load_song(path))["params"]["song"])
                        ok(client.enqueue_song(song))
                    cpu0 = {n: cpu_seconds(p.pid) for n, p in cluster.procs.items()}
                    t_start = time.monotonic()
                    ok(client.play())
                    events = [(time.monotonic(), "play")]
                    events += workload(client, args.minutes * 60, rng)
                    wall = time.monotonic() - t_start
                    cpu = {
                        n: round(100 * (cpu_seconds(p.pid) - cpu0[n]) / wall, 2)
                        for n, p in cluster.procs.items()
                    }
                    ok(client.stop())
                    time.sleep(0.5)
                updates = recorder.snapshot()
                recorder.close()
                logs = {n: read_log(cluster.sink_log(n)) for n in cluster.specs}
                if args.keep:
                    keep = Path(args.keep)
                    keep.mkdir(parents=True, exist_ok=True)
                    for n in cluster.specs:
                        shutil.copy(cluster.node_log(n), keep)
                        shutil.copy(cluster.sink_log(n), keep)
        finally:
            for p in proxies:
                p.stop()
    result = analyse(logs, events)
    result["clock_error"] = clock_errors(updates, node_specs)
    settled = events[0][0] + SETTLED_S
    result[f"clock_error_from_{SETTLED_S:.0f}_s"] = clock_errors(updates, node_specs, settled)
    series = result.pop("_series")
    t0 = round(t_start * 1e9)
    out = Path(__file__).parent / "results" / f"{name}-{args.broker}"
    plot(series, t0, out, f"{name}: each node's deviation from the nodes' median")
    result.update(
        nodes=[
            {
                "id": s.id,
                "clock_offset_s": round(s.clock_offset, 3),
                "clock_drift_ppm": s.clock_drift_ppm,
                "dac_drift_ppm": s.dac_drift_ppm,
            }
            for s in node_specs
        ],
        jitter_ms=args.jitter_ms,
        minutes=args.minutes,
        events=[(round(t - t_start, 2), what) for t, what in events],
        cpu_percent_of_one_core=cpu,
    )
    path = record(name, args.broker, before, result)
    rows = [
        [part, s.get("n", 0), s.get("p50_ms", "-"), s.get("p99_ms", "-"), s.get("max_ms", "-")]
        for part, s in (
            ("all", result["skew"]),
            ("first second after a start", result["skew_after_start"]),
            ("steady", result["skew_steady"]),
            (f"from {SETTLED_S:.0f} s on", result[f"skew_from_{SETTLED_S:.0f}_s"]),
        )
    ]
    print(table(["skew", "samples", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"clock estimate error: {result['clock_error']}")
    print(f"  from {SETTLED_S:.0f} s on: {result[f'clock_error_from_{SETTLED_S:.0f}_s']}")
    print(f"cpu % of one core: {cpu}")
    print(f"wrote {path} and {out}.png/.svg")


if __name__ == "__main__":
    main()
