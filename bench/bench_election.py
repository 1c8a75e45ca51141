"""Master election under playback: kill -9 the master N times while a song plays; time from the
kill to the first successful replicated client command, and the playback gap each surviving
node's virtual DAC shows across the election.

    .venv/bin/python bench/bench_election.py --broker mosquitto --kills 20

After each kill the dead node is restarted (same data dir) and the cluster is left to settle
before the next kill. The client probes with a replicated command (`volume`, alternating values)
and a short timeout, so a command sent while there is no master is retried at once. Writes
bench/results/election-<broker>.json and a timeline picture (reachable master 1/0 over time,
like the NSync paper's Figure 2) as bench/results/election-<broker>.png (and .svg).
"""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    arg_parser,
    broker,
    conditions,
    percentile,
    record,
    step_plot_png,
    table,
)

from nsync_lab.testing import NodeCluster, NodeSpec, tone_file
from nsync_mqtt import sinklog
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.replication import sha224_file

SONG_S = 45.0
PROBE_TIMEOUT_S = 0.05


def first_success(client: NSyncClient, level: int, limit_s: float) -> float | None:
    """Seconds until a replicated command succeeds (None if not within limit_s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if client.request("volume", {"volume": level}, timeout=PROBE_TIMEOUT_S)["success"]:
            return time.monotonic()
    return None


def svg_timeline(spans: list[tuple[float, float]], t_end: float, path: Path) -> None:
    """Reachable master (1) or not (0) over the run: a step line, one dip per election."""
    w, h, pad = 900, 160, 30
    sx = (w - 2 * pad) / max(t_end, 1e-9)

    def x(t: float) -> float:
        return pad + t * sx

    y1, y0 = pad, h - pad
    pts = [f"{x(0):.1f},{y1}"]
    for a, b in spans:
        pts += [f"{x(a):.1f},{y1}", f"{x(a):.1f},{y0}", f"{x(b):.1f},{y0}", f"{x(b):.1f},{y1}"]
    pts.append(f"{x(t_end):.1f},{y1}")
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">'
        f'<rect width="{w}" height="{h}" fill="white"/>'
        f'<polyline points="{" ".join(pts)}" fill="none" stroke="black" stroke-width="1.5"/>'
        f'<text x="4" y="{y1 + 4}">1</text><text x="4" y="{y0 + 4}">0</text>'
        f'<text x="{pad}" y="{h - 6}">reachable master over {t_end:.0f} s; '
        f"{len(spans)} master kills</text></svg>\n"
    )


def run(kind: str, kills: int, nodes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, broker(kind, Path(tmp)) as b:
        specs = [NodeSpec(f"n{i + 1}", clock_offset=1000.0 * i) for i in range(nodes)]
        cluster = NodeCluster(b.url, Path(tmp) / "c", specs, cluster="election")
        cluster.start()
        try:
            cluster.wait_ready()
            client = cluster.client(timeout=3.0)
            song = tone_file(Path(tmp), "Election", SONG_S, 440.0)
            song_hash = sha224_file(song)
            assert client.enqueue_song(song)["success"]
            assert client.play()["success"]
            t_start = time.monotonic()
            rows: list[dict[str, Any]] = []
            spans: list[tuple[float, float]] = []
            for i in range(kills):
                st = client.status()["state"]
                if st["position"] > SONG_S - 15:
                    client.seek(1.0)
                time.sleep(1.0)
                master = client.status()["state"]["master"]
                t_kill = time.monotonic()
                proc = cluster.procs.pop(master)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                t_ok = first_success(client, 40 + i % 2, 10.0)
                survivors = [n for n in cluster.specs if n != master]
                gaps = {}
                for n in survivors:
                    blocks = [
                        blk
                        for blk in sinklog.read_log(cluster.sink_log(n))
                        if blk.song == song_hash
                        and (t_kill - 2) * 1e9 <= blk.t_ns <= ((t_ok or t_kill) + 1) * 1e9
                    ]
                    gaps[n] = max((g for _, g in sinklog.gaps_ns(blocks)), default=0) / 1e6
                elapsed = None if t_ok is None else t_ok - t_kill
                rows.append({"kill": i + 1, "master": master, "s": elapsed, "gap_ms": gaps})
                spans.append((t_kill - t_start, (t_ok or t_kill + 10) - t_start))
                print(
                    f"kill {i + 1:2d}: master {master} -> command ok after "
                    f"{'-' if elapsed is None else f'{elapsed:.3f} s'}, "
                    f"largest survivor gap {max(gaps.values()):.1f} ms",
                    flush=True,
                )
                cluster.start_node(master)
                cluster.wait_ready()
            t_end = time.monotonic() - t_start
            client.close()
        finally:
            cluster.stop()
    times = [r["s"] for r in rows if r["s"] is not None]
    gaps_all = [g for r in rows for g in r["gap_ms"].values()]
    summary = {
        "kills": kills,
        "nodes": nodes,
        "failed_to_recover": sum(1 for r in rows if r["s"] is None),
        "p50_s": percentile(times, 50) if times else None,
        "p99_s": percentile(times, 99) if times else None,
        "max_s": max(times) if times else None,
        "max_gap_ms": max(gaps_all) if gaps_all else None,
        "gap_free_survivor_windows": sum(1 for g in gaps_all if g == 0),
        "survivor_windows": len(gaps_all),
    }
    return {"rows": rows, "summary": summary, "spans": spans, "t_end": t_end}


def main() -> None:
    ap = arg_parser(__doc__ or "")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    before = conditions()
    result = run(args.broker, args.kills, args.nodes)
    s = result["summary"]
    print(
        table(
            ["broker", "nodes", "kills", "p50 s", "p99 s", "max s", "max gap ms", "gap-free"],
            [
                [
                    args.broker,
                    s["nodes"],
                    s["kills"],
                    f"{s['p50_s']:.3f}",
                    f"{s['p99_s']:.3f}",
                    f"{s['max_s']:.3f}",
                    f"{s['max_gap_ms']:.1f}",
                    f"{s['gap_free_survivor_windows']}/{s['survivor_windows']}",
                ]
            ],
        )
    )
    print("target: p99 <= 1.0 s from kill to a successful command, playback gap 0 (paper 0.75-4 s)")
    svg = Path(__file__).parent / "results" / f"election-{args.broker}.svg"
    svg_timeline(result["spans"], result["t_end"], svg)
    png = svg.with_suffix(".png")
    step_plot_png(png, result["spans"], result["t_end"])
    path = record("election", args.broker, before, result)
    print(f"wrote {path}, {svg} and {png}")


if __name__ == "__main__":
    main()
