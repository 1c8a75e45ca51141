"""Test tools shared by the integration tests, the benchmarks and the demo.

``NodeCluster`` starts real ``nsync node`` processes on loopback against a broker URL and stops
them by their own handles; ``FakeClock`` (from nsync_mqtt.clock) drives the pure cores.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsync_mqtt.clock import FakeClock

__all__ = ["FakeClock", "NodeCluster", "NodeSpec", "free_port", "wait_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout_s} s")


@dataclass
class NodeSpec:
    id: str
    clock_offset: float = 0.0
    clock_drift_ppm: float = 0.0
    dac_drift_ppm: float = 0.0
    extra: list[str] = field(default_factory=list)


class NodeCluster:
    """Real node processes on loopback, started and stopped by their own handles."""

    def __init__(
        self,
        broker_url: str,
        workdir: Path,
        specs: Sequence[NodeSpec],
        cluster: str = "home",
        sink: str = "virtual",
        timing: dict[str, float] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.workdir = Path(workdir)
        self.specs = {s.id: s for s in specs}
        self.cluster = cluster
        self.sink = sink
        self.timing = timing or {}
        self.settings = settings or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def of(cls, broker_url: str, workdir: Path, n: int = 3, **kw: Any) -> NodeCluster:
        return cls(broker_url, workdir, [NodeSpec(f"n{i + 1}") for i in range(n)], **kw)

    @property
    def peers(self) -> str:
        return ",".join(self.specs)

    def sink_log(self, node: str) -> Path:
        return self.workdir / f"{node}.sink.jsonl"

    def node_log(self, node: str) -> Path:
        return self.workdir / f"{node}.log"

    def start_node(self, node: str) -> None:
        spec = self.specs[node]
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"{node}.yaml"
        settings = dict(self.settings)
        if self.timing:
            settings["timing"] = self.timing
        config.write_text(json.dumps(settings))
        cmd = [
            sys.executable,
            "-m",
            "nsync_mqtt",
            "node",
            "--config",
            str(config),
            "--id",
            node,
            "--peers",
            self.peers,
            "--cluster",
            self.cluster,
            "--broker",
            self.broker_url,
            "--data-dir",
            str(self.workdir / node),
            "--sink",
            self.sink,
            "--sink-log",
            str(self.sink_log(node)),
            "--clock-offset",
            repr(spec.clock_offset),
            "--clock-drift-ppm",
            repr(spec.clock_drift_ppm),
            "--dac-drift-ppm",
            repr(spec.dac_drift_ppm),
            *spec.extra,
        ]
        out = self.node_log(node).open("ab")
        self.procs[node] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def start(self) -> NodeCluster:
        for node in self.specs:
            self.start_node(node)
        return self

    def stop_node(
        self, node: str, sig: int = signal.SIGTERM, timeout_s: float = 10.0
    ) -> int | None:
        proc = self.procs.pop(node, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)  # stacks into the node's log, then kill
                time.sleep(0.5)
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self) -> dict[str, int | None]:
        return {node: self.stop_node(node) for node in list(self.procs)}

    def __enter__(self) -> NodeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def logs_tail(self, lines: int = 20) -> str:
        parts = []
        for node in self.specs:
            path = self.node_log(node)
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {node}\n" + "\n".join(tail))
        return "\n".join(parts)

    def client(self, timeout: float = 3.0) -> Any:
        from nsync_mqtt.client import NSyncClient

        return NSyncClient(self.broker_url, self.cluster, timeout=timeout).connect()

    def wait_ready(self, timeout_s: float = 30.0, calibrated: bool = True) -> dict[str, Any]:
        """Wait until a master answers status and every node reports a calibrated clock."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        with self.watch() as w:
            while time.monotonic() < deadline:
                states = w.node_states()
                masters = [n for n, s in states.items() if s.get("role") == "master"]
                ok = len(masters) == 1 and all(n in states for n in self.alive())
                if ok and calibrated:
                    ok = all(
                        states[n].get("role") == "master"
                        or (states[n].get("clock") or {}).get("calibrated")
                        for n in self.alive()
                    )
                if ok:
                    return states
                last = states
                time.sleep(0.1)
        raise TimeoutError(f"cluster not ready in {timeout_s} s: {last}\n{self.logs_tail()}")

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watcher]:
        w = Watcher(self.broker_url, self.cluster)
        try:
            yield w
        finally:
            w.close()


class Watcher:
    """Follows the retained state topics of a cluster."""

    def __init__(self, broker_url: str, cluster: str) -> None:
        import threading

        from nsync_mqtt.bus import new_paho_client, parse_broker_url

        self._lock = threading.Lock()
        self.retained: dict[str, bytes] = {}
        self.base = f"nsync/{cluster}"
        url = parse_broker_url(broker_url)
        self._client = new_paho_client(f"watch-{uuid.uuid4().hex[:12]}", url)
        self._ready = threading.Event()

        def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(f"{self.base}/#", qos=0)
            self._ready.set()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            if not msg.topic.startswith(f"{self.base}/"):
                return  # amqtt also hands out retained messages of other subscriptions
            with self._lock:
                self.retained[msg.topic] = msg.payload

        self._client.on_connect = on_connect
        self._client.on_message = on_message
        self._client.connect_async(url.host, url.port)
        self._client.loop_start()
        self._ready.wait(5)

    def get(self, suffix: str) -> bytes | None:
        with self._lock:
            return self.retained.get(f"{self.base}/{suffix}")

    def json(self, suffix: str) -> Any:
        raw = self.get(suffix)
        return json.loads(raw) if raw else None

    def node_states(self) -> dict[str, dict[str, Any]]:
        out = {}
        with self._lock:
            items = list(self.retained.items())
        for topic, payload in items:
            parts = topic.split("/")
            if len(parts) == 5 and parts[2] == "node" and parts[4] == "state" and payload:
                with contextlib.suppress(ValueError):
                    out[parts[3]] = json.loads(payload)
        return out

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
