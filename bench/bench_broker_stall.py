"""Does the embedded broker keep answering while its node waits on the disk?

Three nodes; n1 runs the embedded broker (`--embed-broker`). A client changes the volume every
0.1 s, so every node saves its durable state (with fsync) ten times a second, and a raw MQTT
client measures CONNECT..SUBACK against the broker every 0.1 s: how long a client that
connects now (a node, Home Assistant, `mosquitto_pub`) waits. The run is repeated with another
process writing to the same disk with fsync all along (`--pressure`), as a package install or a
busy SD card does.

    .venv/bin/python bench/bench_broker_stall.py --seconds 20
    .venv/bin/python bench/bench_broker_stall.py --seconds 20 --pressure

Writes bench/results/broker-stall-{quiet,pressure}.json.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import arg_parser, conditions, record, summary_ms, table

from nsync_lab.testing import NodeCluster, NodeSpec, free_port, wait_port
from nsync_mqtt.client import NSyncClient

PRESSURE_CHUNK_MB = 512  # written, then fsynced, over and over by the pressure process


def _text(v: str) -> bytes:
    raw = v.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_and_subscribe(port: int, n: int) -> float:
    """Seconds from opening a connection to the broker's SUBACK (a raw MQTT 3.1.1 client)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = _text("MQTT") + bytes([4, 2]) + (30).to_bytes(2, "big") + _text(f"stall-{n}")
        s.sendall(bytes([0x10, len(body)]) + body)
        if len(s.recv(4)) < 4:
            raise OSError("no CONNACK")
        sub = (1).to_bytes(2, "big") + _text(f"bench/stall/{n}") + bytes([1])
        s.sendall(bytes([0x82, len(sub)]) + sub)
        if len(s.recv(5)) < 5:
            raise OSError("no SUBACK")
        elapsed = time.monotonic() - t0
        s.sendall(b"\xe0\x00")  # DISCONNECT
    return elapsed


def pressure(path: Path) -> subprocess.Popen[bytes]:
    """A process writing PRESSURE_CHUNK_MB to ``path`` with fsync, over and over."""
    code = (
        "import os, sys\n"
        "block = b'\\0' * (1 << 20)\n"
        "while True:\n"
        "    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)\n"
        f"    for _ in range({PRESSURE_CHUNK_MB}):\n"
        "        os.write(fd, block)\n"
        "    os.fsync(fd)\n"
        "    os.close(fd)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(path)])


def run(seconds: float, with_pressure: bool) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nsync-stall-") as tmp:
        work = Path(tmp)
        specs = [NodeSpec("n1", extra=["--embed-broker", f"127.0.0.1:{port}"])]
        specs += [NodeSpec(n) for n in ("n2", "n3")]
        cluster = NodeCluster(f"mqtt://127.0.0.1:{port}", work, specs)
        writer: subprocess.Popen[bytes] | None = None
        stop = threading.Event()
        sent: list[bool] = []
        try:
            cluster.start_node("n1")
            wait_port(port, 15.0, cluster.procs["n1"])
            cluster.start_node("n2")
            cluster.start_node("n3")
            cluster.wait_ready(timeout_s=30.0)
            if with_pressure:
                writer = pressure(work / "pressure.bin")

            def commands() -> None:
                with contextlib.closing(
                    NSyncClient(cluster.broker_url, timeout=3.0).connect()
                ) as c:
                    level = 10
                    while not stop.is_set():
                        level = 11 if level == 10 else 10
                        sent.append(bool(c.volume(level)["success"]))
                        stop.wait(0.1)

            client = threading.Thread(target=commands, name="commands")
            client.start()
            samples = []
            t_end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < t_end:
                n += 1
                samples.append(connect_and_subscribe(port, n))
                time.sleep(0.1)
            stop.set()
            client.join(10)
            log_text = cluster.node_log("n1").read_text(errors="replace")
            stalls = log_text.count("has been blocked")
        finally:
            stop.set()
            if writer is not None:
                writer.kill()
                writer.wait()
            codes = cluster.stop()
    return {
        "pressure": with_pressure,
        "seconds": seconds,
        "connect_subscribe_ms": summary_ms(samples),
        "commands": {"sent": len(sent), "failed": sent.count(False)},
        "n1_loop_stalls_reported": stalls,
        "exit_codes": codes,
    }


def main() -> int:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="probing time (default 20)")
    p.add_argument("--pressure", action="store_true", help="another process fsyncs all along")
    args = p.parse_args()
    before = conditions()
    result = run(args.seconds, args.pressure)
    s = result["connect_subscribe_ms"]
    print(
        table(
            ["disk", "probes", "p50 ms", "p99 ms", "max ms", "commands", "failed"],
            [
                [
                    "fsync pressure" if args.pressure else "quiet",
                    s["n"],
                    s["p50_ms"],
                    s["p99_ms"],
                    s["max_ms"],
                    result["commands"]["sent"],
                    result["commands"]["failed"],
                ]
            ],
        )
    )
    path = record("broker-stall", "pressure" if args.pressure else "quiet", before, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
