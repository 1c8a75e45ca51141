"""Command latency: p50/p99 of play, pause, forward, backward and enqueue on 3- and 5-node
clusters (virtual sinks), beside the bare broker's QoS1 round trip measured in the same run.

    .venv/bin/python bench/bench_latency.py --broker mosquitto --runs 200

Latency is what a user of the client API waits: from ``NSyncClient.request`` publishing the
command to the master's reply arriving, which the master sends once f+1 nodes applied the op.

The broker baseline is an echo between two paho clients, both QoS1 with TCP_NODELAY: A publishes
to a topic B subscribes, B publishes the payload back to a topic A subscribes, timed from A's
publish to A's receipt. It has the same shape as a command (client -> broker -> master -> broker
-> client) minus the master's work and its replication round. A single client publishing to its
own subscription (one hop there and back through the broker) is measured too, for reference.
Both run ``--runs`` times before the clusters start and again after they stop; the two halves
are pooled, so a change in the machine's load during the run shows in both sides.

``--signing both`` (the default) runs each cluster size twice at once, without and with a cluster
key (every internal message signed), the two taking turns command by command, and prints what
signing costs per command:

    .venv/bin/python bench/bench_latency.py --broker mosquitto --runs 200 --signing both
"""

from __future__ import annotations

import queue
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import common
from common import summary_ms, table

from nsync_lab.testing import NodeCluster
from nsync_mqtt.bus import new_paho_client, parse_broker_url
from nsync_mqtt.tones import make_tone_wav

VERBS = ("play", "pause", "forward", "backward", "enqueue")
DIAGNOSTIC = "status"  # answered by the master alone: no replication round
PLAYLIST_SONGS = 5
SONG_S = 8.0
WARMUP = 10
TARGET_RATIO = 5.0  # p50 at most 5x the bare broker echo
TARGET_P99_MS = 25.0
PAPER_MS = {"play": 2400, "pause": 2400, "forward": 2400, "backward": 2400, "enqueue": 5600}
CLUSTER_READY_S = 60.0
CLIENT_TIMEOUT_S = 5.0
SIGNING_TARGET = 1.10  # signing costs at most 10% of a command's p50


def _client(url: str, name: str, topics: list[str], inbox: queue.Queue[Any]) -> Any:
    c = new_paho_client(f"bench-{name}-{uuid.uuid4().hex[:6]}", parse_broker_url(url))
    subscribed = queue.Queue[int]()

    def on_connect(client: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        client.subscribe([(t, 1) for t in topics])

    c.on_connect = on_connect
    c.on_subscribe = lambda *a: subscribed.put(1)
    c.on_message = lambda client, u, msg: inbox.put((time.perf_counter(), msg.topic, msg.payload))
    b = parse_broker_url(url)
    c.connect_async(b.host, b.port, keepalive=30)
    c.loop_start()
    subscribed.get(timeout=10)
    return c


def broker_round_trips(url: str, runs: int) -> dict[str, list[float]]:
    """QoS1 echo between two clients, and one client's publish to its own subscription."""
    base = f"bench/{uuid.uuid4().hex[:8]}"
    ping, pong, loop = f"{base}/ping", f"{base}/pong", f"{base}/loop"
    a_inbox: queue.Queue[Any] = queue.Queue()
    b_inbox: queue.Queue[Any] = queue.Queue()
    a = _client(url, "a", [pong, loop], a_inbox)
    b = _client(url, "b", [ping], b_inbox)
    b.on_message = lambda client, u, msg: client.publish(pong, msg.payload, qos=1)
    try:

        def timed(topic: str, n: int) -> list[float]:
            out = []
            for i in range(n):
                payload = f"{i}".encode()
                t0 = time.perf_counter()
                a.publish(topic, payload, qos=1)
                while True:
                    t1, _, got = a_inbox.get(timeout=5)
                    if got == payload:
                        break
                out.append(t1 - t0)
            return out

        timed(ping, WARMUP)
        echo = timed(ping, runs)
        timed(loop, WARMUP)
        self_loop = timed(loop, runs)
    finally:
        for c in (a, b):
            c.disconnect()
            c.loop_stop()
    return {"echo": echo, "self": self_loop}


def _ok(reply: dict[str, Any], what: str) -> dict[str, Any]:
    if not reply.get("success"):
        raise RuntimeError(f"{what} failed: {reply.get('msg')}")
    return reply


def cluster_latency(
    url: str, workdir: Path, nodes: int, runs: int, kinds: list[bool]
) -> list[dict[str, Any]]:
    """Time every command on one cluster per entry of ``kinds`` (signed or not), all running at
    once and taking turns command by command (which goes first alternates for every verb), so
    that whatever else the machine does falls on each of them alike."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"n{nodes}-{'signed' if signed else 'unsigned'}" for signed in kinds]
    clusters = [
        NodeCluster.of(
            url, workdir / name, n=nodes, cluster=f"b{uuid.uuid4().hex[:8]}", signed=signed
        )
        for name, signed in zip(names, kinds, strict=True)
    ]
    samples: list[dict[str, list[float]]] = [{v: [] for v in (*VERBS, DIAGNOSTIC)} for _ in kinds]
    failures: list[dict[str, list[str]]] = [{v: [] for v in (*VERBS, DIAGNOSTIC)} for _ in kinds]
    ready_s: list[float] = []
    clients: list[Any] = []
    codes: list[dict[str, int]] = []
    try:
        for cluster in clusters:
            cluster.start()
        for cluster in clusters:
            t0 = time.monotonic()
            cluster.wait_ready(CLUSTER_READY_S)
            ready_s.append(time.monotonic() - t0)
            clients.append(cluster.client(timeout=CLIENT_TIMEOUT_S))
        songs: list[list[str]] = []
        for name, client in zip(names, clients, strict=True):
            songs.append([])
            for i in range(PLAYLIST_SONGS):
                path = workdir / f"lat-{name}-{i}.wav"
                path.write_bytes(make_tone_wav(SONG_S, 330.0 + 55.0 * i, f"latency {i}"))
                loaded = _ok(client.load_song(path), f"load {path.name}")
                songs[-1].append(loaded["params"]["song"])
                _ok(client.enqueue_song(songs[-1][-1]), "enqueue")
            for _ in range(WARMUP):
                _ok(client.status(), "status")
        turns: dict[str, int] = {}

        def timed(verb: str, params: list[dict[str, Any] | None] | None = None) -> None:
            # a command right after the other cluster's is slower (that one's acks and saves
            # are still running): each cluster goes first in every other run of each verb
            order = list(range(len(clients)))
            if turns.get(verb, 0) % 2:
                order.reverse()
            turns[verb] = turns.get(verb, 0) + 1
            for k in order:
                t = time.perf_counter()
                reply = clients[k].request(verb, params[k] if params else None)
                dt = time.perf_counter() - t
                if reply.get("success"):
                    samples[k][verb].append(dt)
                else:
                    failures[k][verb].append(str(reply.get("msg")))

        for _ in range(runs):  # idle/paused -> playing -> paused
            timed("play")
            timed("pause")
        for client in clients:
            _ok(client.play(), "play")
        for _ in range(runs):  # slot 0 -> 1 -> 0, playing, each at the song's start
            timed("forward")
            timed("backward")
        for i in range(runs):
            timed("enqueue", [{"song": s[i % len(s)]} for s in songs])
        for _ in range(runs):
            timed(DIAGNOSTIC)
        for client in clients:
            _ok(client.stop(), "stop")
    finally:
        for client in clients:
            client.close()
        for cluster in clusters:
            codes.append(cluster.stop())
    return [
        {
            "nodes": nodes,
            "signed": signed,
            "ready_s": round(ready_s[k], 2),
            "verbs": {v: summary_ms(samples[k][v]) for v in (*VERBS, DIAGNOSTIC)},
            "failures": {v: len(f) for v, f in failures[k].items()},
            "failure_examples": {v: f[:3] for v, f in failures[k].items() if f},
            "unclean_exits": {n: c for n, c in codes[k].items() if c != 0},
        }
        for k, signed in enumerate(kinds)
    ]


def seal_cost_us(n: int = 20000) -> dict[str, float]:
    """Microseconds to sign and to check one op-sized internal message, in this process."""
    from nsync_mqtt.seal import Boot, Opener, Sealer

    key = bytes(range(32))
    sealer = Sealer(key, "home", "a", Boot.new(1))
    opener = Opener(key, "home", "b", {"a", "b", "c"})
    body = b'{"v":1,"t":"op","src":"a","term":3,"index":1234,"op":{"kind":"play","at":1.7e9}}'
    topic = "nsync/home/internal/op"
    t0 = time.perf_counter()
    sealed = [sealer.seal(topic, body) for _ in range(n)]
    t1 = time.perf_counter()
    opened = sum(opener.open(0.0, topic, m) is not None for m in sealed)
    t2 = time.perf_counter()
    assert opened == n
    return {
        "seal_us": round((t1 - t0) / n * 1e6, 2),
        "open_us": round((t2 - t1) / n * 1e6, 2),
        "header_bytes": len(sealed[0]) - len(body),
    }


def signing_cost(clusters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per size and command, p50 and p99 with the key over without (sizes run both ways)."""
    by = {(c["nodes"], c["signed"]): c for c in clusters}
    out: dict[str, dict[str, Any]] = {}
    for (nodes, signed), c in sorted(by.items()):
        plain = by.get((nodes, False))
        if not signed or plain is None:
            continue
        for verb in VERBS:
            s, u = c["verbs"][verb], plain["verbs"][verb]
            p50 = s["p50_ms"] / u["p50_ms"]
            out[f"{nodes}:{verb}"] = {
                "p50_ratio": round(p50, 3),
                "p99_ratio": round(s["p99_ms"] / u["p99_ms"], 3),
                "met": "yes" if p50 <= SIGNING_TARGET else "NO",
            }
    return out


def main() -> int:
    p = common.arg_parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="timed runs per command (default 200)")
    p.add_argument("--nodes", default="3,5", help="cluster sizes, comma separated (default 3,5)")
    p.add_argument(
        "--signing",
        choices=("on", "off", "both"),
        default="both",
        help="clusters with a key, without, or each size both ways (default both)",
    )
    args = p.parse_args()
    sizes = [int(n) for n in args.nodes.split(",")]
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.signing]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nsync-bench-") as tmp:
        workdir = Path(tmp)
        with common.broker(args.broker, workdir) as b:
            version = b.version()
            before = common.conditions()
            first = broker_round_trips(b.url, args.runs)
            clusters = [
                c for n in sizes for c in cluster_latency(b.url, workdir, n, args.runs, modes)
            ]
            last = broker_round_trips(b.url, args.runs)
            after = common.conditions()
    # the baseline is measured before and after the clusters; both halves pooled
    baseline = {k: summary_ms(first[k] + last[k]) for k in ("echo", "self")}
    baseline_halves = {
        "before": {k: summary_ms(v) for k, v in first.items()},
        "after": {k: summary_ms(v) for k, v in last.items()},
    }
    echo_p50 = baseline["echo"]["p50_ms"]
    rows: list[list[Any]] = [
        ["broker", "echo (2 clients)", echo_p50, baseline["echo"]["p99_ms"], 1.0, "", ""],
        ["broker", "self-subscribe", baseline["self"]["p50_ms"], baseline["self"]["p99_ms"],
         round(baseline["self"]["p50_ms"] / echo_p50, 2), "", ""],
    ]  # fmt: skip
    verdicts = {}
    for c in clusters:
        setup = f"{c['nodes']} nodes, {'signed' if c['signed'] else 'no key'}"
        for verb in VERBS:
            s = c["verbs"][verb]
            ratio = s["p50_ms"] / echo_p50
            ok = ratio <= TARGET_RATIO and s["p99_ms"] <= TARGET_P99_MS and not c["failures"][verb]
            verdicts[f"{setup}:{verb}"] = ok
            rows.append(
                [
                    setup,
                    verb,
                    s["p50_ms"],
                    s["p99_ms"],
                    round(ratio, 2),
                    c["failures"][verb],
                    "yes" if ok else "NO",
                ]
            )
        s = c["verbs"][DIAGNOSTIC]
        rows.append(
            [setup, f"({DIAGNOSTIC}: no replication)", s["p50_ms"], s["p99_ms"],
             round(s["p50_ms"] / echo_p50, 2), c["failures"][DIAGNOSTIC], ""]
        )  # fmt: skip
    headers = ["setup", "command", "p50 ms", "p99 ms", "p50/echo", "failed", "target met"]
    print(f"command latency, {args.broker} ({version}), {args.runs} runs each")
    print(f"machine load before {before}, after {after}")
    print(table(headers, rows))
    print(f"target: p50 <= {TARGET_RATIO:g}x echo p50, p99 <= {TARGET_P99_MS:g} ms; paper ~2400 ms")
    signing = signing_cost(clusters)
    if signing:
        srows = [[k.split(":")[0], k.split(":")[1], *v.values()] for k, v in signing.items()]
        print("what signing costs (same run): p50 and p99 with the key over without")
        print(table(["nodes", "command", "p50 ratio", "p99 ratio", "target met"], srows))
    per_message = seal_cost_us()
    print(
        f"per internal message: sign {per_message['seal_us']} us, check "
        f"{per_message['open_us']} us, {per_message['header_bytes']} bytes of header"
    )
    doc = {
        "bench": "latency",
        "command": f".venv/bin/python bench/bench_latency.py --broker {args.broker} "
        f"--runs {args.runs} --nodes {args.nodes} --signing {args.signing}",
        "date": common.now_iso(),
        "broker": args.broker,
        "broker_version": version,
        "machine": common.machine(),
        "runs": args.runs,
        "baseline": {
            "kind": "QoS1 echo between two clients (A->broker->B->broker->A), "
            f"{args.runs} before and {args.runs} after the clusters, pooled",
            **baseline,
            "halves": baseline_halves,
        },
        "conditions": {"before": before, "after": after},
        "clusters": clusters,
        "target": {"p50_over_echo_max": TARGET_RATIO, "p99_ms_max": TARGET_P99_MS},
        "paper_ms": PAPER_MS,
        "target_met": verdicts,
        "signing_cost": signing,
        "signing_per_message": per_message,
        "signing_target": f"p50 with the key <= {SIGNING_TARGET:g}x without",
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    kind = "latency-signing" if args.signing == "both" else "latency"
    print(f"wrote {common.write_result(kind, args.broker, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
