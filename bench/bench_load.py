"""Load throughput: songs of the paper's Table I sizes (2.5, 6.6, 9.1 MB) loaded into a 5-node
cluster until f+1 = 3 nodes hold them, beside a raw MQTT fan-out of the same bytes.

    .venv/bin/python bench/bench_load.py --broker mosquitto --reps 3

NSync: ``NSyncClient.load_song(path)`` (not ``bg``), timed from the call to the master's reply,
which comes when f+1 nodes hold the song's verified bytes and the master has recognised it as
audio (decoding follows in the background). The songs are 16-bit stereo WAV tones sized to the
target bytes, each repetition a new tone frequency, hence a new song. MB/s = size / time, MB =
10^6 bytes. The "stored f+1" column is a breakdown of the same loads: the time until f+1 nodes
list the song in their retained node state (every byte on disk, before decoding), seen by a
separate subscriber.

Raw fan-out, on the same broker before the cluster starts: one paho client publishes the same
file in 256 KiB QoS1 messages (NSync's chunk size) to a topic that subscriber processes receive at
QoS1; timed from the first publish to the moment the needed subscribers have every byte.
- "raw 4/2" (the issue's baseline): 4 subscribers, 2 needed, the sender counting as the third
  holder of 5, as if the master itself were sending;
- "raw 5/3" (NSync's actual path): the client is not a node and publishes to a topic all 5 nodes
  subscribe, so 5 subscribers, 3 needed.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import common
from common import table

from nsync_lab.testing import NodeCluster
from nsync_mqtt.bus import new_paho_client, parse_broker_url
from nsync_mqtt.replication import sha224_file
from nsync_mqtt.tones import RATE, make_tone_wav

SIZES_MB = (2.5, 6.6, 9.1)  # the paper's Table I
PAPER_MBPS = 0.1
TARGET_FRACTION = 0.5
NODES = 5
NEEDED = NODES // 2 + 1  # f+1
CHUNK = 256 * 1024
CLUSTER_READY_S = 60.0
ROUND_TIMEOUT_S = 60.0
ALL_HOLD_TIMEOUT_S = 60.0


def tone_file(path: Path, size: int, freq: float, title: str) -> Path:
    """A WAV tone of ``size`` bytes (to within one 4-byte frame)."""
    overhead = len(make_tone_wav(0.0, freq, title))
    frames = (size - overhead) // 4
    path.write_bytes(make_tone_wav(frames / RATE, freq, title))
    return path


def _subscriber(url: str, topic: str, sizes: list[int], ready: Any, done: Any) -> None:
    """Counts the bytes of each round (sub-topic = round number); reports when one is whole."""
    got = [0] * len(sizes)
    c = new_paho_client(f"bench-sub-{uuid.uuid4().hex[:8]}", parse_broker_url(url))

    def on_message(client: Any, u: Any, msg: Any) -> None:
        r = int(msg.topic.rsplit("/", 1)[1])
        got[r] += len(msg.payload)
        if got[r] == sizes[r]:
            done.put((r, time.monotonic()))

    c.on_connect = lambda client, u, f, rc, p: client.subscribe(f"{topic}/+", 1)
    c.on_subscribe = lambda *a: ready.put(1)
    c.on_message = on_message
    b = parse_broker_url(url)
    c.connect_async(b.host, b.port, keepalive=30)
    c.loop_forever()


def raw_fanout(url: str, files: list[Path], subscribers: int, needed: int) -> list[float]:
    """Seconds until ``needed`` of ``subscribers`` hold each file, one round per file."""
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    topic = f"bench/{uuid.uuid4().hex[:8]}/fanout"
    sizes = [f.stat().st_size for f in files]
    procs = [
        ctx.Process(target=_subscriber, args=(url, topic, sizes, ready, done), daemon=True)
        for _ in range(subscribers)
    ]
    for p in procs:
        p.start()
    pub = new_paho_client(f"bench-pub-{uuid.uuid4().hex[:8]}", parse_broker_url(url))
    b = parse_broker_url(url)
    pub.connect_async(b.host, b.port, keepalive=30)
    pub.loop_start()
    times = []
    try:
        for _ in procs:
            ready.get(timeout=20)
        for r, path in enumerate(files):
            data = path.read_bytes()
            t0 = time.monotonic()
            infos = [
                pub.publish(f"{topic}/{r}", data[i : i + CHUNK], qos=1)
                for i in range(0, len(data), CHUNK)
            ]
            finished = sorted(done.get(timeout=ROUND_TIMEOUT_S)[1] for _ in procs)
            for info in infos:
                info.wait_for_publish(timeout=10)
            times.append(finished[needed - 1] - t0)
    finally:
        pub.disconnect()
        pub.loop_stop()
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return times


class HoldWatcher:
    """Records when each node first lists a song in its retained node state (bytes stored)."""

    def __init__(self, url: str, cluster: str) -> None:
        self._lock = threading.Lock()
        self.first: dict[str, dict[str, float]] = {}  # song -> node -> monotonic time
        self._subscribed = threading.Event()
        self._c = new_paho_client(f"bench-hold-{uuid.uuid4().hex[:8]}", parse_broker_url(url))
        topic = f"nsync/{cluster}/node/+/state"
        self._c.on_connect = lambda client, u, f, rc, p: client.subscribe(topic, 1)
        self._c.on_subscribe = lambda *a: self._subscribed.set()
        self._c.on_message = self._on_message
        b = parse_broker_url(url)
        self._c.connect_async(b.host, b.port, keepalive=30)
        self._c.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("the hold watcher could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        t = time.monotonic()
        node = msg.topic.split("/")[-2]
        try:
            songs = json.loads(msg.payload).get("songs") or []
        except (ValueError, AttributeError):
            return
        with self._lock:
            for song in songs:
                self.first.setdefault(song, {}).setdefault(node, t)

    def held_at(self, song: str, k: int) -> float | None:
        """When the k-th node first listed the song, or None if fewer did."""
        with self._lock:
            times = sorted(self.first.get(song, {}).values())
        return times[k - 1] if len(times) >= k else None

    def close(self) -> None:
        self._c.disconnect()
        self._c.loop_stop()


def nsync_loads(url: str, workdir: Path, files: list[Path]) -> dict[str, Any]:
    name = f"b{uuid.uuid4().hex[:8]}"
    cluster = NodeCluster.of(url, workdir / "cluster", n=NODES, cluster=name)
    times: list[float | None] = []
    held: list[float | None] = []  # until f+1 nodes stored every byte (before decoding)
    failures: list[str] = []
    cluster.start()
    try:
        cluster.wait_ready(CLUSTER_READY_S)
        client = cluster.client(timeout=10.0)
        watcher = HoldWatcher(url, name)
        try:
            for path in files:
                song = sha224_file(path)
                t0 = time.monotonic()
                reply = client.load_song(path)
                dt = time.monotonic() - t0
                t_held = watcher.held_at(song, NEEDED)
                held.append(None if t_held is None else t_held - t0)
                if not reply.get("success"):
                    failures.append(f"{path.name}: {reply.get('msg')}")
                    times.append(None)
                    continue
                times.append(dt)
                # let the other nodes finish (store and decode) before the next load
                deadline = time.monotonic() + ALL_HOLD_TIMEOUT_S
                while watcher.held_at(song, NODES) is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(1.0)  # the decoders finish after the song is held
        finally:
            watcher.close()
            client.close()
    finally:
        codes = cluster.stop()
    return {
        "times": times,
        "held": held,
        "failures": failures,
        "unclean_exits": {n: c for n, c in codes.items() if c != 0},
    }


def main() -> int:
    p = common.arg_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="songs per size (default 3)")
    args = p.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nsync-bench-") as tmp:
        workdir = Path(tmp)
        plan = [(mb, rep) for mb in SIZES_MB for rep in range(args.reps)]
        files = [
            tone_file(
                workdir / f"load-{mb}-{rep}.wav",
                round(mb * 1e6),
                220.0 + 40.0 * i,
                f"load {mb} MB #{rep + 1}",
            )
            for i, (mb, rep) in enumerate(plan)
        ]
        with common.broker(args.broker, workdir) as b:
            version = b.version()
            before = common.conditions()
            raw42 = raw_fanout(b.url, files, NODES - 1, NEEDED - 1)
            raw53 = raw_fanout(b.url, files, NODES, NEEDED)
            loads = nsync_loads(b.url, workdir, files)
            after = common.conditions()
        sizes = [f.stat().st_size for f in files]

    def mbps(size: int, t: float | None) -> float | None:
        return None if not t else size / t / 1e6

    per_size = []
    rows = []
    for mb in SIZES_MB:
        idx = [i for i, (m, _) in enumerate(plan) if m == mb]
        n = [mbps(sizes[i], loads["times"][i]) for i in idx]
        r42 = [mbps(sizes[i], raw42[i]) for i in idx]
        r53 = [mbps(sizes[i], raw53[i]) for i in idx]
        h = [mbps(sizes[i], loads["held"][i]) for i in idx]
        ok_h = [x for x in h if x is not None]
        ok_n = [x for x in n if x is not None]
        mean_n = statistics.fmean(ok_n) if ok_n else 0.0
        mean_42 = statistics.fmean(x for x in r42 if x is not None)
        mean_53 = statistics.fmean(x for x in r53 if x is not None)
        entry = {
            "size_mb": mb,
            "bytes": [sizes[i] for i in idx],
            "nsync_s": [loads["times"][i] for i in idx],
            "nsync_mbps": n,
            "stored_f1_s": [loads["held"][i] for i in idx],
            "stored_f1_mbps_mean": round(statistics.fmean(ok_h), 2) if ok_h else None,
            "raw42_s": [raw42[i] for i in idx],
            "raw53_s": [raw53[i] for i in idx],
            "nsync_mbps_mean": round(mean_n, 2),
            "raw42_mbps_mean": round(mean_42, 2),
            "raw53_mbps_mean": round(mean_53, 2),
            "fraction_of_raw42": round(mean_n / mean_42, 3),
            "fraction_of_raw53": round(mean_n / mean_53, 3),
            "target_met": len(ok_n) == len(idx) and mean_n / mean_42 >= TARGET_FRACTION,
        }
        per_size.append(entry)
        ok_t = [loads["times"][i] for i in idx if loads["times"][i] is not None]
        t_mean = statistics.fmean(ok_t) if ok_t else 0.0
        rows.append(
            [
                mb,
                round(t_mean, 3),
                entry["nsync_mbps_mean"],
                entry["stored_f1_mbps_mean"],
                entry["raw42_mbps_mean"],
                entry["raw53_mbps_mean"],
                f"{entry['fraction_of_raw42']:.0%}",
                f"{entry['fraction_of_raw53']:.0%}",
                "yes" if entry["target_met"] else "NO",
            ]
        )
    headers = ["size MB", "NSync s", "NSync MB/s", "stored f+1 MB/s", "raw 4/2 MB/s",
               "raw 5/3 MB/s", "of raw 4/2", "of raw 5/3", "target met"]  # fmt: skip
    print(f"load throughput to f+1={NEEDED} of {NODES} nodes, {args.broker} ({version}), "
          f"{args.reps} reps per size (means)")  # fmt: skip
    print(f"machine load before {before}, after {after}")
    print(table(headers, rows))
    print(f"target: >= {TARGET_FRACTION:.0%} of raw 4/2; paper ~{PAPER_MBPS} MB/s")
    for f in loads["failures"]:
        print(f"FAILED: {f}")
    doc = {
        "bench": "load",
        "command": f".venv/bin/python bench/bench_load.py --broker {args.broker} "
        f"--reps {args.reps}",
        "date": common.now_iso(),
        "broker": args.broker,
        "broker_version": version,
        "machine": common.machine(),
        "conditions": {"before": before, "after": after},
        "nodes": NODES,
        "needed": NEEDED,
        "chunk_bytes": CHUNK,
        "sizes": per_size,
        "failures": loads["failures"],
        "unclean_exits": loads["unclean_exits"],
        "target": {"fraction_of_raw42_min": TARGET_FRACTION},
        "paper_mbps": PAPER_MBPS,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(f"wrote {common.write_result('load', args.broker, doc)}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(RuntimeError):
        mp.set_start_method("spawn")
    raise SystemExit(main())
