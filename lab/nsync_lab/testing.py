"""Test tools shared by the integration tests, the benchmarks and the demo.

- ``BrokerProcess``: an amqtt or Mosquitto broker subprocess on a loopback port.
- ``NodeCluster``: real ``nsync node`` processes on loopback against a broker URL, stopped by
  their own handles; ``Watcher`` follows a cluster's retained state topics.
- ``RawClient``: a plain MQTT client that talks to NSync the way Home Assistant or
  ``mosquitto_pub`` do, and records what it hears.
- ``wait_for``, ``ok``, ``refused``, ``tone_file``: small checks and makers for tests.
- ``FakeClock`` (from nsync_mqtt.clock) drives the pure cores.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsync_mqtt.bus import new_paho_client, parse_broker_url
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.clock import FakeClock
from nsync_mqtt.messages import Topics
from nsync_mqtt.ports import free_port, port_open
from nsync_mqtt.seal import MAGIC, write_key
from nsync_mqtt.tones import make_tone_wav

__all__ = [
    "BROKER_KINDS",
    "MOSQUITTO",
    "REPLY_KEYS",
    "BrokerProcess",
    "FakeClock",
    "Message",
    "NodeCluster",
    "NodeSpec",
    "RawClient",
    "Watcher",
    "free_port",
    "load_and_enqueue",
    "mosquitto_config",
    "ok",
    "port_open",
    "ready_cluster",
    "refused",
    "tone_file",
    "unique_cluster_name",
    "wait_for",
    "wait_port",
]

MOSQUITTO = Path("/usr/sbin/mosquitto")
BROKER_KINDS = ("amqtt", "mosquitto")
BROKER_START_TIMEOUT_S = 10.0
REPLY_KEYS = frozenset({"success", "command", "params", "msg", "client_req_id"})


def unsealed(payload: bytes) -> bytes:
    """An internal message as a plain observer reads it: without the signature line."""
    if payload.startswith(MAGIC):
        return payload.partition(b"\n")[2]
    return payload


def wait_port(
    port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``port`` accepts connections; RuntimeError if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while not port_open(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} did not open within {timeout_s} s")
        time.sleep(0.02)


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def mosquitto_config(port: int) -> str:
    """Mosquitto for tests: loopback only, anonymous, nothing kept on disk."""
    return "\n".join(
        [
            "per_listener_settings false",
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            # without it every receive-then-publish exchange waits ~40 ms for delayed ACK
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "",
        ]
    )


class BrokerProcess:
    """An amqtt or Mosquitto broker subprocess on a fixed loopback port, which can be killed
    and started again. Its output goes to ``log`` in ``workdir``."""

    def __init__(self, kind: str, port: int, workdir: Path, config: str | None = None) -> None:
        """``config``: Mosquitto only, its whole configuration instead of
        ``mosquitto_config(port)`` (it must listen on ``port``)."""
        if kind not in BROKER_KINDS:
            raise ValueError(f"unknown broker {kind!r}; one of {', '.join(BROKER_KINDS)}")
        if config is not None and kind != "mosquitto":
            raise ValueError("config is for Mosquitto only")
        self.kind = kind
        self.port = port
        self.workdir = Path(workdir)
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / f"{kind}-{port}.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        if self.kind == "amqtt":
            code = (
                "import sys; from nsync_mqtt.broker_embed import run_broker; "
                f"sys.exit(run_broker('127.0.0.1', {self.port}, None))"
            )
            return [sys.executable, "-c", code]
        if not MOSQUITTO.exists():
            raise RuntimeError(f"mosquitto is not installed ({MOSQUITTO} missing)")
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(self.config if self.config is not None else mosquitto_config(self.port))
        return [str(MOSQUITTO), "-c", str(conf)]

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> BrokerProcess:
        """Start the broker and wait until it listens; RuntimeError with its log if it does not."""
        if self.proc is not None:
            raise RuntimeError(f"{self.kind} broker on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_port(self.port, BROKER_START_TIMEOUT_S, self.proc)
        except (RuntimeError, TimeoutError) as err:
            self.stop()
            raise RuntimeError(
                f"{self.kind} broker did not start: {err}\n{self.log_tail()}"
            ) from err
        return self

    def kill(self) -> None:
        """Kill the broker abruptly (SIGKILL), as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class NodeSpec:
    id: str
    clock_offset: float = 0.0
    clock_drift_ppm: float = 0.0
    dac_drift_ppm: float = 0.0
    extra: list[str] = field(default_factory=list)
    # this node's broker, instead of the cluster's (e.g. a FaultProxy in front of it)
    broker_url: str | None = None
    # this node's timing, over the cluster's (e.g. a shorter election timeout)
    timing: dict[str, float] = field(default_factory=dict)
    # extra environment (e.g. PULSE_SINK, the PulseAudio sink of a stream sink)
    env: dict[str, str] = field(default_factory=dict)
    # this node's sink, instead of the cluster's
    sink: str | None = None


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
        signed: bool = True,
        ca_file: Path | None = None,
        broker_env: bool = False,
    ) -> None:
        """``ca_file``: the nodes' ``ca_file`` (and the watcher's and client's CA) for an
        ``mqtts://`` broker with a private CA. ``broker_env``: the nodes get their broker URL
        from ``$NSYNC_BROKER`` instead of ``--broker`` (a password stays off the command
        line)."""
        self.broker_url = broker_url
        self.ca_file = ca_file
        self.broker_env = broker_env
        # the recommended set-up: a cluster key, every internal message signed with it
        self.key_file: Path | None = Path(workdir) / "cluster.key" if signed else None
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
        running = self.procs.get(node)
        if running is not None and running.poll() is None:
            raise RuntimeError(f"node {node} is already running (pid {running.pid})")
        spec = self.specs[node]
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"{node}.yaml"
        settings = dict(self.settings)
        if self.timing or spec.timing:
            settings["timing"] = {**self.timing, **spec.timing}
        if self.key_file is not None:
            if not self.key_file.exists():
                write_key(self.key_file)
            settings.setdefault("key_file", str(self.key_file))
        if self.ca_file is not None:
            settings.setdefault("ca_file", str(self.ca_file))
        config.write_text(json.dumps(settings))
        broker_url = spec.broker_url or self.broker_url
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
            *([] if self.broker_env else ["--broker", broker_url]),
            "--data-dir",
            str(self.workdir / node),
            "--sink",
            spec.sink or self.sink,
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
        env = {**os.environ, **spec.env} if spec.env else None
        if self.broker_env:
            env = {**(env or os.environ), "NSYNC_BROKER": broker_url}
        self.procs[node] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
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

    def client(self, timeout: float = 3.0) -> NSyncClient:
        return NSyncClient(
            self.broker_url, self.cluster, timeout=timeout, ca_file=self.ca_file
        ).connect()

    def wait_ready(self, timeout_s: float = 30.0, calibrated: bool = True) -> dict[str, Any]:
        """Wait until every live node reports (afresh) one master, and each follower a calibrated
        clock and the master's state."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        with self.watch() as w:
            while time.monotonic() < deadline:
                states = w.node_states(live_only=True)
                masters = [n for n, s in states.items() if s.get("role") == "master"]
                ok = len(masters) == 1 and all(n in states for n in self.alive())
                if ok and calibrated:
                    ok = all(
                        states[n].get("role") == "master"
                        or (
                            (states[n].get("clock") or {}).get("calibrated")
                            and not states[n].get("recovering")
                        )
                        for n in self.alive()
                    )
                if ok:
                    return states
                last = states
                time.sleep(0.1)
        raise TimeoutError(f"cluster not ready in {timeout_s} s: {last}\n{self.logs_tail()}")

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watcher]:
        w = Watcher(self.broker_url, self.cluster, ca_file=self.ca_file)
        try:
            yield w
        finally:
            w.close()


def _subscribed_client(
    client_id: str,
    broker_url: str,
    subscriptions: Sequence[str],
    qos: int,
    on_message: Any,
    ca_file: Path | None = None,
) -> tuple[Any, threading.Event]:
    """A started paho client that (re)subscribes to ``subscriptions`` on every connect, and an
    event set once the broker acknowledges a subscription."""
    url = parse_broker_url(broker_url)
    client = new_paho_client(client_id, url, ca_file)
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe([(t, qos) for t in subscriptions])
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect_async(url.host, url.port)
    client.loop_start()
    return client, subscribed


class Watcher:
    """Follows the retained state topics of a cluster."""

    def __init__(self, broker_url: str, cluster: str, ca_file: Path | None = None) -> None:
        self._lock = threading.Lock()
        self.retained: dict[str, bytes] = {}
        self.live: set[str] = set()
        self.base = f"nsync/{cluster}"
        self._client, subscribed = _subscribed_client(
            f"watch-{uuid.uuid4().hex[:12]}",
            broker_url,
            [f"{self.base}/#"],
            0,
            self._on_message,
            ca_file,
        )
        subscribed.wait(5)  # a broker still starting is caught up with in the background

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if not msg.topic.startswith(f"{self.base}/"):
            return  # amqtt also hands out retained messages of other subscriptions
        with self._lock:
            self.retained[msg.topic] = msg.payload
            if not msg.retain:
                self.live.add(msg.topic)  # published since we subscribed, not a leftover

    def get(self, suffix: str) -> bytes | None:
        with self._lock:
            return self.retained.get(f"{self.base}/{suffix}")

    def json(self, suffix: str) -> Any:
        raw = self.get(suffix)
        return json.loads(raw) if raw else None

    def node_states(self, live_only: bool = False) -> dict[str, dict[str, Any]]:
        """Each node's retained state; with ``live_only``, only states published since the
        watcher subscribed (a restarted node's old retained state does not count)."""
        out = {}
        with self._lock:
            items = [(t, p) for t, p in self.retained.items() if not live_only or t in self.live]
        for topic, payload in items:
            parts = topic.split("/")
            if len(parts) == 5 and parts[2] == "node" and parts[4] == "state" and payload:
                with contextlib.suppress(ValueError, RecursionError):  # junk, deeply nested
                    out[parts[3]] = json.loads(payload)
        return out

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def unique_cluster_name() -> str:
    """A cluster name nothing else uses, so clusters can share a broker."""
    return f"t{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def ready_cluster(cluster: NodeCluster) -> Iterator[NodeCluster]:
    """Start ``cluster``, wait until it is ready, and stop it afterwards; AssertionError if a
    node does not exit cleanly."""
    cluster.start()
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        codes = cluster.stop()
        if any(code != 0 for code in codes.values()):
            raise AssertionError(f"unclean exit {codes}\n{cluster.logs_tail()}")


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class RawClient:
    """A plain MQTT client, talking to NSync the way Home Assistant or mosquitto_pub do; it
    records every message it hears on ``subscriptions``."""

    def __init__(
        self,
        broker_url: str,
        cluster: str,
        subscriptions: Sequence[str],
        client_id: str = "",
        ca_file: Path | None = None,
    ) -> None:
        self.topics = Topics(cluster)
        self.reply_to = client_id or f"raw-{uuid.uuid4().hex[:8]}"
        self.url = parse_broker_url(broker_url)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._client, subscribed = _subscribed_client(
            self.reply_to, broker_url, subscriptions, 1, self._on_message, ca_file
        )
        if not subscribed.wait(5):
            self.close()
            raise TimeoutError(f"{self.reply_to} could not subscribe on {self.url}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def mark(self) -> int:
        """A position in ``messages``, for ``since``/``wait`` to look only at what came after."""
        with self._cond:
            return len(self.messages)

    def since(self, mark: int) -> list[Message]:
        with self._cond:
            return self.messages[mark:]

    def wait(
        self, pred: Callable[[Message], bool], what: str, since: int = 0, timeout_s: float = 5.0
    ) -> Message:
        """The first message from ``since`` on that satisfies ``pred``, waiting for it."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for m in self.messages[since:]:
                    if pred(m):
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
                self._cond.wait(remaining)

    def wait_json(self, topic: str, what: str, since: int = 0, timeout_s: float = 5.0) -> Any:
        return json.loads(self.wait(lambda m: m.topic == topic, what, since, timeout_s).payload)

    def request(
        self, verb: str, body: dict[str, Any] | None = None, timeout_s: float = 5.0
    ) -> dict[str, Any]:
        """Publish a JSON command with reply_to and return its reply object."""
        req_id = f"{self.reply_to}-{next(self._ids)}"
        since = self.mark()
        payload = {**(body or {}), "client_req_id": req_id, "reply_to": self.reply_to}
        self.publish(self.topics.cmd(verb), json.dumps(payload))
        topic = self.topics.reply(self.reply_to)
        msg = self.wait(
            lambda m: m.topic == topic and json.loads(m.payload).get("client_req_id") == req_id,
            f"the reply to {verb}",
            since,
            timeout_s,
        )
        reply: dict[str, Any] = json.loads(msg.payload)
        return reply

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` if it is a success reply object; AssertionError naming it otherwise."""
    if reply.get("success") is not True or not set(reply) >= REPLY_KEYS:
        raise AssertionError(f"not a success reply: {reply}")
    return reply


def player_state(raw: RawClient) -> dict[str, Any]:
    """The master's player state (a status reply's), without what moves by itself."""
    state = dict(ok(raw.request("status"))["state"])
    for moving in ("position", "position_at", "nodes"):
        state.pop(moving)
    return state


def refused(reply: dict[str, Any], command: str, *words: str) -> str:
    """The message of a well-formed failure reply to ``command`` that contains every one of
    ``words``; AssertionError naming the reply otherwise."""
    if set(reply) != REPLY_KEYS or reply["success"] is not False or reply["command"] != command:
        raise AssertionError(f"not a refusal of {command!r}: {reply}")
    msg = str(reply["msg"])
    missing = [word for word in words if word not in msg]
    if missing:
        raise AssertionError(f"{missing} not in {msg!r}")
    return msg


def load_and_enqueue(client: NSyncClient, path: Path) -> str:
    """Load the song file ``path`` on the cluster, append it to the playlist, return its hash."""
    song = str(ok(client.load_song(path))["params"]["song"])
    ok(client.enqueue_song(song))
    return song


def tone_file(
    directory: Path, title: str, seconds: float, freq_hz: float, artist: str = "NSync demo"
) -> Path:
    """A tagged tone WAV named ``<title>.wav`` in ``directory``."""
    path = Path(directory) / f"{title}.wav"
    path.write_bytes(make_tone_wav(seconds, freq_hz, title, artist))
    return path
