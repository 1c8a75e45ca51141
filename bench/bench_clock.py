"""Clock estimation: 3 nodes with the paper's Table III clock offsets; 100 consecutive offset
estimates of each non-master node, their mean and standard deviation, and those of their error.

    .venv/bin/python bench/bench_clock.py --broker mosquitto --samples 100

Every node publishes its retained state (``nsync/<cluster>/node/<id>/state``) about once a second
(NODE_STATE_PERIOD_S); its ``clock.offset_s`` is the node's current estimate of
``master clock - node clock`` (from the ping/pong exchanges, 10 a second). All processes read
the same host monotonic clock, shifted by ``--clock-offset`` and with no drift, so the true value
is exactly ``offset(master) - offset(node)``, whichever node the election made master. One sample
is one state update (a new retained payload, not the one replayed on subscribing) from a
calibrated follower of the master seen at the start, in the same term.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import common
from common import table

from nsync_lab.testing import NodeCluster, NodeSpec
from nsync_mqtt.bus import new_paho_client, parse_broker_url

# The paper's Table III offsets, in seconds.
SPECS = [
    NodeSpec("n1", clock_offset=1_661_961.653e-3),
    NodeSpec("n2", clock_offset=-491.842e-3),
    NodeSpec("n3", clock_offset=0.0),
]
TARGET_STD_MS = 0.5
PAPER_STD_MS = (6.5, 8.6)
CLUSTER_READY_S = 60.0
SECONDS_PER_SAMPLE_MAX = 2.0


class StateRecorder:
    """Collects the node-state updates of one cluster, in arrival order."""

    def __init__(self, url: str, cluster: str) -> None:
        self.updates: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._c = new_paho_client(f"bench-clock-{uuid.uuid4().hex[:8]}", parse_broker_url(url))
        topic = f"nsync/{cluster}/node/+/state"
        self._c.on_connect = lambda client, u, f, rc, p: client.subscribe(topic, 1)
        self._c.on_subscribe = lambda *a: self._subscribed.set()
        self._c.on_message = self._on_message
        b = parse_broker_url(url)
        self._c.connect_async(b.host, b.port, keepalive=30)
        self._c.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("could not subscribe to the node states")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.retain or not msg.payload:
            return  # replayed on subscribing: not a fresh estimate
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, dict):
            with self._lock:
                self.updates.append((time.monotonic(), msg.topic.split("/")[-2], doc))

    def snapshot(self) -> list[tuple[float, str, dict[str, Any]]]:
        with self._lock:
            return list(self.updates)

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


def samples_of(
    updates: list[tuple[float, str, dict[str, Any]]], node: str, master: str, term: int
) -> list[float]:
    """The offset estimates (seconds) of ``node`` while it follows ``master`` in ``term``."""
    out = []
    for _, n, doc in updates:
        clock = doc.get("clock") or {}
        if (
            n == node
            and doc.get("role") == "follower"
            and doc.get("master") == master
            and doc.get("term") == term
            and clock.get("calibrated")
            and isinstance(clock.get("offset_s"), (int, float))
        ):
            out.append(float(clock["offset_s"]))
    return out


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {
        "mean_ms": statistics.fmean(ms),
        "std_ms": statistics.stdev(ms) if len(ms) > 1 else float("nan"),
        "max_abs_ms": max(abs(v) for v in ms),
    }


def main() -> int:
    p = common.arg_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100, help="estimates per node (default 100)")
    args = p.parse_args()
    started = time.monotonic()
    offsets = {s.id: s.clock_offset for s in SPECS}
    with tempfile.TemporaryDirectory(prefix="nsync-bench-") as tmp:
        workdir = Path(tmp)
        with common.broker(args.broker, workdir) as b:
            version = b.version()
            before = common.conditions()
            name = f"b{uuid.uuid4().hex[:8]}"
            cluster = NodeCluster(b.url, workdir / "cluster", SPECS, cluster=name)
            cluster.start()
            try:
                states = cluster.wait_ready(CLUSTER_READY_S)
                master = next(n for n, s in states.items() if s.get("role") == "master")
                term = int(states[master]["term"])
                followers = [n for n in offsets if n != master]
                rec = StateRecorder(b.url, name)
                try:
                    deadline = time.monotonic() + 30 + args.samples * SECONDS_PER_SAMPLE_MAX
                    while time.monotonic() < deadline:
                        got = [len(samples_of(rec.snapshot(), n, master, term)) for n in followers]
                        if min(got) >= args.samples:
                            break
                        time.sleep(0.5)
                    updates = rec.snapshot()
                finally:
                    rec.close()
            finally:
                codes = cluster.stop()
            after = common.conditions()
    results = []
    rows = []
    for node in followers:
        est = samples_of(updates, node, master, term)[: args.samples]
        truth = offsets[master] - offsets[node]
        err = [e - truth for e in est]
        s_est, s_err = stats_ms(est), stats_ms(err)
        ok = len(est) == args.samples and s_err["std_ms"] <= TARGET_STD_MS
        results.append(
            {
                "node": node,
                "clock_offset_ms": offsets[node] * 1e3,
                "true_offset_ms": truth * 1e3,
                "samples": len(est),
                "estimate": s_est,
                "error": s_err,
                "estimates_ms": [e * 1e3 for e in est],
                "target_met": ok,
            }
        )
        rows.append(
            [
                node,
                f"{offsets[node] * 1e3:+,.3f}",
                f"{truth * 1e3:+,.3f}",
                len(est),
                f"{s_est['mean_ms']:+,.4f}",
                f"{s_est['std_ms']:.4f}",
                f"{s_err['mean_ms']:+.4f}",
                f"{s_err['std_ms']:.4f}",
                f"{s_err['max_abs_ms']:.4f}",
                "yes" if ok else "NO",
            ]
        )
    headers = ["node", "clock offset ms", "true master-node ms", "n", "mean estimate ms",
               "std estimate ms", "mean error ms", "std error ms", "max |error| ms",
               "target met"]  # fmt: skip
    print(
        f"clock offset estimation, {args.broker} ({version}), master {master} "
        f"(offset {offsets[master] * 1e3:+,.3f} ms), term {term}"
    )
    print(f"machine load before {before}, after {after}")
    print(table(headers, rows))
    print(
        f"target: std <= {TARGET_STD_MS} ms; paper {PAPER_STD_MS[0]}-{PAPER_STD_MS[1]} ms "
        "(std over 100 heartbeats)"
    )
    doc = {
        "bench": "clock",
        "command": f".venv/bin/python bench/bench_clock.py --broker {args.broker} "
        f"--samples {args.samples}",
        "date": common.now_iso(),
        "broker": args.broker,
        "broker_version": version,
        "machine": common.machine(),
        "conditions": {"before": before, "after": after},
        "master": master,
        "term": term,
        "clock_offsets_ms": {n: o * 1e3 for n, o in offsets.items()},
        "nodes": results,
        "unclean_exits": {n: c for n, c in codes.items() if c != 0},
        "target": {"std_ms_max": TARGET_STD_MS},
        "paper_std_ms": list(PAPER_STD_MS),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(f"wrote {common.write_result('clock', args.broker, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
