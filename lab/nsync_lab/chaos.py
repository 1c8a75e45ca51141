"""Chaos runs: a five-node NSync cluster under a seeded schedule of injected faults.

The cluster has the ordered broker list [first, second], both Mosquitto: every node reaches
the first broker through its own ``FaultProxy`` and the second one directly. A schedule drawn
from ``random.Random(seed)`` (``make_schedule``) lists faults that ``run_chaos`` injects one at a
time: kill -9 the master or up to f nodes (restarted later on the same data dir), SIGSTOP a
node for a few seconds, cut one node's broker link, delay it, kill -9 the first broker
(restarted on its port; the nodes fail over to the second one and come back). Meanwhile a
client keeps issuing enqueue, play, pause and forward with a short timeout through whichever
broker serves (the first, else the second) and records every reply. After each fault the
cluster heals (nodes and broker restarted, links healed) and must be ready again on the first
broker (one master, every follower calibrated) before the next one.

At the end ``run_chaos`` checks the invariants (``INVARIANTS``) from what it recorded: the
node states seen live on either broker, the client's replies, the nodes' durable state files
and the virtual-sink logs (ground truth of what each node played, and when). The pure checkers
below take those records as plain values, so they are tested on their own. A failing run's
``ChaosResult.report()`` names the seed and the schedule that reproduce it.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import threading
import time
import uuid
import wave
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nsync_lab.faultproxy import FaultProxy
from nsync_lab.testing import (
    BrokerProcess,
    NodeCluster,
    NodeSpec,
    RawClient,
    Watcher,
    _subscribed_client,
    free_port,
    ok,
    tone_file,
    unique_cluster_name,
)
from nsync_mqtt import sinklog
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.messages import Topics
from nsync_mqtt.persist import StateFile
from nsync_mqtt.playlist import RATE, playlist_hash
from nsync_mqtt.replication import sha224_file
from nsync_mqtt.timing import Timing

KINDS = ("kill_master", "kill_f", "stop", "cut", "delay", "kill_broker")
MASTER = "master"  # a fault target resolved, when the fault starts, to the current master
INVARIANTS = (
    "one_master_per_term",
    "acked_enqueues_kept",
    "agreement_after_heal",
    "no_gap_for_survivors",
    "rejoin_in_sync",
    "clean_exit",
)
PLAYBACK_VERBS = frozenset({"play", "pause", "forward"})
GAP_TOLERANCE_NS = 2_000_000  # a block boundary off by more than this is a gap
SKEW_TOLERANCE_NS = 5_000_000  # "the same frames at the same instants, within a few ms"
MATCH_WINDOW_NS = 500_000_000  # a frame played again later is another playing of it
PROBE_INTERVAL_S = 0.05
PROBE_VOLUME = 50
SETTLE_S = 0.3  # after the cluster is ready, before a rejoined node's frames count
READY_TIMEOUT_S = 40.0
AGREE_TIMEOUT_S = 10.0
MASTER_LOG_RE = re.compile(r"node (\S+) is master for term (\d+)")
# node log lines worth a note on the fault they happened in
CUT_OFF_LOG = " is cut off ("  # stopped playing: no master and no quorum in reach
FAILOVER_LOG = "broker unreachable, trying "  # moved on to the next broker of its list
MOVED_BACK_LOG = " is reachable again: moving back"  # returned to an earlier broker
RECONNECT_DELAY_S = 1  # the test clients retry a lost broker at least this often
OBSERVERS_BACK_TIMEOUT_S = 5.0


# -- the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One fault: ``targets`` are node ids or ``MASTER`` (none for ``kill_broker``: the first
    broker is hit); held ``hold_s``, then healed."""

    kind: str
    targets: tuple[str, ...]
    hold_s: float
    delay_s: float = 0.0

    def __str__(self) -> str:
        extra = f" +{self.delay_s * 1e3:.0f}ms" if self.kind == "delay" else ""
        what = ",".join(self.targets) + extra
        return f"{self.kind}({what + ', ' if what else ''}{self.hold_s:.1f}s)"


def make_schedule(
    rng: random.Random,
    nodes: Sequence[str],
    count: int,
    cover: bool = True,
    kinds: Sequence[str] = KINDS,
) -> list[Fault]:
    """``count`` faults drawn from ``rng``; with ``cover``, the first ones are every kind once
    (in a random order; a random choice of distinct kinds if ``count`` is smaller), so even a
    short run injects each kind."""
    f = (len(nodes) - 1) // 2
    order: list[str] = []
    if cover:
        order = list(kinds)
        rng.shuffle(order)
        del order[count:]
    order += [rng.choice(list(kinds)) for _ in range(count - len(order))]
    out = []
    for kind in order:
        some = MASTER if rng.random() < 0.5 else rng.choice(list(nodes))  # the master or any
        if kind == "kill_master":
            out.append(Fault(kind, (MASTER,), round(rng.uniform(1.5, 3.0), 2)))
        elif kind == "kill_f":
            victims = tuple(sorted(rng.sample(list(nodes), rng.randint(1, f))))
            out.append(Fault(kind, victims, round(rng.uniform(1.5, 3.0), 2)))
        elif kind == "stop":
            out.append(Fault(kind, (some,), round(rng.uniform(1.0, 3.0), 2)))
        elif kind == "cut":
            out.append(Fault(kind, (some,), round(rng.uniform(1.5, 3.0), 2)))
        elif kind == "delay":
            delay = round(rng.uniform(0.02, 0.1), 3)
            out.append(Fault(kind, (some,), round(rng.uniform(2.0, 4.0), 2), delay))
        elif kind == "kill_broker":
            out.append(Fault(kind, (), round(rng.uniform(2.0, 4.0), 2)))
        else:
            raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")
    return out


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One client command: sent and answered (or timed out) at host-monotonic seconds."""

    t_sent: float
    t_done: float
    verb: str
    song: str | None
    success: bool
    msg: str


@dataclass(frozen=True)
class Transition:
    """A node's retained state changed role or term, as seen live on the broker."""

    t: float
    node: str
    role: str
    term: int


@dataclass(frozen=True)
class PlaybackChange:
    """The master published a playback that does not continue the previous one (a new song,
    slot or position, a pause...): the sinks may change what they play from ``t`` on."""

    t: float
    master: str
    term: int


@dataclass
class FaultRecord:
    index: int
    fault: Fault
    nodes: tuple[str, ...] = ()  # the targets, resolved
    master_before: str | None = None
    t_start: float = 0.0
    t_heal: float = 0.0
    t_ready: float = 0.0
    t_end: float = 0.0  # when the next fault started (or the run ended)
    outage_s: float | None = None  # fault -> first successful command, if the master was hit
    notes: list[str] = field(default_factory=list)

    @property
    def hit_master(self) -> bool:
        """The fault took the master away from the cluster: it hit the master's node or link,
        or killed the broker the master was on."""
        if self.fault.kind == "kill_broker":
            return True
        return self.master_before in self.nodes and self.fault.kind != "delay"


# -- the pure checkers ---------------------------------------------------------------------


def double_masters(transitions: Iterable[Transition]) -> list[str]:
    """Terms in which more than one node was master."""
    masters: dict[int, set[str]] = {}
    for tr in transitions:
        if tr.role == "master":
            masters.setdefault(tr.term, set()).add(tr.node)
    return [f"term {t}: masters {sorted(ns)}" for t, ns in sorted(masters.items()) if len(ns) > 1]


def master_log_transitions(node: str, text: str) -> list[Transition]:
    """The 'is master for term N' lines of a node's log, as transitions (no time)."""
    return [
        Transition(0.0, m.group(1), "master", int(m.group(2)))
        for m in MASTER_LOG_RE.finditer(text)
        if m.group(1) == node
    ]


def is_subsequence(needle: Sequence[str], haystack: Sequence[str]) -> bool:
    it = iter(haystack)
    return all(any(x == y for y in it) for x in needle)


def enqueue_problems(replies: Sequence[Reply], playlists: Mapping[str, Sequence[str]]) -> list[str]:
    """Every node's final playlist is the same; the acknowledged enqueues are in it in the order
    they were acknowledged; no song is in it more often than it was asked for."""
    problems = []
    lists = {tuple(p) for p in playlists.values()}
    if len(lists) > 1:
        summary = {
            n: f"{len(p)} songs, hash {playlist_hash(tuple(p))[:8]}" for n, p in playlists.items()
        }
        problems.append(f"final playlists differ: {summary}")
    enqueues = sorted((r for r in replies if r.verb == "enqueue"), key=lambda r: r.t_done)
    acked = [r.song for r in enqueues if r.success and r.song]
    asked = Counter(r.song for r in enqueues)
    for node, plist in sorted(playlists.items()):
        if not is_subsequence(acked, plist):
            held = Counter(plist)
            short = {s[:8]: (held[s], n) for s, n in Counter(acked).items() if held[s] < n}
            problems.append(
                f"{node}: the {len(acked)} acknowledged enqueues are not a subsequence of its "
                f"{len(plist)}-song playlist (held, acked): {short or 'order differs'}"
            )
        extra = {s[:8]: (n, asked[s]) for s, n in Counter(plist).items() if n > asked[s]}
        if extra:
            problems.append(f"{node}: songs more often than enqueued (held, asked): {extra}")
    return problems


def disagreement(states: Mapping[str, Mapping[str, Any]]) -> str | None:
    """None if every node reports the same playlist hash and last operation (term, index)."""
    seen = {(s.get("playlist_hash"), s.get("index"), _last_term(s)) for s in states.values()}
    if len(seen) <= 1:
        return None
    return "; ".join(
        f"{n}: {str(s.get('playlist_hash'))[:8]}@({_last_term(s)},{s.get('index')})"
        for n, s in sorted(states.items())
    )


def _last_term(state: Mapping[str, Any]) -> Any:
    last = state.get("last_op")
    return last.get("term") if isinstance(last, Mapping) else None


def _end_ns(b: sinklog.Block) -> int:
    return b.t_ns + round(b.frames * 1e9 / b.rate)


@dataclass(frozen=True)
class Break:
    """Where a node's playback did not continue: its block ending at ``t_ns`` (song
    ``from_song`` up to ``from_frame``) was followed at ``next_t_ns`` by ``to_song`` from
    ``to_frame``; for a node that stopped, ``next_t_ns`` and ``to_song`` are None."""

    t_ns: int
    next_t_ns: int | None
    from_song: str | None
    from_frame: int
    to_song: str | None
    to_frame: int
    what: str

    def __str__(self) -> str:
        if self.next_t_ns is None:
            return f"stopped playing at t={self.t_ns / 1e9:.3f}"
        return (
            f"{self.what} at t={self.t_ns / 1e9:.3f}: {str(self.from_song)[:8]} frame "
            f"{self.from_frame} -> {str(self.to_song)[:8]} frame {self.to_frame}"
        )

    def matches(self, other: Break, tolerance_ns: int = SKEW_TOLERANCE_NS) -> bool:
        """The same change of playback, at the same instants, on another node."""
        if self.to_song != other.to_song or abs(self.t_ns - other.t_ns) > tolerance_ns:
            return False
        if self.next_t_ns is None or other.next_t_ns is None:
            return self.next_t_ns is other.next_t_ns
        frames = tolerance_ns * RATE // 1_000_000_000
        return (
            abs(self.next_t_ns - other.next_t_ns) <= tolerance_ns
            and abs(self.to_frame - other.to_frame) <= frames
        )


def continuity_breaks(
    blocks: Sequence[sinklog.Block],
    t0_ns: int,
    t1_ns: int,
    song_frames: Mapping[str, int],
    excused_ns: Sequence[tuple[int, int]],
) -> tuple[bool, list[Break]]:
    """Did a node that was playing at ``t0_ns`` keep playing without a gap until ``t1_ns``?

    Returns (playing at t0, breaks). A break in time or frames between two blocks is excused
    where the song ended by itself or where it falls in one of ``excused_ns`` (the master
    changed the playback then).
    """
    i = next((k for k, b in enumerate(blocks) if _end_ns(b) > t0_ns), None)
    if i is None or blocks[i].t_ns > t0_ns + GAP_TOLERANCE_NS:
        return False, []
    problems: list[Break] = []
    for a, b in zip(blocks[i:], blocks[i + 1 :], strict=False):
        end = _end_ns(a)
        if end >= t1_ns:
            break
        gap = b.t_ns - end
        same = a.song == b.song or a.song is None or b.song is None  # None: not decoded yet
        skipped = round((b.frame - a.end_frame) * 1e9 / a.rate) - gap  # audio lost, in ns
        if abs(gap) <= GAP_TOLERANCE_NS and same and abs(skipped) <= GAP_TOLERANCE_NS:
            continue  # continuous, or re-anchored by a fraction of a ms
        if a.song is not None and a.end_frame >= song_frames.get(a.song, 1 << 62):
            return True, problems  # the song ended by itself; the next one starts later
        if _within(end, excused_ns) and _within(b.t_ns, excused_ns):
            continue
        what = f"gap {gap / 1e6:.1f} ms" if abs(gap) > GAP_TOLERANCE_NS else "a jump"
        if abs(gap) <= GAP_TOLERANCE_NS and same:
            what = f"a jump of {skipped / 1e6:.1f} ms"
        problems.append(Break(end, b.t_ns, a.song, a.end_frame, b.song, b.frame, what))
    else:
        last = blocks[-1]
        natural = last.song is not None and last.end_frame >= song_frames.get(last.song, 1 << 62)
        end = _end_ns(last)
        if end < t1_ns and not natural and not _within(end, excused_ns):
            problems.append(Break(end, None, last.song, last.end_frame, None, 0, "stopped"))
    return True, problems


def continuity_problems(
    blocks: Sequence[sinklog.Block],
    t0_ns: int,
    t1_ns: int,
    song_frames: Mapping[str, int],
    excused_ns: Sequence[tuple[int, int]],
) -> tuple[bool, list[str]]:
    """``continuity_breaks``, described."""
    playing, breaks = continuity_breaks(blocks, t0_ns, t1_ns, song_frames, excused_ns)
    return playing, [str(b) for b in breaks]


def unexplained_breaks(
    breaks: Mapping[str, Sequence[Break]], maybe_ns: Sequence[tuple[int, int]]
) -> dict[str, list[Break]]:
    """The breaks left once those the whole cluster made together are set aside.

    ``breaks`` holds, for every node that was playing through a fault, the breaks no observed
    playback change explains. A break counts as the cluster's own (a command applied while the
    observers could not see the master, say on a broker being killed) only if every one of
    these nodes made the same break at the same instants and it falls in one of ``maybe_ns``
    (a playback command was in flight). A break on some nodes only is left in."""
    out: dict[str, list[Break]] = {}
    for node, own in breaks.items():
        others = [b for n, b in breaks.items() if n != node]
        out[node] = [
            b
            for b in own
            if not (
                others
                and _within(b.t_ns, maybe_ns)
                and (b.next_t_ns is None or _within(b.next_t_ns, maybe_ns))
                and all(any(b.matches(o) for o in theirs) for theirs in others)
            )
        ]
    return out


def _within(t_ns: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(lo <= t_ns <= hi for lo, hi in spans)


def rejoin_skew_ns(
    node_blocks: Sequence[sinklog.Block],
    others: Mapping[str, Sequence[sinklog.Block]],
    t0_ns: int,
    t1_ns: int,
) -> int | None:
    """Largest |skew| between the first frame of each block ``node_blocks`` played within
    [t0_ns, t1_ns) and the same frame played by each of ``others`` around the same time."""
    worst: int | None = None
    for b in node_blocks:
        if b.song is None or not t0_ns <= b.t_ns < t1_ns:
            continue
        for blocks in others.values():
            t = _nearest(blocks, b.song, b.frame, b.t_ns)
            if t is not None:
                skew = abs(b.t_ns - t)
                worst = skew if worst is None else max(worst, skew)
    return worst


def _nearest(blocks: Sequence[sinklog.Block], song: str, k: int, t_ns: int) -> int | None:
    best: int | None = None
    for b in blocks:
        if b.t_ns > t_ns + MATCH_WINDOW_NS:
            break
        if b.t_ns >= t_ns - MATCH_WINDOW_NS - 60_000_000 and b.contains(song, k):
            t = b.time_of(k)
            if abs(t - t_ns) <= MATCH_WINDOW_NS and (
                best is None or abs(t - t_ns) < abs(best - t_ns)
            ):
                best = t
    return best


def _between(blocks: Sequence[sinklog.Block], t0_ns: int, t1_ns: int) -> list[sinklog.Block]:
    return [b for b in blocks if _end_ns(b) > t0_ns and b.t_ns < t1_ns]


# -- live recorders ------------------------------------------------------------------------


class Recorder(Watcher):
    """A Watcher on every broker of the cluster's list (what it hears on each is merged: a node
    publishes on one broker at a time) that also keeps every role/term transition of every node
    and every change of the master's playback, with the time it saw them."""

    def __init__(self, broker_urls: Sequence[str], cluster: str) -> None:
        self.transitions: list[Transition] = []
        self.changes: list[PlaybackChange] = []
        self._roles: dict[str, tuple[str, int]] = {}
        self._last_playback: tuple[Any, ...] | None = None
        super().__init__(broker_urls[0], cluster)
        self._client.reconnect_delay_set(RECONNECT_DELAY_S, RECONNECT_DELAY_S)
        self._others: list[Any] = []
        for url in broker_urls[1:]:
            client, subscribed = _subscribed_client(
                f"watch-{uuid.uuid4().hex[:12]}", url, [f"{self.base}/#"], 0, self._on_message
            )
            client.reconnect_delay_set(RECONNECT_DELAY_S, RECONNECT_DELAY_S)
            self._others.append(client)
            subscribed.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        super()._on_message(client, userdata, msg)
        if msg.retain or not msg.payload:
            return
        now = time.monotonic()
        parts = msg.topic.split("/")
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        with self._lock:
            if len(parts) == 5 and parts[2] == "node" and parts[4] == "state":
                role = (str(doc.get("role")), int(doc.get("term") or 0))
                if self._roles.get(parts[3]) != role:
                    self._roles[parts[3]] = role
                    self.transitions.append(Transition(now, parts[3], *role))
            elif len(parts) == 3 and parts[2] == "state":
                self._on_playback(now, doc)

    def _on_playback(self, now: float, doc: dict[str, Any]) -> None:
        playing = doc.get("playback") == "playing"
        pos = float(doc.get("position") or 0.0)
        wall = float(doc.get("position_at") or 0.0)
        key = (doc.get("master"), doc.get("term"), doc.get("playback"), doc.get("slot"))
        anchor = pos - wall if playing else pos  # constant while playing on
        last = self._last_playback
        self._last_playback = (*key, anchor)
        if last is None or last[:2] != key[:2]:
            return  # a new master's first state: it changes nothing by itself
        if last[2:4] != key[2:4] or abs(last[4] - anchor) > 0.1:
            self.changes.append(PlaybackChange(now, str(doc.get("master")), int(doc["term"])))

    def snapshot(self) -> tuple[list[Transition], list[PlaybackChange]]:
        with self._lock:
            return list(self.transitions), list(self.changes)

    def connected(self) -> bool:
        """Connected to every broker (and so subscribed or about to be)."""
        return all(c.is_connected() for c in (self._client, *self._others))

    def close(self) -> None:
        for client in self._others:
            client.disconnect()
            client.loop_stop()
        super().close()


class Workload:
    """A client thread issuing enqueue, play, pause and forward at random, recording replies.

    It has a client per broker of the cluster's list and sends each command through the first;
    a command that hears no reply there is sent again through the next (each attempt is a reply
    of its own: an unanswered one may still have been applied)."""

    WEIGHTS: ClassVar[dict[str, int]] = {"enqueue": 4, "play": 3, "pause": 1, "forward": 2}

    def __init__(
        self,
        clients: Sequence[NSyncClient],
        songs: Sequence[str],
        rng: random.Random,
        interval_s: float,
    ) -> None:
        self.clients = list(clients)
        self.songs = list(songs)
        self.rng = rng
        self.interval_s = interval_s
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._go = threading.Event()  # cleared while paused
        self._go.set()
        self._busy = threading.Lock()  # held while a command is in flight
        self._thread = threading.Thread(target=self._run, name="chaos-workload", daemon=True)

    def start(self) -> Workload:
        self._thread.start()
        return self

    def pause(self) -> None:
        """Issue no further command (returns once the one in flight is answered)."""
        self._go.clear()
        with self._busy:
            pass

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def add(self, reply: Reply) -> None:
        with self._lock:
            self.replies.append(reply)

    def snapshot(self) -> list[Reply]:
        with self._lock:
            return list(self.replies)

    def _run(self) -> None:
        verbs, weights = zip(*self.WEIGHTS.items(), strict=True)
        while not self._stop.is_set():
            self._go.wait()
            with self._busy:
                if self._stop.is_set() or not self._go.is_set():
                    continue
                verb = self.rng.choices(verbs, weights)[0]
                song = self.rng.choice(self.songs) if verb == "enqueue" else None
                for client in self.clients:
                    if self._send(client, verb, song):
                        break
            self._stop.wait(self.rng.uniform(0.5, 1.5) * self.interval_s)

    def _send(self, client: NSyncClient, verb: str, song: str | None) -> bool:
        """Send one command and record its reply; False if nothing answered it."""
        t0 = time.monotonic()
        answered = True
        try:
            r = client.enqueue_song(song) if song else client.request(verb)
            success, msg = r.get("success") is True, str(r.get("msg"))
            answered = success or not msg.startswith("no reply")
        except Exception as err:  # a broken client connection is a failed command too
            success, msg, answered = False, f"client error: {err!r}", False
        self.add(Reply(t0, time.monotonic(), verb, song, success, msg))
        return answered


class Probe:
    """Times how long the cluster cannot serve: publishes a volume command every 50 ms on every
    broker of the cluster's list until a master acknowledges one."""

    def __init__(self, broker_urls: Sequence[str], cluster: str) -> None:
        self.name = f"probe-{uuid.uuid4().hex[:8]}"
        self.topics = Topics(cluster)
        self.raws: list[RawClient] = []
        try:
            for url in broker_urls:
                raw = RawClient(url, cluster, [self.topics.reply(self.name)], client_id=self.name)
                self.raws.append(raw)
                raw._client.reconnect_delay_set(RECONNECT_DELAY_S, RECONNECT_DELAY_S)
        except Exception:
            self.close()
            raise
        self._ids = 0

    def first_success(self, until: float) -> tuple[float, float] | None:
        """(sent, answered) of the first command acknowledged before ``until``, or None."""
        topic = self.topics.reply(self.name)
        sent: dict[str, float] = {}
        marks = [raw.mark() for raw in self.raws]
        while time.monotonic() < until:
            for raw in self.raws:
                self._ids += 1
                req = f"{self.name}-{self._ids}"
                sent[req] = time.monotonic()
                body = {"volume": PROBE_VOLUME, "client_req_id": req, "reply_to": self.name}
                # QoS 0 and no waiting: a broker that is down drops it (nothing queued for later)
                raw._client.publish(self.topics.cmd("volume"), json.dumps(body), qos=0)
            for raw, mark in zip(self.raws, marks, strict=True):
                for m in raw.since(mark):
                    if m.topic != topic:
                        continue
                    with contextlib.suppress(ValueError, AttributeError):
                        r = json.loads(m.payload)
                        if r.get("success") is True and r.get("client_req_id") in sent:
                            return sent[r["client_req_id"]], time.monotonic()
            time.sleep(PROBE_INTERVAL_S)
        return None

    def connected(self) -> bool:
        return all(raw._client.is_connected() for raw in self.raws)

    def close(self) -> None:
        for raw in self.raws:
            raw.close()


# -- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosConfig:
    seed: int
    faults: int
    workdir: Path
    nodes: int = 5
    songs: int = 4
    song_s: tuple[float, float] = (3.0, 6.0)
    steady_s: float = 1.5  # in step after each heal, before the next fault
    client_timeout_s: float = 1.0
    client_interval_s: float = 0.4
    cover: bool = True
    kinds: tuple[str, ...] = KINDS


@dataclass
class ChaosResult:
    seed: int
    schedule: list[Fault]
    records: list[FaultRecord] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    violations: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in INVARIANTS})
    checked: Counter[str] = field(default_factory=Counter)
    rejoin_skews_ms: list[float] = field(default_factory=list)
    # survivor breaks set aside as the cluster's own change (made by all, a command in flight)
    cluster_changes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and not any(self.violations.values())

    def election_times_s(self) -> list[float]:
        return [r.outage_s for r in self.records if r.hit_master and r.outage_s is not None]

    def report(self) -> str:
        lines = [
            f"chaos seed {self.seed}: {len(self.records)} of {len(self.schedule)} faults in "
            f"{self.duration_s:.0f} s, {'passed' if self.passed else 'FAILED'}",
            "schedule: " + "; ".join(str(f) for f in self.schedule),
        ]
        for r in self.records:
            outage = f", outage {r.outage_s:.2f} s" if r.outage_s is not None else ""
            lines.append(
                f"  #{r.index} {r.fault} on {','.join(r.nodes) or 'the first broker'} "
                f"(master {r.master_before}){outage}"
                + (f" [{'; '.join(r.notes)}]" if r.notes else "")
            )
        for name in INVARIANTS:
            bad = self.violations[name]
            lines.append(f"{name}: {'ok' if not bad else 'VIOLATED'} ({self.checked[name]} checks)")
            lines.extend(f"    {v}" for v in bad[:20])
        if self.cluster_changes:
            lines.append(
                f"set aside as changes the whole cluster made together while a playback command "
                f"was in flight: {len(self.cluster_changes)}"
            )
            lines.extend(f"    {c}" for c in self.cluster_changes[:20])
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "schedule": [str(f) for f in self.schedule],
            "passed": self.passed,
            "error": self.error,
            "duration_s": round(self.duration_s, 1),
            "faults": [
                {
                    **{k: v for k, v in asdict(r).items() if k != "fault"},
                    "fault": str(r.fault),
                    "kind": r.fault.kind,
                    "hit_master": r.hit_master,
                }
                for r in self.records
            ],
            "invariants": {
                k: {"checks": self.checked[k], "violations": v} for k, v in self.violations.items()
            },
            "commands": {
                f"{verb}:{'ok' if s else 'failed'}": n
                for (verb, s), n in sorted(
                    Counter((r.verb, r.success) for r in self.replies).items()
                )
            },
            "election_times_s": [round(x, 3) for x in self.election_times_s()],
            "rejoin_skews_ms": [round(x, 3) for x in self.rejoin_skews_ms],
            "cluster_changes": self.cluster_changes,
        }


class _Run:
    """The processes and recorders of one chaos run, all stopped by ``close``."""

    def __init__(self, cfg: ChaosConfig, result: ChaosResult) -> None:
        self.cfg = cfg
        self.result = result
        self.timing = Timing()
        self.ids = [f"n{i + 1}" for i in range(cfg.nodes)]
        self.broker: BrokerProcess | None = None  # the first of the list, behind the proxies
        self.second: BrokerProcess | None = None  # the second, reached directly
        self.proxies: dict[str, FaultProxy] = {}
        self.cluster: NodeCluster | None = None
        self.recorder: Recorder | None = None
        self.probe: Probe | None = None
        self.clients: list[NSyncClient] = []
        self.workload: Workload | None = None
        self.stopped: set[str] = set()  # SIGSTOPped nodes
        self.song_frames: dict[str, int] = {}

    # -- setup and teardown

    def start(self) -> None:
        cfg = self.cfg
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = BrokerProcess("mosquitto", free_port(), cfg.workdir).start()
        self.second = BrokerProcess("mosquitto", free_port(), cfg.workdir).start()
        urls = [self.broker.url, self.second.url]
        for n in self.ids:
            self.proxies[n] = FaultProxy("127.0.0.1", self.broker.port).start()
        specs = [
            NodeSpec(
                n,
                broker_url=f"mqtt://127.0.0.1:{self.proxies[n].port}",
                extra=["--broker", self.second.url],
            )
            for n in self.ids
        ]
        name = unique_cluster_name()
        self.cluster = NodeCluster(self.broker.url, cfg.workdir / "cluster", specs, cluster=name)
        self.recorder = Recorder(urls, name)
        self.cluster.start()
        self.cluster.wait_ready(READY_TIMEOUT_S)
        self.probe = Probe(urls, name)
        rng = random.Random(f"{cfg.seed}-songs")
        songs = []
        with contextlib.closing(self.cluster.client(timeout=5.0)) as setup:
            for i in range(cfg.songs):
                seconds = round(rng.uniform(*cfg.song_s), 2)
                path = tone_file(cfg.workdir, f"Chaos {i}", seconds, 300.0 + 60 * i)
                ok(setup.load_song(path))
                song = sha224_file(path)
                with wave.open(str(path), "rb") as w:
                    self.song_frames[song] = w.getnframes()
                songs.append(song)
        for url in urls:
            client = NSyncClient(url, name, timeout=cfg.client_timeout_s)
            client._client.reconnect_delay_set(RECONNECT_DELAY_S, RECONNECT_DELAY_S)
            self.clients.append(client.connect())
        self.workload = Workload(
            self.clients, songs, random.Random(f"{cfg.seed}-client"), cfg.client_interval_s
        ).start()

    def close(self) -> None:
        """Stop everything this run started, each by its own handle, whatever state it is in."""
        if self.workload is not None:
            self.workload.stop()
        for closer in (*self.clients, self.probe, self.recorder):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        if self.cluster is not None:
            for n in list(self.stopped):
                self._signal(n, signal.SIGCONT)
            self.cluster.stop()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.stop()
        for broker in (self.broker, self.second):
            if broker is not None:
                broker.stop()

    # -- faults

    def _signal(self, node: str, sig: int) -> None:
        assert self.cluster is not None
        proc = self.cluster.procs.get(node)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(node)
        elif sig == signal.SIGCONT:
            self.stopped.discard(node)

    def _master(self) -> str | None:
        assert self.recorder is not None
        states = self.recorder.node_states(live_only=True)
        masters = sorted(
            (s.get("term", 0), n) for n, s in states.items() if s.get("role") == "master"
        )
        return masters[-1][1] if masters else None

    def inject(self, rec: FaultRecord) -> None:
        assert self.cluster is not None and self.probe is not None
        fault = rec.fault
        rec.master_before = self._master()
        resolved = (rec.master_before if t == MASTER else t for t in fault.targets)
        rec.nodes = tuple(dict.fromkeys(n for n in resolved if n))
        logs_at = self._log_sizes()
        if fault.kind == "kill_broker":
            assert self.broker is not None
            self.broker.kill()
        rec.t_start = time.monotonic()
        for n in rec.nodes:
            if fault.kind in ("kill_master", "kill_f"):
                self.cluster.stop_node(n, signal.SIGKILL)
            elif fault.kind == "stop":
                self._signal(n, signal.SIGSTOP)
            elif fault.kind == "cut":
                self.proxies[n].cut()
            elif fault.kind == "delay":
                self.proxies[n].delay(fault.delay_s)
        heal_at = rec.t_start + fault.hold_s
        first = self.probe.first_success(heal_at) if rec.hit_master else None
        time.sleep(max(0.0, heal_at - time.monotonic()))
        self.restore(rec)
        if rec.hit_master and first is None:  # not served before the heal: time it on
            first = self.probe.first_success(time.monotonic() + READY_TIMEOUT_S)
            rec.notes.append("no master until healed")
        if first is not None:
            rec.outage_s = first[1] - rec.t_start
            assert self.workload is not None
            self.workload.add(Reply(first[0], first[1], "volume", None, True, "probe"))
        self.cluster.wait_ready(READY_TIMEOUT_S)
        rec.t_ready = time.monotonic()
        self._note_logs(rec, logs_at)

    def restore(self, rec: FaultRecord) -> None:
        assert self.cluster is not None
        if rec.fault.kind == "kill_broker":
            self._restart_broker()
        for n in rec.nodes:
            if rec.fault.kind in ("kill_master", "kill_f"):
                self.cluster.start_node(n)
            elif rec.fault.kind == "stop":
                self._signal(n, signal.SIGCONT)
            elif rec.fault.kind == "cut":
                self.proxies[n].heal()
            elif rec.fault.kind == "delay":
                self.proxies[n].delay(0.0)
        rec.t_heal = time.monotonic()

    def _restart_broker(self) -> None:
        """Start the first broker again on its port, and let the nodes reach it through their
        proxies only once the recorder, the probe and the clients are back on it (a node's
        first states there must not go unseen)."""
        assert self.broker is not None and self.recorder is not None and self.probe is not None
        for proxy in self.proxies.values():
            proxy.cut()  # to a node, no different from the dead broker behind the proxy
        try:
            self.broker.start()
            deadline = time.monotonic() + OBSERVERS_BACK_TIMEOUT_S
            while time.monotonic() < deadline and not (
                self.recorder.connected()
                and self.probe.connected()
                and all(c._client.is_connected() for c in self.clients)
            ):
                time.sleep(0.02)
            time.sleep(0.1)  # their subscriptions, sent on connect, are in place
        finally:
            for proxy in self.proxies.values():
                proxy.heal()

    def _log_sizes(self) -> dict[str, int]:
        assert self.cluster is not None
        paths = {n: self.cluster.node_log(n) for n in self.ids}
        return {n: p.stat().st_size if p.exists() else 0 for n, p in paths.items()}

    def _note_logs(self, rec: FaultRecord, since: Mapping[str, int]) -> None:
        """Note which nodes stopped playing (cut off) and how often nodes switched brokers while
        the fault lasted, from what their logs gained since ``since``."""
        assert self.cluster is not None
        texts = {}
        for n in self.ids:
            with contextlib.suppress(OSError), self.cluster.node_log(n).open("rb") as f:
                f.seek(since.get(n, 0))
                texts[n] = f.read().decode(errors="replace")
        cut_off = [n for n, text in texts.items() if CUT_OFF_LOG in text]
        if cut_off:
            rec.notes.append(f"stopped playing, cut off: {','.join(cut_off)}")
        away = sum(text.count(FAILOVER_LOG) for text in texts.values())
        back = sum(text.count(MOVED_BACK_LOG) for text in texts.values())
        if away or back:
            rec.notes.append(f"nodes switched broker: {away} failovers, {back} moves back")

    def check_agreement(self, rec: FaultRecord | None) -> None:
        """After healing, every node reports the same playlist hash and index (ops may still be
        in flight: wait a little for them to settle)."""
        assert self.recorder is not None and self.cluster is not None
        name = "agreement_after_heal"
        self.result.checked[name] += 1
        if self.workload is not None:
            self.workload.pause()  # commands in flight would keep the nodes a step apart
        try:
            why = self._wait_agreement()
        finally:
            if self.workload is not None:
                self.workload.resume()
        if why is None:
            return
        where = f"after fault #{rec.index} {rec.fault}" if rec else "at the end"
        self.result.violations[name].append(f"{where}: {why}")

    def _wait_agreement(self) -> str | None:
        assert self.recorder is not None and self.cluster is not None
        deadline = time.monotonic() + AGREE_TIMEOUT_S
        why: str | None = "no node states"
        while time.monotonic() < deadline:
            states = self.recorder.node_states(live_only=True)
            states = {n: s for n, s in states.items() if n in self.cluster.alive()}
            why = disagreement(states)
            if why is None and len(states) == len(self.ids):
                return None
            time.sleep(0.1)
        return why

    # -- the end

    def final_checks(self) -> None:
        assert self.cluster is not None and self.recorder is not None
        assert self.workload is not None
        res = self.result
        self.workload.stop()
        res.replies = sorted(self.workload.snapshot(), key=lambda r: r.t_sent)
        self.check_agreement(None)
        time.sleep(0.5)  # the last blocks reach the logs
        transitions, changes = self.recorder.snapshot()
        codes = self.cluster.stop()
        res.checked["clean_exit"] += len(codes)
        res.violations["clean_exit"] += [
            f"{n} exited with {c}" for n, c in sorted(codes.items()) if c != 0
        ]
        # 1. at most one master per term, seen live and in the nodes' own logs
        for n in self.ids:
            transitions += master_log_transitions(
                n, self.cluster.node_log(n).read_text(errors="replace")
            )
        res.checked["one_master_per_term"] = len({t.term for t in transitions})
        res.violations["one_master_per_term"] += double_masters(transitions)
        # 2. acknowledged enqueues in every final playlist, in order
        playlists = {}
        for n in self.ids:
            # the snapshot and the operations appended since (persist.StateFile)
            durable = StateFile(self.cluster.workdir / n / "state.json").read()
            playlists[n] = list(durable.state.playlist)
        res.checked["acked_enqueues_kept"] = sum(
            1 for r in res.replies if r.verb == "enqueue" and r.success
        )
        res.violations["acked_enqueues_kept"] += enqueue_problems(res.replies, playlists)
        # 4 and 5 from the sink logs
        logs = {n: sinklog.read_log(self.cluster.sink_log(n)) for n in self.ids}
        self.check_gaps(logs, changes)
        self.check_rejoins(logs)

    def check_gaps(
        self, logs: Mapping[str, list[sinklog.Block]], changes: Sequence[PlaybackChange]
    ) -> None:
        """Nodes untouched by a fault keep playing through it, the master's election included,
        except where the master changed the playback."""
        name = "no_gap_for_survivors"
        lead = self.timing.lead_max_s
        excused = [(int((c.t - 0.05) * 1e9), int((c.t + lead + 0.1) * 1e9)) for c in changes]
        # playback commands in flight, answered or not: the master may have applied one unseen
        maybe = [
            (int((r.t_sent - 0.05) * 1e9), int((r.t_done + lead + 0.1) * 1e9))
            for r in self.result.replies
            if r.verb in PLAYBACK_VERBS
        ]
        for rec in self.result.records:
            t0, t1 = int(rec.t_start * 1e9), int(rec.t_ready * 1e9)
            breaks: dict[str, list[Break]] = {}
            for n in self.ids:
                if n in rec.nodes:
                    continue
                playing, found = continuity_breaks(
                    _between(logs[n], t0 - 200_000_000, t1 + 1_000_000_000),
                    t0,
                    t1,
                    self.song_frames,
                    excused,
                )
                if playing:
                    self.result.checked[name] += 1
                    breaks[n] = found
            where = f"#{rec.index} {rec.fault} (master {rec.master_before})"
            for n, left in unexplained_breaks(breaks, maybe).items():
                self.result.violations[name] += [f"{where}, {n}: {b}" for b in left]
                self.result.cluster_changes += [
                    f"{where}, {n}: {b}" for b in breaks[n] if b not in left
                ]

    def check_rejoins(self, logs: Mapping[str, list[sinklog.Block]]) -> None:
        """A node hit by a fault plays in step with the untouched ones once it is back."""
        name = "rejoin_in_sync"
        for rec in self.result.records:
            t0, t1 = int((rec.t_ready + SETTLE_S) * 1e9), int(rec.t_end * 1e9)
            others = {n: _between(logs[n], t0 - MATCH_WINDOW_NS, t1 + MATCH_WINDOW_NS)
                      for n in self.ids if n not in rec.nodes}  # fmt: skip
            for n in rec.nodes:
                skew = rejoin_skew_ns(_between(logs[n], t0, t1), others, t0, t1)
                if skew is None:
                    continue
                self.result.checked[name] += 1
                self.result.rejoin_skews_ms.append(skew / 1e6)
                if skew > SKEW_TOLERANCE_NS:
                    self.result.violations[name].append(
                        f"#{rec.index} {rec.fault}: {n} off by {skew / 1e6:.1f} ms after rejoining"
                    )


def run_chaos(cfg: ChaosConfig, progress: Any = None) -> ChaosResult:
    """Run ``cfg.faults`` faults of the schedule of ``cfg.seed`` and check the invariants.

    ``progress``, if given, is called with each finished ``FaultRecord``. Every process, proxy
    and broker the run starts is stopped before it returns, also on an error (reported in
    ``ChaosResult.error`` with the records so far)."""
    started = time.monotonic()
    schedule = make_schedule(
        random.Random(cfg.seed),
        [f"n{i + 1}" for i in range(cfg.nodes)],
        cfg.faults,
        cfg.cover,
        cfg.kinds,
    )
    result = ChaosResult(cfg.seed, schedule)
    run = _Run(cfg, result)
    try:
        run.start()
        for i, fault in enumerate(schedule):
            rec = FaultRecord(i, fault)
            result.records.append(rec)
            run.inject(rec)
            run.check_agreement(rec)
            time.sleep(cfg.steady_s)
            rec.t_end = time.monotonic()
            if progress is not None:
                progress(rec)
        run.final_checks()
    except Exception as err:
        result.error = f"{type(err).__name__}: {err}"
        if run.workload is not None:
            result.replies = run.workload.snapshot()
    finally:
        run.close()
        result.duration_s = time.monotonic() - started
    return result
