"""Command latency against the playlist's length: a command's cost must not grow with it.

    .venv/bin/python bench/bench_playlist_len.py --broker mosquitto --runs 200

Three nodes (virtual sinks) on one broker. The playlist grows to each length in turn (20,
1,000, 5,000 entries, by enqueueing one short tone again and again) and at each length the
client times ``--runs`` rounds of play, pause and volume (each round: play, pause, volume N)
and of enqueue, from publishing the command to the master's reply (sent once f+1 nodes saved
the operation). Before the operation log, every operation rewrote the node's whole state file
and republished the whole playlist: p50 was 3.2 ms at 20 entries, 5.7 ms at 1,000 and 13.7 ms
at 5,000 (Mosquitto).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import common
from common import summary_ms, table

from nsync_lab.testing import NodeCluster
from nsync_mqtt.tones import make_tone_wav

LENGTHS = (20, 1000, 5000)
CLIENT_TIMEOUT_S = 10.0


def _ok(reply: dict[str, Any], what: str) -> dict[str, Any]:
    if not reply.get("success"):
        raise RuntimeError(f"{what} failed: {reply.get('msg')}")
    return reply


def measure(url: str, workdir: Path, runs: int) -> dict[str, Any]:
    cluster = NodeCluster.of(url, workdir / "n3", n=3, cluster=f"p{uuid.uuid4().hex[:8]}")
    out: dict[str, Any] = {}
    cluster.start()
    try:
        cluster.wait_ready(60.0)
        client = cluster.client(timeout=CLIENT_TIMEOUT_S)
        try:
            path = workdir / "tone.wav"
            path.write_bytes(make_tone_wav(30.0, 440.0, "playlist length"))
            song = _ok(client.load_song(path), "load")["params"]["song"]
            length = 0
            for target in LENGTHS:
                while length < target:
                    _ok(client.enqueue_song(song), "enqueue")
                    length += 1
                samples: dict[str, list[float]] = {"play": [], "pause": [], "volume": []}
                samples["enqueue"] = []
                for i in range(runs):
                    for verb, params in (
                        ("play", None),
                        ("pause", None),
                        ("volume", {"arg": 30 + i % 40}),
                    ):
                        t = time.perf_counter()
                        _ok(client.request(verb, params), verb)
                        samples[verb].append(time.perf_counter() - t)
                for _ in range(runs):
                    t = time.perf_counter()
                    _ok(client.enqueue_song(song), "enqueue")
                    samples["enqueue"].append(time.perf_counter() - t)
                    length += 1
                out[str(target)] = {v: summary_ms(s) for v, s in samples.items()}
                print(
                    f"{target} entries: "
                    + ", ".join(f"{v} p50 {out[str(target)][v]['p50_ms']:.2f} ms" for v in samples)
                )
        finally:
            client.close()
    finally:
        cluster.stop()
    return out


def main() -> None:
    ap = common.arg_parser(__doc__ or "")
    ap.set_defaults(broker="mosquitto")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    before = common.conditions()
    with tempfile.TemporaryDirectory() as tmp, common.broker(args.broker, Path(tmp)) as b:
        result = measure(b.url, Path(tmp), args.runs)
        version = b.version()
    rows = []
    base = result[str(LENGTHS[0])]
    for n in LENGTHS:
        r = result[str(n)]
        rows.append(
            [n]
            + [f"{r[v]['p50_ms']:.2f} / {r[v]['p99_ms']:.2f}" for v in ("play", "pause", "volume")]
            + [f"{r['enqueue']['p50_ms']:.2f} / {r['enqueue']['p99_ms']:.2f}"]
            + [f"{r['play']['p50_ms'] / base['play']['p50_ms']:.2f}x"]
        )
    print(
        table(["entries", "play p50/p99 ms", "pause", "volume", "enqueue", "play p50 vs 20"], rows)
    )
    path = common.record(
        "playlist-len", args.broker, before, {"broker": version, "runs": args.runs, **result}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
