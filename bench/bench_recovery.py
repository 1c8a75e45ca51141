"""Speaker recovery: a speaker is killed (-9) during playback and restarted; once it hears the
master it pulls the master's state (playlist, slot, position) and then the songs it lacks.

    .venv/bin/python bench/bench_recovery.py --broker mosquitto --runs 10

Two cases, `--runs` times each: the speaker comes back with its data dir (state only), and with
an empty data dir (state plus a missing 9.1 MB song, the paper's largest Table I size). The
node reports its own timings in its retained state (`recovery`): `state_ms` from asking the
master (`sync_req`) to holding its state, `songs_ms` from asking to holding every playlist song.

Meanwhile a second client sends a replicated command (`volume`) every 2 ms: the latency of
those sent while a recovering node is pulling songs from the master, against those sent while
no node recovers, shows whether the background transfer slows client commands.
Writes bench/results/recovery-<broker>.json.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import arg_parser, broker, conditions, percentile, record, table

from nsync_lab.testing import NodeCluster, NodeSpec, tone_file, wait_for
from nsync_mqtt.client import NSyncClient

BIG_SONG_BYTES = 9_100_000
COMMAND_INTERVAL_S = 0.002
CLOCK_OFFSET_S = 500.0  # node i's clock runs i * this ahead of the host's


class Commander:
    """A client sending `volume` every COMMAND_INTERVAL_S in a thread: (sent, latency, ok)."""

    def __init__(self, url: str, cluster: str) -> None:
        self.client = NSyncClient(url, cluster, timeout=5.0).connect()
        self.samples: list[tuple[float, float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        level = 40
        while not self._stop.is_set():
            level = 41 if level == 40 else 40
            t0 = time.monotonic()
            reply = self.client.volume(level)
            self.samples.append((t0, time.monotonic() - t0, bool(reply["success"])))
            self._stop.wait(COMMAND_INTERVAL_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()


def recover(cluster: NodeCluster, node: str, wipe: bool) -> dict[str, Any]:
    """Kill and restart ``node``; its recovery timings, with ``window``: when (host monotonic
    seconds) it asked the master and when it held every song."""
    cluster.stop_node(node, signal.SIGKILL)
    if wipe:
        shutil.rmtree(cluster.workdir / node)
    with cluster.watch() as w:
        cluster.start_node(node)

        def done() -> dict[str, Any] | None:
            rec = (w.node_states(live_only=True).get(node) or {}).get("recovery")
            return rec if rec and "songs_ms" in rec else None

        result: dict[str, Any] = wait_for(done, 60, f"{node} to recover")
    cluster.wait_ready()
    start = result["why_at"] - CLOCK_OFFSET_S * (int(node[1:]) - 1)  # onto the host's clock
    result["window"] = (start, start + result["songs_ms"] / 1e3)
    return result


def latencies(
    samples: list[tuple[float, float, bool]], windows: list[tuple[float, float]]
) -> dict[str, dict[str, float]]:
    """Latencies (ms) of the commands in flight during a song transfer, and of the others."""
    during: list[float] = []
    outside: list[float] = []
    for t0, took, success in samples:
        if not success:
            continue
        overlaps = any(t0 < hi and t0 + took > lo for lo, hi in windows)
        (during if overlaps else outside).append(took * 1e3)
    out = {}
    for key, vals in (("during_transfer", during), ("other", outside)):
        if vals:
            out[key] = {
                "n": len(vals),
                "p50_ms": percentile(vals, 50),
                "p99_ms": percentile(vals, 99),
                "max_ms": max(vals),
            }
    return out


def run(kind: str, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, broker(kind, Path(tmp)) as b:
        specs = [NodeSpec(f"n{i + 1}", clock_offset=CLOCK_OFFSET_S * i) for i in range(3)]
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
            commander = Commander(b.url, "recovery")
            try:
                time.sleep(1.0)  # a baseline before the first recovery
                for i in range(runs):
                    for wipe in (False, True):
                        master = client.status()["state"]["master"]
                        speaker = next(n for n in cluster.specs if n != master)
                        rec = recover(cluster, speaker, wipe)
                        rows.append({"run": i + 1, "node": speaker, "wiped": wipe, **rec})
                        what = "empty dir" if wipe else "with data"
                        print(f"run {i + 1} {what}: {rec}", flush=True)
                        time.sleep(0.5)
            finally:
                commander.close()
            client.close()
        finally:
            cluster.stop()
    windows = [r.pop("window") for r in rows if r["wiped"]]
    out: dict[str, Any] = {"rows": rows, "commands": latencies(commander.samples, windows)}
    out["commands"]["failed"] = sum(1 for s in commander.samples if not s[2])
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
    cmd = result["commands"]
    rows = [
        [label, c["n"], c["p50_ms"], c["p99_ms"], c["max_ms"]]
        for key, label in (
            ("other", "no song transfer"),
            ("during_transfer", "during a 9.1 MB song transfer"),
        )
        if (c := cmd.get(key))
    ]
    print(table(["volume commands", "n", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"failed commands: {cmd['failed']}")
    path = record("recovery", args.broker, before, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
