"""What a node costs in CPU: a 3-node cluster idle, then playing, each node's share of one core.

    .venv/bin/python bench/bench_cpu.py --seconds 60

Mosquitto on loopback; n1 and n2 play through the stream sink into a private PulseAudio
daemon's null sink (nsync_lab.pulse; PortAudio's callback runs every 10 ms), n3 through the
virtual sink. CPU is user + system time from /proc/<pid>/stat over each phase, as a percentage
of one core of this machine (a Raspberry Pi's core is several times slower). Also the
resident memory at the end. Writes bench/results/cpu-<broker>.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import broker, conditions, cpu_seconds, record, table

from nsync_lab.pulse import PulseAudio, stop_recording
from nsync_lab.testing import NodeCluster, NodeSpec, ok, tone_file


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def phase(cluster: NodeCluster, seconds: float) -> dict[str, float]:
    pids = {n: p.pid for n, p in cluster.procs.items()}
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {n: round(100 * (cpu_seconds(pid) - before[n]) / wall, 2) for n, pid in pids.items()}


def main() -> None:
    ap = common.arg_parser(__doc__ or "")
    ap.set_defaults(broker="mosquitto")
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    before = conditions()
    result: dict[str, Any] = {"seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="nsync-cpu-") as d:
        tmp = Path(d)
        with PulseAudio(tmp) as pulse, broker(args.broker, tmp) as b:
            keep = pulse.record(tmp / "keepalive.raw")
            try:
                specs = [
                    NodeSpec("n1", sink="stream", env=pulse.env("nsync_left")),
                    NodeSpec("n2", sink="stream", env=pulse.env("nsync_right")),
                    NodeSpec("n3", sink="virtual"),
                ]
                cluster = NodeCluster(b.url, tmp / "cluster", specs)
                with cluster:
                    states = cluster.wait_ready(timeout_s=60)
                    result["roles"] = {n: s.get("role") for n, s in states.items()}
                    with cluster.client(timeout=30.0) as client:
                        song = tone_file(tmp, "Long", args.seconds + 30, 440.0)
                        ok(client.enqueue_song(song))
                        time.sleep(5)  # settled after the load and the decode
                        result["idle"] = phase(cluster, args.seconds)
                        ok(client.play())
                        result["playing"] = phase(cluster, args.seconds)
                        ok(client.stop())
                    result["rss_mb"] = {n: rss_mb(p.pid) for n, p in cluster.procs.items()}
            finally:
                stop_recording(keep)
    path = record("cpu", args.broker, before, result)
    rows = [
        [n, result["roles"].get(n), result["idle"][n], result["playing"][n], result["rss_mb"][n]]
        for n in sorted(result["idle"])
    ]
    print(table(["node", "role", "idle % core", "playing % core", "RSS MB"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
