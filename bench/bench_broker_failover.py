"""Broker failover: three nodes share the ordered broker list [amqtt (first), Mosquitto]; the
first broker is killed (-9) during playback, and the time until a client on the second broker
gets a successful replicated command is measured; then the first broker is restarted and the
time until the cluster serves there again.

    .venv/bin/python bench/bench_broker_failover.py --runs 10

Writes bench/results/broker-failover-mixed.json.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    BrokerProcess,
    arg_parser,
    conditions,
    percentile,
    record,
    table,
)

from nsync_lab.testing import NodeCluster, NodeSpec, tone_file
from nsync_mqtt.client import NSyncClient

LIMIT_S = 30.0


def time_to_command(url: str, cluster: str, t0: float, level: int) -> float | None:
    """Seconds from t0 until a replicated command through `url` succeeds."""
    while time.monotonic() - t0 < LIMIT_S:
        try:
            with contextlib.closing(NSyncClient(url, cluster, timeout=0.5).connect()) as c:
                while time.monotonic() - t0 < LIMIT_S:
                    if c.request("volume", {"volume": level}, timeout=0.2)["success"]:
                        return time.monotonic() - t0
        except Exception:
            time.sleep(0.05)
    return None


def run(runs: int) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first = BrokerProcess("amqtt", Path(tmp)).start()
        second = BrokerProcess("mosquitto", Path(tmp)).start()
        specs = [NodeSpec(f"n{i}", extra=["--broker", second.url]) for i in (1, 2, 3)]
        cluster = NodeCluster(first.url, Path(tmp) / "c", specs, cluster="failover")
        cluster.start()
        try:
            cluster.wait_ready()
            with contextlib.closing(cluster.client(timeout=10.0)) as client:
                assert client.enqueue_song(tone_file(Path(tmp), "On", 60.0, 440.0))["success"]
                assert client.play()["success"]
            for i in range(runs):
                time.sleep(1.0)
                t0 = time.monotonic()
                first.kill()
                over = time_to_command(second.url, "failover", t0, 30 + i % 2)
                time.sleep(1.0)
                t1 = time.monotonic()
                first.start()
                back = time_to_command(first.url, "failover", t1, 40 + i % 2)
                rows.append({"run": i + 1, "failover_s": over, "back_s": back})
                print(f"run {i + 1}: failover {over} s, back on the first broker {back} s")
        finally:
            cluster.stop()
            first.stop()
            second.stop()
    over = [r["failover_s"] for r in rows if r["failover_s"] is not None]
    back = [r["back_s"] for r in rows if r["back_s"] is not None]
    return {
        "rows": rows,
        "failover_p50_s": percentile(over, 50),
        "failover_max_s": max(over),
        "back_p50_s": percentile(back, 50),
        "back_max_s": max(back),
        "failed": sum(1 for r in rows if None in (r["failover_s"], r["back_s"])),
    }


def main() -> None:
    ap = arg_parser(__doc__ or "")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    before = conditions()
    r = run(args.runs)
    print(
        table(
            ["runs", "failover p50 s", "failover max s", "back p50 s", "back max s", "failed"],
            [
                [
                    args.runs,
                    r["failover_p50_s"],
                    r["failover_max_s"],
                    r["back_p50_s"],
                    r["back_max_s"],
                    r["failed"],
                ]
            ],
        )
    )
    print("target: <= 3 s from killing the current broker to the next successful command")
    path = record("broker-failover", "mixed", before, r)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
