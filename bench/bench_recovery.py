"""Speaker recovery: a speaker is killed (-9) during playback and restarted; once it hears the
master it pulls the master's state (playlist, slot, position) and then the songs it lacks.

    .venv/bin/python bench/bench_recovery.py --broker mosquitto --runs 10

Two cases, `--runs` times each: the speaker comes back with its data dir (state only), and with
an empty data dir (state plus a missing 9.1 MB song, the paper's largest Table I size). The
node reports its own timings in its retained state (`recovery`): `state_ms` from asking the
master (`sync_req`) to holding its state, `songs_ms` from asking to holding every playlist song.
Writes bench/results/recovery-<broker>.json.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from common import arg_parser, broker, conditions, percentile, record, table

from nsync_mqtt.testing import NodeCluster, NodeSpec, tone_file, wait_for

BIG_SONG_BYTES = 9_100_000


def recover(cluster: NodeCluster, node: str, wipe: bool) -> dict[str, Any]:
    proc = cluster.procs.pop(node)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if wipe:
        shutil.rmtree(cluster.workdir / node)
    with cluster.watch() as w:
        cluster.start_node(node)

        def done() -> dict[str, Any] | None:
            rec = (w.node_states(live_only=True).get(node) or {}).get("recovery")
            return rec if rec and "songs_ms" in rec else None

        result: dict[str, Any] = wait_for(done, 60, f"{node} to recover")
    cluster.wait_ready()
    return result


def run(kind: str, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, broker(kind, Path(tmp)) as b:
        specs = [NodeSpec(f"n{i + 1}", clock_offset=500.0 * i) for i in range(3)]
        cluster = NodeCluster(b.url, Path(tmp) / "c", specs, cluster="recovery")
        cluster.start()
        try:
            cluster.wait_ready()
            client = cluster.client(timeout=10.0)
            seconds = BIG_SONG_BYTES / (44100 * 4)
            big = tone_file(Path(tmp), "Big", seconds, 330.0)
            assert client.enqueue_song(big)["success"]
            assert client.play()["success"]
            rows = []
            for i in range(runs):
                for wipe in (False, True):
                    master = client.status()["state"]["master"]
                    speaker = next(n for n in cluster.specs if n != master)
                    rec = recover(cluster, speaker, wipe)
                    rows.append({"run": i + 1, "node": speaker, "wiped": wipe, **rec})
                    print(f"run {i + 1} {'empty dir' if wipe else 'with data'}: {rec}", flush=True)
                    time.sleep(0.5)
            client.close()
        finally:
            cluster.stop()
    out: dict[str, Any] = {"rows": rows}
    for wipe in (False, True):
        key = "empty" if wipe else "with_data"
        st = [r["state_ms"] for r in rows if r["wiped"] == wipe]
        so = [r["songs_ms"] for r in rows if r["wiped"] == wipe]
        out[key] = {
            "state_ms_p50": percentile(st, 50),
            "state_ms_max": max(st),
            "songs_ms_p50": percentile(so, 50),
            "songs_ms_max": max(so),
        }
    return out


def main() -> None:
    ap = arg_parser(__doc__ or "")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    before = conditions()
    result = run(args.broker, args.runs)
    rows = []
    for key, label in (("with_data", "restart, data kept"), ("empty", "restart, empty dir")):
        r = result[key]
        rows.append(
            [label, r["state_ms_p50"], r["state_ms_max"], r["songs_ms_p50"], r["songs_ms_max"]]
        )
    headers = ["case", "state p50 ms", "state max ms", "songs p50 ms", "songs max ms"]
    print(table(headers, rows))
    print("target: state recovery <= 100 ms p50 (the paper's figure)")
    path = record("recovery", args.broker, before, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
