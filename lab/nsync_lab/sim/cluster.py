"""A whole NSync cluster in one process on simulated time: the real roles of every node
(:class:`nsync_mqtt.speaker.Speaker`, :class:`nsync_mqtt.master.Master`, the election, the clock
estimator, the playlist), the real wire format and durable-state format, on a simulated broker,
disks, clocks and sinks, under a seeded fault schedule and a random client workload, with the
cluster's invariants checked as it runs.

What a node is here: :class:`SimNode` does what ``node.py`` does for a real node (timers,
carrying out :class:`nsync_mqtt.effects.Effects` in order, saving the durable state), but on the
simulated world. Songs are held by every node from the start (an in-memory library); song
transfers, decoding and eviction are not simulated. A crash loses everything in memory and keeps
what was saved; a crash can land between the master's early operation and its own save.

Invariants (``Checker``):
- at most one master per term;
- one state per log position: every node whose last operation is ``(term, index)`` holds the
  playlist and volume the master of ``term`` made at ``index`` (log matching);
- no acknowledged command lost: every enqueue the client heard succeed is in the final playlist,
  in the order of the successes, and the last volume it heard succeed holds unless it sent
  another volume command since;
- committed operations never change, and a node becomes master only with every committed
  operation in its log (leader completeness);
- after healing, a master elected within ``ELECTION_BOUND_S`` of the last fault's end (or
  still in place from before), and every node agrees with it at the end: the same last
  operation, playlist, volume and playback;
- a node plays what the master scheduled: at the end, every node's sink plays the master's song
  at the master's position (within ``SINK_TOLERANCE_S`` of true time), or is stopped with it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nsync_lab.memlib import MemoryLibrary
from nsync_mqtt.effects import PLAY, RETIME, STOP, Effects, Publish, SinkPlan
from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.master import STATE_PUBLISH_DELAY_S
from nsync_mqtt.messages import Topics
from nsync_mqtt.node import HOUSEKEEPING_S, NODE_STATE_PERIOD_S
from nsync_mqtt.persist import Durable
from nsync_mqtt.playlist import PLAYING, RATE
from nsync_mqtt.seal import OLD_BOOT, REPLAYED, Boot, Opener, Sealer
from nsync_mqtt.speaker import Speaker
from nsync_mqtt.timing import Timing
from nsync_mqtt.wire import PeerState

from .broker import BrokerUnavailable, Conn, SimBroker, Will
from .clock import SimClock
from .disk import SimDisk
from .faults import Fault, FaultRunner, plan
from .world import Timer, World

CLUSTER = "sim"
RECONNECT_S = (0.1, 1.0)  # reconnect backoff, doubling
ELECTION_BOUND_S = 5.0  # a master and agreement within this after the last fault healed
SINK_TOLERANCE_S = 0.005
SONG_S = (8.0, 40.0)
SONGS = 64  # a household library; the client enqueues them in turn
STATE_FILE = "state.json"


class Violation(AssertionError):
    pass


@dataclass
class SinkState:
    """What a simulated sink does, in true time."""

    song: str | None = None
    frame: int = 0
    at_true: float = 0.0  # the instant `frame` plays (playing) or the stop takes effect
    stop_at_true: float | None = None
    volume: int = 0
    key: float | None = None  # the schedule it plays (retimes name it)

    def position(self, t: float) -> tuple[str | None, float | None]:
        if self.song is None or t < self.at_true:
            return None, None
        if self.stop_at_true is not None and t >= self.stop_at_true:
            return None, None
        return self.song, self.frame + (t - self.at_true) * RATE


class SimNode:
    """One node: the real roles on a simulated bus, disk, clock and sink."""

    def __init__(self, sim: Simulation, node_id: str, offset_s: float, drift_ppm: float) -> None:
        self.sim = sim
        self.id = node_id
        self.world = sim.world
        self.clock = SimClock(sim.world, offset_s, drift_ppm)
        self.disk = SimDisk()
        self.lib = sim.library  # every node holds every song (not part of what is simulated)
        self.core: Speaker | None = None
        self.conn: Conn | None = None
        self.timers: list[Timer] = []
        self.election_timer: Timer | None = None
        self.state_timer: Timer | None = None
        self.sink = SinkState()
        self.sink_timer: Timer | None = None
        self.backoff = RECONNECT_S[0]
        self.boots = 0
        self.crash_mid_commit = False  # crash right after the next early send
        # signing (Simulation(signed=True)): a sealer per boot, an opener that forgets at a crash
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        self.rejected: dict[str, int] = {}  # over every boot

    # ------------------------------------------------------------------ life

    @property
    def up(self) -> bool:
        return self.core is not None

    def boot(self) -> None:
        self.boots += 1
        durable = Durable()
        if self.disk.exists(STATE_FILE):
            durable = Durable.from_dict(json.loads(self.disk.read(STATE_FILE)))
        rng = random.Random(f"{self.sim.seed}:{self.id}:{self.boots}")
        self.core = Speaker(
            self.id,
            self.sim.peers,
            CLUSTER,
            self.sim.timing,
            self.lib,
            rng,
            self.clock.now(),
            durable,
            chunk_size=256 * 1024,
            max_song_bytes=100 << 20,
            wall=lambda: 1.7e9 + self.world.now,
        )
        self.sink = SinkState()
        if self.sim.key is not None:
            tag = f"{self.sim.rng.getrandbits(32):08x}"
            self.sealer = Sealer(self.sim.key, CLUSTER, self.id, Boot(self.boots, tag))
            self.opener = Opener(self.sim.key, CLUSTER, self.id, set(self.sim.peers))
        self.sim.log(self.id, "boot", f"term {durable.term} last {durable.state.last}")
        self._connect()
        self._every(HOUSEKEEPING_S, self._housekeeping)
        self._every(NODE_STATE_PERIOD_S, self._publish_node_state)
        self._ping_loop()
        self._arm_election()

    def crash(self) -> None:
        if self.core is None:
            return
        self.sim.log(self.id, "crash", "")
        self.core = None
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        for maybe in (self.election_timer, self.state_timer, self.sink_timer):
            if maybe is not None:
                maybe.cancel()
        self.election_timer = self.state_timer = self.sink_timer = None
        if self.conn is not None and self.conn.connected:
            self.sim.broker.drop(self.conn.client_id)  # the will: status offline
        self.conn = None
        if self.opener is not None:
            for reason, n in self.opener.rejected.items():
                self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.sealer = self.opener = None
        self.disk.crash(self.sim.world.rng)
        self.sink = SinkState()

    def _every(self, period: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            if self.core is None:
                return
            fn()
            self.timers.append(self.world.after(period, run))

        self.timers.append(self.world.after(period * self.sim.rng.random(), run))

    def _ping_loop(self) -> None:
        if self.core is None:
            return
        self._do(self.core.ping(self.clock.now()))
        self.timers.append(self.world.after(self.core.ping_interval(), self._ping_loop))

    def _arm_election(self) -> None:
        if self.core is None:
            return
        if self.election_timer is not None:
            self.election_timer.cancel()
        # a microsecond late: a deadline mapped to true time and back must read as passed
        deadline = self.clock.to_true(self.core.election.deadline()) + 1e-6
        self.election_timer = self.world.at(max(self.world.now, deadline), self._election)

    def _election(self) -> None:
        self.election_timer = None
        if self.core is None:
            return
        self._do(self.core.election_tick(self.clock.now()))
        self._arm_election()

    def _housekeeping(self) -> None:
        assert self.core is not None
        self._do(self.core.tick(self.clock.now()))

    # ------------------------------------------------------------------ the bus

    def _connect(self) -> None:
        if self.core is None:
            return
        topics = self.sim.topics
        will = Will(topics.node_status(self.id), b"offline", True)
        try:
            conn = self.sim.broker.connect(f"node-{self.id}", self._on_message, None, will)
        except BrokerUnavailable:
            self.timers.append(self.world.after(self.backoff, self._connect))
            self.backoff = min(self.backoff * 2, RECONNECT_S[1])
            return
        self.backoff = RECONNECT_S[0]
        self.conn = conn
        conn.on_disconnect = lambda: self._on_disconnect(conn)
        internal = topics.internal("")
        for name in ("hb", "vote_req", "prevote_req", "op", "offer", "want", f"to/{self.id}"):
            conn.subscribe(internal + name)
        conn.subscribe(topics.cmd_all)
        conn.subscribe(f"{topics.base}/node/+/state")
        conn.publish(topics.node_status(self.id), b"online", retain=True)
        self._do(self.core.connected(self.clock.now()))

    def _on_disconnect(self, conn: Conn) -> None:
        if conn is not self.conn:
            return  # an earlier connection's news
        self.conn = None
        if self.core is not None:
            self.timers.append(self.world.after(self.backoff, self._connect))

    def _publish(self, p: Publish) -> None:
        if self.conn is None:
            return
        payload = p.payload
        if self.sealer is not None and p.topic.startswith(self.sim.topics.internal("")):
            payload = self.sealer.seal(p.topic, payload)
        self.conn.publish(p.topic, payload, p.retain)

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        core = self.core
        if core is None:
            return
        now = self.clock.now()
        topics = self.sim.topics
        if topic.startswith(topics.base + "/internal/"):
            if retain:
                return
            signer = None
            if self.opener is not None:
                opened = self.opener.open(now, topic, payload)
                if opened is None:
                    self.sim.checker.refused(self)
                    return
                signer, payload = opened.sender, opened.payload
            self._do(core.step(now, payload, now, signer))
        elif topic.startswith(topics.base + "/cmd/"):
            if not retain and core.master is not None:
                verb = topics.verb_of(topic) or ""
                self._do(core.master.command(now, verb, payload))
        elif topic.endswith("/state"):
            node = topic.split("/")[-2]
            if node == self.id or node not in self.sim.peers:
                return
            info = None
            if payload:
                try:
                    info = PeerState.parse(payload)
                except ProtocolError:
                    return
            self._do(core.node_state(now, node, info))

    # ------------------------------------------------------------------ effects

    def _do(self, eff: Effects) -> None:
        """As node.Node._do: early messages, then (a moment later) the save, the messages
        that promise it and the rest."""
        if not eff or self.core is None:
            return
        self.sim.checker.faults(self.id, eff)
        self.sim.checker.after_event(self)  # the state in memory, as the event left it
        for p in eff.early:
            self._publish(p)
        if eff.early:
            if self.crash_mid_commit:
                self.crash_mid_commit = False
                self.sim.log(self.id, "fault", "crash between the early op and the save")
                self.crash()
                return
            self.world.after(0.0, self._do_rest, eff, self.boots)
        else:
            self._do_rest(eff, self.boots)

    def _do_rest(self, eff: Effects, boot: int) -> None:
        core = self.core
        if core is None or boot != self.boots:
            return
        saved = None
        if eff.persist:
            data = json.dumps(core.durable().to_dict(), separators=(",", ":")).encode()
            self.disk.write(STATE_FILE + ".tmp", data)
            self.disk.fsync(STATE_FILE + ".tmp")
            self.disk.replace(STATE_FILE + ".tmp", STATE_FILE)
            self.disk.fsync_dir()
            saved = core.persisted(self.clock.now())
        for p in eff.out:
            self._publish(p)
        if saved:
            self._do(saved)
        if eff.node_state:
            self._publish_node_state()
        if eff.state_soon and self.state_timer is None:
            self.state_timer = self.world.after(STATE_PUBLISH_DELAY_S, self._publish_state)
        if eff.wake:
            self._arm_election()
        if eff.sink is not None:
            self._drive_sink(eff.sink)

    def _publish_state(self) -> None:
        self.state_timer = None
        if self.core is not None:
            self._do(self.core.publish_state(self.clock.now()))

    def _publish_node_state(self) -> None:
        if self.core is None or self.conn is None:
            return
        doc = json.dumps(self.core.node_state_doc(), separators=(",", ":")).encode()
        self.conn.publish(self.sim.topics.node_state(self.id), doc, retain=True)

    # ------------------------------------------------------------------ the sink

    def _drive_sink(self, plan: SinkPlan) -> None:
        s = self.sink
        s.volume = plan.volume
        if plan.action == RETIME and plan.song is not None and plan.at is not None:
            # an ideal sink: on the newer schedule at once (a real one steers within seconds)
            if s.song == plan.song and s.key == plan.key and s.stop_at_true is None:
                s.frame, s.at_true = plan.frame, self.clock.to_true(plan.at)
                self._finish_timer(plan.song, plan.frame, s.at_true)
        elif plan.action == PLAY and plan.song is not None and plan.at is not None:
            at_true = self.clock.to_true(plan.at)
            song, pos = s.position(self.world.now)
            # steer only a play with no stop pending (as stream.Feeder.play): a play that
            # follows a pause not yet reached is a new start after that stop
            if song == plan.song and pos is not None and s.stop_at_true is None:
                expected = plan.frame + (self.world.now - at_true) * RATE
                if abs(expected - pos) < 0.002 * RATE:
                    # already there: no restart, steered onto the new schedule (as the sinks)
                    s.frame, s.at_true, s.key = plan.frame, at_true, plan.key
                    self._finish_timer(plan.song, plan.frame, at_true)
                    return
            self.sink = SinkState(plan.song, plan.frame, at_true, None, plan.volume, plan.key)
            self._finish_timer(plan.song, plan.frame, at_true)
        elif plan.action == STOP:
            stop = self.world.now if plan.at is None else self.clock.to_true(plan.at)
            s.stop_at_true = max(stop, self.world.now) if s.song is not None else None
            if self.sink_timer is not None and s.song is not None:
                self.sink_timer.cancel()
                self.sink_timer = None

    def _finish_timer(self, song: str, frame: int, at_true: float) -> None:
        end = at_true + max(0, (self.lib.frames(song) or 0) - frame) / RATE
        if self.sink_timer is not None:
            self.sink_timer.cancel()
        self.sink_timer = self.world.at(max(end, self.world.now), self._finished, song)

    def _finished(self, song: str) -> None:
        self.sink_timer = None
        if self.core is not None:
            self._do(self.core.sink_finished(self.clock.now(), song))


@dataclass
class Client:
    """A client of the cluster: random commands with reply_to, replies recorded."""

    sim: Simulation
    conn: Conn | None = None
    sent: int = 0
    replies: list[dict[str, Any]] = field(default_factory=list)
    acked_enqueues: list[str] = field(default_factory=list)
    next_song: int = 0
    volume_sent: dict[int, int] = field(default_factory=dict)  # client_req_id -> volume
    last_volume_sent: int | None = None  # client_req_id of the last volume command sent
    acked_volume: tuple[int, int] | None = None  # (client_req_id, volume) last acknowledged

    def connect(self) -> None:
        try:
            conn = self.sim.broker.connect("client", self._on_message)
        except BrokerUnavailable:
            self.sim.world.after(0.5, self.connect)
            return
        self.conn = conn
        conn.on_disconnect = lambda: self._lost(conn)
        self.conn.subscribe(self.sim.topics.reply("client"))

    def _lost(self, conn: Conn) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self.sim.world.after(0.5, self.connect)

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        reply = json.loads(payload)
        if any(r["client_req_id"] == reply["client_req_id"] for r in self.replies[-50:]):
            return  # a QoS 1 duplicate
        self.replies.append(reply)
        rid = reply["client_req_id"]
        newer = self.acked_volume is None or rid > self.acked_volume[0]
        if reply["success"] and rid in self.volume_sent and newer:
            self.acked_volume = (rid, self.volume_sent[rid])
        if reply["success"] and reply["command"] == "enqueue" and not self.sim.edits:
            self.acked_enqueues.append(reply["params"]["song"])

    EDIT_VERBS = ("clear", "remove", "move", "enqueue_next", "replace", "announce")

    def command(self, verb: str | None = None) -> None:
        rng = self.sim.rng
        if verb is None and self.sim.edits and rng.random() < 0.35:
            verb = rng.choices(self.EDIT_VERBS, weights=[1, 4, 4, 3, 1, 2])[0]
        verb = (
            verb
            or rng.choices(
                [
                    "enqueue",
                    "play",
                    "pause",
                    "forward",
                    "backward",
                    "volume",
                    "seek",
                    "stop",
                    "status",
                ],
                weights=[5, 3, 2, 2, 1, 2, 1, 1, 1],
            )[0]
        )
        body: dict[str, Any] = {"reply_to": "client", "client_req_id": self.sent}
        if verb == "enqueue_next":
            verb, body["next"] = "enqueue", True
        if verb in ("enqueue", "replace", "announce"):
            body["song"] = self.sim.songs[self.next_song % len(self.sim.songs)]
            self.next_song += 1
        elif verb == "remove":
            body["index"] = rng.randrange(0, 8)
        elif verb == "move":
            body["from"], body["to"] = rng.randrange(0, 8), rng.randrange(0, 8)
        elif verb == "volume":
            body["arg"] = rng.randrange(0, 101)
            self.volume_sent[self.sent] = body["arg"]
            self.last_volume_sent = self.sent
        elif verb == "seek":
            body["arg"] = round(rng.uniform(0, 10), 2)
        self.sent += 1
        if self.conn is not None:
            self.conn.publish(self.sim.topics.cmd(verb), json.dumps(body).encode())


class Checker:
    """The invariants checked after every event (the end checks are Simulation.final_checks).

    Logs are followed by position: the log a node holds at (term, index) is the log of the
    position it came from plus that term, recorded when the position is first seen (a master
    making an operation, or the first node to apply it), so two nodes at one position hold one
    log by construction, and the checks are on what each position carries and on commits."""

    check_contents = True  # one state per position (off: see what else a divergence breaks)

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.masters: dict[int, str] = {}  # term -> its master
        self.elected_at: dict[int, float] = {}  # term -> when its master was first seen
        self.made: dict[tuple[int, int], tuple[str, int]] = {}  # (term, index) -> (plist, vol)
        self.logs: dict[tuple[int, int], tuple[int, ...]] = {(0, 0): (0,)}  # -> term by index
        self.pos: dict[str, tuple[int, int]] = {}  # node -> its position
        self.committed: list[int] = [0]  # the term of each committed index (f+1 nodes hold it)
        self.committed_in: list[int] = [0]  # the term of the master that committed it
        self.checks = 0

    def fail(self, what: str) -> None:
        raise Violation(f"t={self.sim.world.now:.3f}: {what}")

    def refused(self, n: SimNode) -> None:
        """A node's opener refused a message: only duplicates and a restarted node's stale
        messages may be refused in a cluster whose every member holds the key."""
        assert n.opener is not None
        wrong = {r: c for r, c in n.opener.rejected.items() if r not in (REPLAYED, OLD_BOOT)}
        if wrong:
            self.fail(f"{n.id} refused signed messages of the cluster itself: {wrong}")

    def faults(self, node: str, eff: Effects) -> None:
        for where, err in eff.faults:
            self.fail(f"{node} refused a message of the cluster itself: {where}: {err}")

    def after_event(self, n: SimNode) -> None:
        core = n.core
        assert core is not None
        self.checks += 1
        st = core.state
        position = (st.term, st.index)
        prev = self.pos.get(n.id, (0, 0))
        new_master = False
        if core.master is not None:
            other = self.masters.setdefault(core.term, n.id)
            self.elected_at.setdefault(core.term, self.sim.world.now)
            if other != n.id:
                self.fail(f"two masters in term {core.term}: {other} and {n.id}")
            new_master = other == n.id and self.pos.get(f"master:{core.term}") is None
            self.pos[f"master:{core.term}"] = position
        if position != prev or position not in self.logs:
            if position not in self.logs:
                if position[1] != prev[1] + 1 or prev not in self.logs:
                    self.fail(f"{n.id} holds {position}, a position no master was seen making")
                self.logs[position] = self.logs[prev] + (position[0],)
            self.pos[n.id] = position
        content = (st.hash, st.volume)
        known = self.made.get(position)
        if known is None:
            self.made[position] = content
        elif known != content and self.check_contents:
            self.fail(
                f"{n.id} holds {position} with playlist {st.hash[:8]} volume {st.volume}, "
                f"but that position was made as playlist {known[0][:8]} volume {known[1]}"
            )
        if core.master is None:
            return
        log = self.logs[position]
        done = self.committed
        if new_master:
            # leader completeness: what masters of earlier terms committed is in this log (a
            # master of a term since overtaken may lack what a later term committed: it can
            # commit nothing, every node that acknowledges moved on to the later term)
            for i, t in enumerate(done):
                if self.committed_in[i] < core.term and (i >= len(log) or log[i] != t):
                    self.fail(
                        f"{n.id} became master of term {core.term} without the operation "
                        f"({t}, {i}) that f+1 nodes acknowledged in term {self.committed_in[i]}"
                        f": it holds {'nothing' if i >= len(log) else (log[i], i)} there"
                    )
        upto = min(core.master.commits.commit_index, len(log) - 1)
        for i in range(len(done), upto + 1):
            done.append(log[i])
            self.committed_in.append(core.term)
        if log[: min(len(done), upto + 1)] != tuple(done[: upto + 1]):
            self.fail(f"{n.id} (master, term {core.term}) committed over a committed operation")


@dataclass
class SimResult:
    seed: int
    sim_s: float
    faults: int
    events: int
    commands: int
    acked_enqueues: int
    terms: int
    checks: int
    trace: list[str]


class Simulation:
    def __init__(
        self,
        seed: int,
        nodes: int = 5,
        duration_s: float = 60.0,
        faults: int = 10,
        settle_s: float = 15.0,
        command_every_s: float = 0.4,
        timing: Timing | None = None,
        faults_plan: list[Fault] | None = None,
        edits: bool = False,
        signed: bool = True,
    ) -> None:
        self.seed = seed
        # the recommended set-up: every internal message signed with the cluster key
        self.key: bytes | None = bytes(range(32)) if signed else None
        # the workload also edits the playlist and announces (the acknowledged-enqueue order
        # check then does not apply: removes and clears take songs out on purpose)
        self.edits = edits
        self.world = World(seed)
        self.rng = self.world.fork_rng("sim")
        self.timing = timing or Timing()
        self.topics = Topics(CLUSTER)
        self.peers = [f"n{i}" for i in range(nodes)]
        self.f = (nodes - 1) // 2
        self.duration_s = duration_s
        self.settle_s = settle_s
        self.command_every_s = command_every_s
        self.broker = SimBroker(self.world)
        song_rng = self.world.fork_rng("songs")
        self.library = MemoryLibrary()
        self.songs = [f"{song_rng.getrandbits(224):056x}" for _ in range(SONGS)]
        for s in self.songs:
            self.library.add(s, size=1000, seconds=song_rng.uniform(*SONG_S))
        clock_rng = self.world.fork_rng("clocks")
        self.nodes = {
            p: SimNode(self, p, clock_rng.uniform(-3600, 3600), clock_rng.uniform(-100, 100))
            for p in self.peers
        }
        self.client = Client(self)
        self.checker = Checker(self)
        self.plan = faults_plan if faults_plan is not None else []
        self.n_faults = faults
        self.last_heal = 0.0
        self._crashed_for: dict[int, SimNode] = {}  # planned crash -> the node crashed

    def log(self, node: str, kind: str, text: str) -> None:
        self.world.log(node, kind, text)

    def run(self) -> SimResult:
        w = self.world
        if not self.plan and self.n_faults:
            self.plan = plan(
                self.world.fork_rng("faults"),
                self.duration_s,
                len(self.peers),
                self.f,
                self.n_faults,
                settle_s=self.settle_s,
            )
        for node in self.nodes.values():
            w.at(self.rng.uniform(0, 0.2), node.boot)
        w.at(0.05, self.client.connect)
        t = 1.0
        while t < self.duration_s - self.settle_s / 2:
            w.at(t, self.client.command)
            t += self.rng.expovariate(1 / self.command_every_s)
        self.last_heal = max((f.until for f in self.plan), default=0.0)
        FaultRunner(
            w,
            self.broker,
            self.plan,
            lambda i: f"node-{self.peers[i]}",
            on_crash=self._crash,
            on_restart=self._restart_index,
            on_clock_step=None,  # a node's clock is the host's monotonic clock: it never steps
            keepalive_drop_s=1.0,
        ).start()
        w.run_until(self.duration_s)
        self.final_checks()
        return SimResult(
            self.seed,
            self.duration_s,
            len(self.plan),
            w.events_run,
            self.client.sent,
            len(self.client.acked_enqueues),
            len(self.checker.masters),
            self.checker.checks,
            w.trace.lines()[-200:],
        )

    # ------------------------------------------------------------------ faults

    def _crash(self, index: int) -> None:
        """Crash a node: half the time the master of the moment instead of the planned one (the
        node whose loss matters most); a third of the time at its next early send (between
        the master's operation going out and its own save), or half a second later if none.
        Before crashing a master, half the time cut all but one speaker off its operations
        for a moment, so that what it sends last reaches one node only."""
        planned = self.nodes[self.peers[index]]
        n = planned
        master = next((x for x in self.nodes.values() if x.core and x.core.master), None)
        if master is not None and master is not planned and self.rng.random() < 0.5:
            n = master
        self._crashed_for[index] = n
        if n is master and self.rng.random() < 0.5:
            keep = self._partial_delivery(n)
            self.world.after(self.rng.uniform(0.05, 0.28), n.crash)
            if self.f >= 2 and self.rng.random() < 0.5:
                self._lone_holder(keep)
            return
        if self.rng.random() < 0.3:
            n.crash_mid_commit = True
            self.world.after(0.5, self._crash_if_armed, n)
        else:
            n.crash()

    def _partial_delivery(self, master: SimNode) -> str:
        """Cut the downlinks of all speakers but one for 0.3 s, from now; returns that one."""
        self.last_heal = max(self.last_heal, self.world.now + 0.3)
        others = [p for p in self.peers if p != master.id]
        keep = self.rng.choice(others)
        for p in others:
            if p != keep:
                self.broker.cut(f"node-{p}", up=False, down=True)
                self.world.after(0.3, self.broker.heal, f"node-{p}", False, True)
        self.log(master.id, "fault", f"its last operations reach {keep} alone")
        self.world.after(0.01, self.client.command, "volume")  # an operation to reach it alone
        return keep

    def _lone_holder(self, keep: str) -> None:
        """The node that alone got a dead master's last operations is cut off while the
        others elect a master, comes back while that master commits, and then that master
        dies too: the sequence that loses an acknowledged command when operations are told
        apart by index alone (tests/integration/test_log_matching.py)."""
        cut_s = self.rng.uniform(1.0, 2.0)
        cid = f"node-{keep}"
        self.world.after(0.3, self.broker.cut, cid)
        self.world.after(0.3 + cut_s, self.broker.heal, cid)
        self.last_heal = max(self.last_heal, self.world.now + 0.3 + cut_s)
        self.world.after(0.3 + cut_s + 0.05, self.client.command, "volume")
        self.world.after(0.3 + cut_s + self.rng.uniform(0.1, 1.0), self._crash_second, keep)

    def _crash_second(self, keep: str) -> None:
        down = sum(1 for n in self.nodes.values() if not n.up)
        master = next((x for x in self.nodes.values() if x.core and x.core.master), None)
        if master is None or master.id == keep or down >= self.f:
            return
        self.log(master.id, "fault", f"the next master dies too, {keep} back")
        master.crash()
        back = self.rng.uniform(2.0, 4.0)
        self.world.after(back, self._restart, master)
        self.last_heal = max(self.last_heal, self.world.now + back)

    def _restart_index(self, index: int) -> None:
        self._restart(self._crashed_for.pop(index, self.nodes[self.peers[index]]))

    def _crash_if_armed(self, n: SimNode) -> None:
        if n.crash_mid_commit:
            n.crash_mid_commit = False
            n.crash()

    def _restart(self, n: SimNode) -> None:
        if not n.up:
            n.boot()

    # ------------------------------------------------------------------ the end

    def final_checks(self) -> None:
        chk = self.checker
        live = [n for n in self.nodes.values() if n.core is not None]
        masters = [n for n in live if n.core is not None and n.core.master is not None]
        if len(masters) != 1:
            chk.fail(
                f"{len(masters)} masters after healing ({self.duration_s - self.last_heal:.1f} s)"
            )
        m = masters[0]
        assert m.core is not None
        elected = self.checker.elected_at[m.core.term]
        if elected > self.last_heal + ELECTION_BOUND_S:
            chk.fail(
                f"the master of term {m.core.term} was elected {elected - self.last_heal:.2f} s "
                f"after the last fault healed (bound {ELECTION_BOUND_S:g} s)"
            )
        mst = m.core.state
        for n in live:
            core = n.core
            assert core is not None
            st = core.state
            if (st.last, st.hash, st.volume) != (mst.last, mst.hash, mst.volume):
                chk.fail(f"{n.id} holds {st.last} but the master {m.id} holds {mst.last}")
            a, b = st.playback, mst.playback
            if (a.state, a.slot, a.song, a.frame) != (b.state, b.slot, b.song, b.frame):
                chk.fail(f"{n.id} playback {a} differs from the master's {b}")
        # no acknowledged enqueue lost, and in the order the client heard them succeed
        playlist = list(mst.playlist)
        pos = 0
        for song in self.client.acked_enqueues:
            try:
                pos = playlist.index(song, pos) + 1
            except ValueError:
                chk.fail(f"acknowledged enqueue of {song[:8]} missing from the master's playlist")
        # the last volume the client heard succeed holds, unless it sent another one since
        acked = self.client.acked_volume
        last = self.client.last_volume_sent
        if acked is not None and acked[0] == last and mst.volume != acked[1]:
            chk.fail(f"acknowledged volume {acked[1]} lost: the cluster is at {mst.volume}")
        # every sink plays the master's schedule: the same song, its frames at the same
        # true instants (a start still ahead included)
        now = self.world.now
        pb = mst.playback
        for n in live:
            sink = n.sink
            stopped = sink.song is None or (
                sink.stop_at_true is not None and sink.stop_at_true <= now
            )
            if pb.state == PLAYING and pb.at is not None:
                if stopped or sink.song != pb.song:
                    what = "plays"
                    if sink.stop_at_true is not None and sink.stop_at_true <= now:
                        what = f"stopped at t={sink.stop_at_true:.6f}"
                    chk.fail(
                        f"{n.id} sink {what} {str(sink.song)[:8]} while the master plays "
                        f"{str(pb.song)[:8]}"
                    )
                master_t = m.clock.to_true(pb.at)
                node_t = sink.at_true + (pb.frame - sink.frame) / RATE
                if abs(node_t - master_t) > SINK_TOLERANCE_S:
                    off = (node_t - master_t) * 1e3
                    chk.fail(f"{n.id} sink is {off:.2f} ms off the master's schedule")
            elif not stopped and sink.stop_at_true is None and sink.at_true <= now:
                chk.fail(f"{n.id} sink plays {sink.song} but the master's playback is {pb.state}")
