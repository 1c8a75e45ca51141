"""`nsync demo`: a whole NSync cluster on this machine, with a live table.

The demo starts N node processes on loopback (the first one runs the embedded broker), gives each
node a clock that is off by up to an hour and drifts by tens of ppm, loads three short test tracks,
plays them, and shows twice a second what every node thinks (role, clock offset estimate) and what
its virtual DAC actually plays. The skew column is measured, not estimated: the virtual sinks log
the host time at which each block reaches their DAC, and all nodes share this machine's clock.

Without ``--seconds`` the demo runs until Ctrl-C. However it ends, it stops every node it started
and removes its temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt

from nsync_mqtt import sinklog, tones
from nsync_mqtt.bus import new_paho_client, parse_broker_url
from nsync_mqtt.client import NSyncClient, Reply
from nsync_mqtt.errors import NSyncError
from nsync_mqtt.messages import Topics
from nsync_mqtt.ports import free_port, port_open

CLUSTER = "home"
TRACKS = (("Demo A", 440.0), ("Demo B", 554.37), ("Demo C", 659.25))
TRACK_S = 12.0
BROKER_UP_TIMEOUT_S = 15.0
MASTER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
REFRESH_S = 0.5
PLAIN_REFRESH_S = 2.0
SKEW_WINDOW_S = 1.0
"""The skew is the largest spread over frames of the last second all nodes played."""
SKEW_SAMPLES = 10
STALE_BLOCK_S = 0.3
"""A node whose newest logged block ended longer ago than this is shown as silent."""
TAIL_BLOCKS = 400
LOG_TAIL_LINES = 15

CLEAR = "\x1b[H\x1b[2J"


def clock_settings(i: int) -> tuple[float, float]:
    """(offset seconds, drift ppm) of node ``i`` (0-based): nobody agrees on the time."""
    offsets = (0.0, 3600.5, -1234.25)
    drifts = (0.0, 40.0, -30.0)
    rnd = i // 3
    return offsets[i % 3] + rnd * 61.125 * (-1) ** rnd, drifts[i % 3] + rnd * 7.0


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child if the demo dies without cleaning up."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def setup() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return setup


class _Terminated(Exception):
    """The demo received SIGTERM."""


# ------------------------------------------------------------------ node processes


@dataclass
class NodeProc:
    id: str
    offset_s: float
    drift_ppm: float
    sink_log: Path
    out_log: Path
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.out_log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def start_node(
    node: NodeProc,
    peers: Sequence[str],
    url: str,
    data_dir: Path,
    sink: str,
    embed: str | None,
) -> None:
    cmd = [
        sys.executable, "-m", "nsync_mqtt", "node",
        "--id", node.id, "--peers", ",".join(peers), "--broker", url,
        "--data-dir", str(data_dir), "--sink", sink, "--sink-log", str(node.sink_log),
        "--clock-offset", repr(node.offset_s), "--clock-drift-ppm", repr(node.drift_ppm),
    ]  # fmt: skip
    if embed is not None:
        cmd += ["--embed-broker", embed]
    with node.out_log.open("ab") as out:
        node.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the nodes in order
            preexec_fn=_die_with_parent(),
        )


def stop_nodes(nodes: Sequence[NodeProc], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every started node, wait up to timeout_s, SIGKILL what is left."""
    running = [n.proc for n in nodes if n.proc is not None and n.proc.poll() is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


# ------------------------------------------------------------------ what the cluster publishes


class ClusterView:
    """The retained cluster state and node states, kept up to date by a paho subscriber."""

    def __init__(self, url: str, cluster: str = CLUSTER) -> None:
        self.topics = Topics(cluster)
        self._lock = threading.Lock()
        self.state: dict[str, Any] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.node_seen: dict[str, float] = {}  # host monotonic time of the last node state
        self.titles: dict[str, str] = {}
        self._url = parse_broker_url(url)
        self._client = new_paho_client(f"nsync-demo-view-{os.getpid()}", self._url)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self) -> None:
        self._client.connect_async(self._url.host, self._url.port, keepalive=10)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, ud: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", False):
            return
        t = self.topics
        client.subscribe([(t.state, 1), (t.library, 1), (f"{t.base}/node/+/state", 1)])

    def _on_message(self, client: mqtt.Client, ud: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        t = self.topics
        with self._lock:
            if msg.topic == t.state and isinstance(obj, dict):
                self.state = obj
            elif msg.topic == t.library and isinstance(obj, list):
                for song in obj:
                    if isinstance(song, dict) and song.get("hash") and song.get("title"):
                        self.titles[str(song["hash"])] = str(song["title"])
            elif msg.topic.endswith("/state") and isinstance(obj, dict):
                node = msg.topic[len(t.base) + len("/node/") : -len("/state")]
                self.nodes[node] = obj
                self.node_seen[node] = time.monotonic()

    def name(self, song: str, title: str) -> None:
        with self._lock:
            self.titles.setdefault(song, title)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                dict(self.state), dict(self.nodes), dict(self.node_seen), dict(self.titles)
            )


@dataclass(frozen=True)
class Snapshot:
    state: dict[str, Any]
    nodes: dict[str, dict[str, Any]]
    seen: dict[str, float]
    titles: dict[str, str]


class LogTail:
    """The newest blocks of a growing virtual sink log, read incrementally."""

    def __init__(self, path: Path, keep: int = TAIL_BLOCKS) -> None:
        self.path = path
        self.blocks: deque[sinklog.Block] = deque(maxlen=keep)
        self._offset = 0
        self._partial = b""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next poll
        for line in lines:
            try:
                o = json.loads(line)
                song = o["song"]
                block = sinklog.Block(
                    int(o["t_ns"]), song if isinstance(song, str) else None,
                    int(o["frame"]), int(o["frames"]), int(o["rate"]),
                )  # fmt: skip
            except (ValueError, KeyError, TypeError):
                continue
            self.blocks.append(block)

    @property
    def last(self) -> sinklog.Block | None:
        return self.blocks[-1] if self.blocks else None


def recent_skew_ns(logs: Mapping[str, Sequence[sinklog.Block]], song: str) -> int | None:
    """Largest spread between the nodes over the last second of ``song`` that all have played."""
    ends = []
    rate = 0
    for blocks in logs.values():
        mine = [b for b in blocks if b.song == song]
        if mine:
            ends.append(mine[-1].end_frame)
            rate = mine[-1].rate
    if len(ends) < 2:
        return None
    last = min(ends) - 1
    step = max(1, int(rate * SKEW_WINDOW_S / SKEW_SAMPLES))
    frames = [last - j * step for j in range(SKEW_SAMPLES) if last - j * step >= 0]
    return sinklog.max_skew(logs, song, frames)


# ------------------------------------------------------------------ the table


@dataclass
class Stats:
    commands: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    max_skew_ns: int | None = None
    skew_samples: int = 0

    def record(self, reply: Reply) -> Reply:
        verb = str(reply.get("command") or "?")
        self.commands[verb] += 1
        if not reply.get("success"):
            self.failed[verb] += 1
        return reply

    def skew(self, ns: int | None) -> None:
        if ns is None:
            return
        self.skew_samples += 1
        self.max_skew_ns = ns if self.max_skew_ns is None else max(self.max_skew_ns, ns)


def _ms(seconds: float | None, places: int = 3) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:+,.{places}f}"


def _title(song: str | None, titles: Mapping[str, str]) -> str:
    if not song:
        return "-"
    return titles.get(song, song[:10])


def true_offset_s(master: NodeProc, node: NodeProc, host_t: float) -> float:
    """What ``master clock - node clock`` really was at host monotonic time ``host_t``."""
    drift = (master.drift_ppm - node.drift_ppm) * 1e-6
    return master.offset_s - node.offset_s + host_t * drift


def render(
    nodes: Sequence[NodeProc],
    snap: Snapshot,
    tails: Mapping[str, LogTail],
    stats: Stats,
    skew_ns: int | None,
    elapsed_s: float,
    seconds: float | None = None,
    measured: bool = True,
) -> list[str]:
    state, titles = snap.state, snap.titles
    now_ns = time.monotonic_ns()
    by_id = {n.id: n for n in nodes}
    master = by_id.get(str(state.get("master")))
    ends = "Ctrl-C to stop" if seconds is None else f"ends after {seconds:g} s"
    lines = [
        f"NSync demo: {len(nodes)} nodes on loopback, playing for {elapsed_s:5.1f} s ({ends})",
        "",
        f"{'node':<5} {'role':<9} {'term':>4} {'clock set to':>22} {'offset est. (ms)':>17} "
        f"{'error (ms)':>10} {'plays':<8} {'at (s)':>6}",
    ]
    for n in nodes:
        ns = snap.nodes.get(n.id, {})
        role = str(ns.get("role", "?"))
        if not n.alive():
            role = f"exit {n.proc.poll() if n.proc is not None else '?'}"
        clk = ns.get("clock") or {}
        offset = clk.get("offset_s")
        offset_txt = error_txt = "-"
        if n is master:
            offset_txt = "(reference)"
        elif isinstance(offset, (int, float)) and master is not None and n.id in snap.seen:
            offset_txt = _ms(offset)
            if clk.get("calibrated"):
                error_txt = _ms(offset - true_offset_s(master, n, snap.seen[n.id]))
        set_txt = f"{n.offset_s:+.3f} s {n.drift_ppm:+.0f} ppm"
        b = tails[n.id].last
        playing, at = ("silent" if measured else "?"), "-"
        if b is not None and b.song and now_ns - b.time_of(b.end_frame) < STALE_BLOCK_S * 1e9:
            playing = _title(b.song, titles)
            k = b.frame + (now_ns - b.t_ns) * b.rate // 1_000_000_000
            at = f"{min(max(k, b.frame), b.end_frame - 1) / b.rate:.2f}"
        lines.append(
            f"{n.id:<5} {role:<9} {ns.get('term', '-')!s:>4} {set_txt:>22} {offset_txt:>17} "
            f"{error_txt:>10} {playing:<8} {at:>6}"
        )
    position = state.get("position")
    if isinstance(position, (int, float)) and state.get("playback") == "playing":
        at_wall = state.get("position_at")
        if isinstance(at_wall, (int, float)):
            position += max(0.0, time.time() - at_wall)
    pos_txt = f"{position:.1f} s" if isinstance(position, (int, float)) else "-"
    skew_txt = "-" if skew_ns is None else f"{skew_ns / 1e6:.3f} ms"
    worst = "-" if stats.max_skew_ns is None else f"{stats.max_skew_ns / 1e6:.3f} ms"
    title = state.get("title") or _title(state.get("song"), titles)
    lines += [
        "",
        f"master: {state.get('master') or '-'} (term {state.get('term', '-')})   "
        f"playback: {state.get('playback') or '-'}   title: {title}   position: {pos_txt}",
        f"skew between nodes, measured at their virtual DACs: {skew_txt} (max so far {worst})"
        if measured
        else "skew between nodes: not measured (sound card sinks keep no log)",
    ]
    return lines


# ------------------------------------------------------------------ the demo


def _make_tracks(folder: Path) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    use_mp3 = tones.ffmpeg_available()
    out = []
    for title, freq in TRACKS:
        stem = title.lower().replace(" ", "-")
        if use_mp3:
            path = folder / f"{stem}.mp3"
            path.write_bytes(tones.make_tone_mp3(TRACK_S, freq, title))
        else:
            path = folder / f"{stem}.wav"
            path.write_bytes(tones.make_tone_wav(TRACK_S, freq, title))
        out.append((title, path))
    return out


def _say(msg: str) -> None:
    print(msg, flush=True)


def _tails_of_logs(nodes: Sequence[NodeProc]) -> str:
    parts = []
    for n in nodes:
        parts.append(f"--- {n.id} ({n.out_log}):\n{n.tail()}")
    return "\n".join(parts)


class NodeDied(Exception):
    """A node of the demo exited: the demo stops and says which, and why."""

    def __init__(self, nodes: Sequence[NodeProc]) -> None:
        codes = ", ".join(
            f"{n.id} (exit {n.proc.returncode if n.proc is not None else '?'})" for n in nodes
        )
        super().__init__(f"node {codes} died; its log ends:\n{_tails_of_logs(nodes)}")


def _check_nodes(nodes: Sequence[NodeProc]) -> None:
    """Raise NodeDied if any node has exited: a demo that runs on with fewer nodes than it
    started would report a success it did not have."""
    dead = [n for n in nodes if n.proc is not None and n.proc.poll() is not None]
    if dead:
        raise NodeDied(dead)


def _wait_for_master(client: NSyncClient, nodes: Sequence[NodeProc], stats: Stats) -> bool:
    deadline = time.monotonic() + MASTER_TIMEOUT_S
    while time.monotonic() < deadline:
        _check_nodes(nodes)
        reply = client.request("status", timeout=1.0)
        if reply.get("success"):
            stats.record(reply)
            return True
        time.sleep(0.2)
    return False


def _ctrl_c_stops() -> None:
    """Ctrl-C (SIGINT) stops the demo, as its table says, even when it was started with SIGINT
    ignored (by a shell, as a background job of a script)."""
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises _Terminated inside the block, once: a second one cannot cut the cleanup."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while the nodes are being stopped."""
    try:
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def run_demo(speakers: int, seconds: float | None, audio: bool) -> int:
    """Run the demo; 0 on success, 1 if the cluster never came up or a node died, 2 on bad
    arguments."""
    if speakers < 1 or speakers % 2 == 0:
        print(f"nsync demo: --speakers must be odd (1, 3, 5, ...), got {speakers}", file=sys.stderr)
        return 2
    if seconds is not None and seconds <= 0:
        print(f"nsync demo: --seconds must be positive, got {seconds:g}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="nsync-demo-"))
    nodes: list[NodeProc] = []
    stats = Stats()
    code = 0
    _ctrl_c_stops()
    try:
        with _sigterm_raises():
            try:
                code = _run(tmp, nodes, stats, speakers, seconds, audio)
            except NodeDied as err:
                _say(f"nsync demo: {err}")
                code = 1
            except NSyncError as err:  # the cluster's broker did not answer, ...
                _say(f"nsync demo: {err}; the nodes' logs end:\n{_tails_of_logs(nodes)}")
                code = 1
            except KeyboardInterrupt:
                code = 0
            except _Terminated:
                code = 143
            finally:
                with _no_interrupts():
                    _say("\nstopping the nodes ...")
                    stop_nodes(nodes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sent = ", ".join(f"{verb} x{count}" for verb, count in sorted(stats.commands.items()))
    failed = sum(stats.failed.values())
    worst = "-" if stats.max_skew_ns is None else f"{stats.max_skew_ns / 1e6:.3f} ms"
    _say(
        f"summary: max skew seen {worst} over {stats.skew_samples} measurements; "
        f"commands sent: {sent or 'none'} ({failed} failed)"
        + ("" if code in (0, 143) else "; the demo FAILED (see above)")
    )
    return code


def _run(
    tmp: Path,
    nodes: list[NodeProc],
    stats: Stats,
    speakers: int,
    seconds: float | None,
    audio: bool,
) -> int:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    ids = [f"n{i + 1}" for i in range(speakers)]
    for i, node_id in enumerate(ids):
        offset, drift = clock_settings(i)
        nodes.append(
            NodeProc(node_id, offset, drift, tmp / f"{node_id}.jsonl", tmp / f"{node_id}.log")
        )
    sink = "auto" if audio else "virtual"
    _say(f"starting {speakers} nodes, broker {url} (embedded in n1), logs in {tmp}")
    first = nodes[0]
    start_node(first, ids, url, tmp / first.id, sink, f"127.0.0.1:{port}")
    deadline = time.monotonic() + BROKER_UP_TIMEOUT_S
    while not port_open(port):
        if not first.alive() or time.monotonic() > deadline:
            _say(f"the embedded broker in n1 did not come up:\n{_tails_of_logs(nodes[:1])}")
            return 1
        time.sleep(0.05)
    for n in nodes[1:]:
        start_node(n, ids, url, tmp / n.id, sink, None)
    _check_nodes(nodes)

    view = ClusterView(url)
    view.start()
    try:
        client = NSyncClient(url, CLUSTER, timeout=BROKER_UP_TIMEOUT_S).connect()
        client.timeout = 5.0  # per command, once connected
        with contextlib.closing(client):
            t0 = time.monotonic()
            if not _wait_for_master(client, nodes, stats):
                _say(f"no master was elected within {MASTER_TIMEOUT_S:g} s; node logs:")
                _say(_tails_of_logs(nodes))
                return 1
            _say(f"master elected after {time.monotonic() - t0:.1f} s")
            for title, path in _make_tracks(tmp / "tracks"):
                _check_nodes(nodes)
                t1 = time.monotonic()
                loaded = stats.record(client.load_song(path))
                if not loaded.get("success"):
                    _say(f"loading {title} failed: {loaded.get('msg')}\n{_tails_of_logs(nodes)}")
                    return 1
                song = str(loaded.get("params", {}).get("song", ""))
                view.name(song, title)
                queued = stats.record(client.request("enqueue", {"song": song}))
                if not queued.get("success"):
                    _say(f"enqueueing {title} failed: {queued.get('msg')}")
                    return 1
                _say(f"loaded and enqueued {title} ({path.name}) in {time.monotonic() - t1:.2f} s")
            played = stats.record(client.play())
            if not played.get("success"):
                _say(f"play failed: {played.get('msg')}")
                return 1
            return _live(nodes, view, stats, seconds, audio)
    finally:
        view.close()


def _live(
    nodes: Sequence[NodeProc],
    view: ClusterView,
    stats: Stats,
    seconds: float | None,
    audio: bool,
) -> int:
    """Show the table until ``seconds`` have passed (or forever); NodeDied if a node dies."""
    tty = sys.stdout.isatty()
    tails = {n.id: LogTail(n.sink_log) for n in nodes}
    start = time.monotonic()
    next_print = start
    lines: list[str] = []
    while True:
        now = time.monotonic()
        elapsed = now - start
        for t in tails.values():
            t.poll()
        snap = view.snapshot()
        song = snap.state.get("song")
        skew = None
        if isinstance(song, str):
            skew = recent_skew_ns({k: list(t.blocks) for k, t in tails.items()}, song)
            stats.skew(skew)
        lines = render(nodes, snap, tails, stats, skew, elapsed, seconds, not audio)
        if tty:
            sys.stdout.write(CLEAR + "\n".join(lines) + "\n")
            sys.stdout.flush()
        elif now >= next_print:
            _say("\n".join(lines[2:]) + "\n")
            next_print += PLAIN_REFRESH_S
            lines = []
        if seconds is not None and elapsed >= seconds:
            break
        _check_nodes(nodes)
        time.sleep(REFRESH_S)
    if not tty and lines:
        _say("\n".join(lines[2:]))
    return 0
