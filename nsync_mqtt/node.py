"""One NSync node: a speaker, and the master when elected.

The node is a thin driver. It reads its clock once per event, hands the event to a pure core
(``vote.Election``, ``timesync.ClockEstimator``, ``playlist``) and carries out what comes back:
publishing on the bus, scheduling the sink, decoding songs in a worker thread. docs/protocol.md
describes the internal messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from nsync_mqtt import audio, wire
from nsync_mqtt.broker_embed import EmbeddedBroker
from nsync_mqtt.bus import Bus, parse_broker_url
from nsync_mqtt.clock import SimClock
from nsync_mqtt.config import NodeConfig, parse_host_port
from nsync_mqtt.errors import CommandError, NSyncError, ProtocolError
from nsync_mqtt.guard import Faults, LoopWatchdog, forever, log_tasks
from nsync_mqtt.master import Commits
from nsync_mqtt.messages import (
    Message,
    Topics,
    decode,
    decode_chunk,
    encode,
    encode_chunk,
    reply_object,
)
from nsync_mqtt.persist import Durable, StateFile
from nsync_mqtt.playlist import (
    PLAYING,
    RATE,
    Context,
    Mismatch,
    PlayerState,
    StaleOp,
    Unchanged,
    apply_command,
    apply_op,
    next_song,
    start_term,
    takes_sync,
)
from nsync_mqtt.replication import (
    Manifest,
    SongStore,
    TransferQueue,
    choose_source,
    chunk_header,
    next_retry_s,
    read_chunk,
    songs_to_push,
    stalled_songs,
)
from nsync_mqtt.timesync import ClockEstimator, lead_time
from nsync_mqtt.vote import (
    BecameFollower,
    BecameMaster,
    Effect,
    Election,
    GrantPreVote,
    GrantVote,
    IsolationWatch,
    RequestPreVotes,
    RequestVotes,
    Role,
    SendHeartbeat,
)
from nsync_mqtt.wire import PeerState, parse_body

log = logging.getLogger("nsync.node")

VERBS = {
    "play",
    "pause",
    "forward",
    "next",
    "backward",
    "previous",
    "stop",
    "enqueue",
    "load",
    "volume",
    "seek",
    "status",
}
UNKNOWN_FRAMES = 1 << 62  # a held song whose length is not known yet
NODE_STATE_PERIOD_S = 1.0
NODE_ALIVE_S = 3.0
BROKER_FAILOVER_GRACE_S = 1.5  # per broker in the list, before a masterless node gives up
SYNC_RETRY_S = 0.5  # a node waiting for the master's state asks again this often
REANCHOR_TOLERANCE_S = 0.002  # a playing sink this close to a new schedule keeps going
STATE_PUBLISH_DELAY_S = 0.02  # retained state follows a change within this, coalesced
PING_BURST_SAMPLES = 32  # samples taken quickly after a master change ...
PING_BURST_INTERVAL_S = 0.02  # ... at this interval
SONG_RETRY_S = 3.0  # a lacked playlist song with no progress for this long is asked for again
SONG_RETRY_MAX_S = 60.0  # ... the interval doubling up to this while it stays stalled
TRANSFER_WINDOW = 2  # chunks of a background song transfer not yet taken by the broker
TRANSFER_ACK_TIMEOUT_S = 2.0  # a chunk the broker has not taken by then no longer holds up the next


def make_reply(
    success: bool, command: str, params: Any, msg: str, client_req_id: Any = None, **extra: Any
) -> bytes:
    obj = reply_object(success, command, params, msg, client_req_id, **extra)
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Request:
    """A client command being served."""

    verb: str
    arg: Any
    params: dict[str, Any]
    reply_to: str | None
    client_req_id: Any
    note: str = "ok"  # the message of its success reply


def parse_command(verb: str, payload: bytes) -> Request:
    """Decode a command payload: empty, a plain value, or a JSON object."""
    text = payload.decode("utf-8", errors="strict").strip() if payload else ""
    params: dict[str, Any] = {}
    reply_to = None
    req_id = None
    arg: Any = None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise ProtocolError(f"malformed JSON: {err}") from err
        if not isinstance(obj, dict):
            raise ProtocolError("a JSON command must be an object")
        req_id = obj.pop("client_req_id", None)
        if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, (int, str))):
            raise ProtocolError("client_req_id must be an integer or a string")
        reply_to = obj.pop("reply_to", None)
        if reply_to is not None:
            from nsync_mqtt.messages import check_id

            check_id(reply_to, "reply_to")
        params = obj
        for key in ("arg", "value", "song", "title", "volume", "seconds", "position"):
            if key in obj:
                arg = obj[key]
                break
    elif text:
        arg = text
        params = {"arg": text}
    return Request(verb, arg, params, reply_to, req_id)


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.timing = cfg.timing
        self.clock = SimClock(cfg.clock_offset, cfg.clock_drift_ppm)
        self.topics = Topics(cfg.cluster)
        self.rng = random.Random(cfg.seed)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = SongStore(
            cfg.data_dir / "store",
            cap_bytes=cfg.store_cap_mb * 1024 * 1024,
            max_song_bytes=cfg.max_song_mb * 1024 * 1024,
        )
        self.pcm = audio.PcmCache(cfg.data_dir / "pcm")
        self.sink = audio.make_sink(cfg.sink, cfg.sink_log, cfg.dac_drift_ppm)
        self.state_file = StateFile(cfg.data_dir / "state.json")
        durable = self.state_file.load()
        self.election = Election(
            cfg.id,
            cfg.peers,
            self.timing,
            self.rng,
            self.clock.now(),
            term=durable.term,
            voted_for=durable.voted_for,
            last_log=durable.state.last,
        )
        self.est = ClockEstimator(calibration_samples=self.timing.calibration_pings)
        # the saved playback's instants were on a clock of the past: keep the place, not the
        # schedule (a restarted node pulls the master's state; a restarted cluster is paused)
        self.state = durable.state.at_rest()
        self._last_log_at = durable.last_log_at  # wall clock, kept across restarts
        self._synced = False  # pull the master's state at the first heartbeat
        self.recovering = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.faults = Faults(log)
        self.bus = Bus(
            list(cfg.broker),
            client_id=f"nsync-{cfg.cluster}-{cfg.id}",
            will=(self.topics.node_status(cfg.id), b"offline", True),
            on_connect=self._on_connect,
            on_handler_error=self.faults.record,
        )
        self.broker: EmbeddedBroker | None = None
        self.watchdog = LoopWatchdog()
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsync-decode")
        self._decoding: set[str] = set()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._lag = 0
        self._sink_pending = False  # playback waits for clock calibration
        self.transfers = TransferQueue()  # chunks owed to recovering nodes (master)
        self._song_progress: dict[str, float] = {}  # song lacked -> last chunk in or request out
        self._song_retry_s: dict[str, float] = {}  # song stalled -> interval before asking again
        self._transfer_wake = asyncio.Event()
        self._scheduled: tuple[Any, ...] | None = None
        # master duties
        self.commits: Commits[Request] = Commits(self.majority, self.timing.ack_timeout_s)
        self.holders: dict[str, set[str]] = {}
        self.node_info: dict[str, PeerState] = {}
        self.last_seen: dict[str, float] = {}
        self.peer_seen: dict[str, float] = {}  # any message from a peer, as a follower sees it
        self._others = [p for p in cfg.peers if p != cfg.id]
        # the bus may still be working through its broker list: give each broker its turn
        self.isolation = IsolationWatch(
            window_s=self.timing.election_timeout_max_s,
            grace_s=self.timing.election_timeout_max_s + len(cfg.broker) * BROKER_FAILOVER_GRACE_S,
            majority=self.majority,
        )
        self._recovery_started: float | None = None
        self._sync_asked_at = -1e18
        self.recovery: dict[str, float] | None = None  # the last recovery's timings
        self.finished: dict[tuple[int, str], set[str]] = {}
        self.song_events: dict[str, asyncio.Event] = {}
        self.load_errors: dict[str, str] = {}
        self._published: dict[str, bytes] = {}
        self._state_timer: asyncio.TimerHandle | None = None
        self._node_state_sent = 0.0
        self._last_node_state: bytes | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_master(self) -> bool:
        return self.election.role is Role.MASTER

    @property
    def majority(self) -> int:
        return self.election.majority

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(self._loop_exception)
        self.watchdog.start()
        self.sink.on_finished = self._finished_from_sink
        self.sink.faults = self.faults
        if self.cfg.embed_broker:
            host, port = parse_host_port("embed_broker", self.cfg.embed_broker)
            self.broker = EmbeddedBroker(host, port, self.cfg.embed_broker_password_file)
            await self.broker.start()
        t = self.topics
        subs: list[tuple[str, Callable[[str, bytes, bool], None]]] = [
            (t.internal("hb"), self._on_internal),
            (t.internal("vote_req"), self._on_internal),
            (t.internal("prevote_req"), self._on_internal),
            (t.internal("op"), self._on_internal),
            (t.internal("offer"), self._on_internal),
            (t.internal(f"to/{self.cfg.id}"), self._on_internal),
            (t.internal("ping"), self._on_internal),
            (t.internal("ack"), self._on_internal),
            (t.internal("sync_req"), self._on_internal),
            (t.internal("finished"), self._on_internal),
            (t.internal("want"), self._on_internal),
            (t.internal("chunk/all"), self._on_chunk),
            (t.internal(f"chunk/{self.cfg.id}"), self._on_chunk),
            (t.upload, self._on_upload),
            (t.cmd_all, self._on_command),
            (f"{t.base}/node/+/state", self._on_node_state),
        ]
        for topic, handler in subs:
            self.bus.subscribe(topic, handler)
        for song in self.store.songs():
            self._decode_in_background(song)
        shown = " or ".join(str(parse_broker_url(u)) for u in self.cfg.broker)  # no passwords
        log.info("node %s connecting to %s", self.cfg.id, shown)
        if not await self._connect_unless_stopped():
            await self._shutdown()
            return
        steps = {
            "election": self._election_step,
            "ping": self._ping_step,
            "housekeeping": self._housekeeping_step,
        }
        self._tasks = [
            asyncio.create_task(forever(self.faults, f"{name} loop", step), name=name)
            for name, step in steps.items()
        ]
        self._tasks.append(asyncio.create_task(self._transfer_loop(), name="transfer"))
        log.info("node %s up (peers %s)", self.cfg.id, ",".join(self.cfg.peers))
        await self._stop.wait()
        await self._shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def _connect_unless_stopped(self) -> bool:
        """Wait for the broker as long as it takes (the bus logs the wait at growing
        intervals); False if the node is told to stop first."""
        connect = asyncio.create_task(self.bus.start(timeout_s=None), name="connect")
        stopping = asyncio.create_task(self._stop.wait(), name="stop")
        await asyncio.wait({connect, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if connect.done():
            stopping.cancel()
            connect.result()
            return True
        connect.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connect
        return False

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        self.bus.publish(self.topics.node_status(self.cfg.id), b"offline", retain=True)
        if self.is_master:
            self.bus.publish(self.topics.status, b"offline", retain=True)
        await asyncio.sleep(0.05)
        await self.bus.close()
        self.sink.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.store.close()
        if self.broker is not None:
            await self.broker.stop()
        self.watchdog.stop()
        log.info("node %s stopped", self.cfg.id)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A callback or task of the loop failed: count it like the loops' own failures."""
        err = context.get("exception")
        if not isinstance(err, Exception):
            loop.default_exception_handler(context)
            return
        self.faults.record(str(context.get("message", "event loop callback"))[:80], err)

    def _on_connect(self) -> None:
        """(Re)connected: republish what is retained (a broker restart loses it)."""
        self.bus.publish(self.topics.node_status(self.cfg.id), b"online", retain=True)
        self._last_node_state = None
        self._publish_node_state(force=True)
        if self.is_master:
            self._published.clear()
            self.bus.publish(self.topics.status, b"online", retain=True)
            self._publish_state()
            self._publish_library()

    # ------------------------------------------------------------------ loops

    # Each loop is one step run forever by guard.forever: an exception in a step is counted
    # and logged (once per kind, then at 10, 100, ...) and the loop goes on.

    async def _election_step(self) -> None:
        now = self.clock.now()
        self._run_effects(self.election.tick(now))
        delay = max(0.0, self.election.deadline() - now)
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await wait_event(self._wake, min(delay, 1.0))

    async def _ping_step(self) -> None:
        # a burst of quick pings after a (new) master: a good estimate within a second
        burst = self.est.sample_count < PING_BURST_SAMPLES
        await asyncio.sleep(PING_BURST_INTERVAL_S if burst else self.timing.ping_interval_s)
        master = self.election.master
        if master and master != self.cfg.id:
            self._send("ping", t1=self.clock.now())

    async def _housekeeping_step(self) -> None:
        await asyncio.sleep(0.1)
        now = self.clock.now()
        self._publish_node_state()
        if self.is_master:
            self._expire_acks(now)
        self._check_isolation(now)
        self._retry_stalled_songs(now)

    # ------------------------------------------------------------------ effects

    def _send(self, type_: str, **body: Any) -> None:
        self.bus.publish(
            self.topics.internal(type_), encode(type_, self.cfg.id, self.election.term, **body)
        )

    def _send_to(self, node: str, type_: str, **body: Any) -> None:
        self.bus.publish(
            self.topics.internal(f"to/{node}"),
            encode(type_, self.cfg.id, self.election.term, **body),
        )

    def _soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` right after the current message handler (and the bus's flush of what the
        handler published), before the next message is read."""
        assert self.loop is not None
        self.loop.call_soon(fn)

    def _persist(self) -> None:
        """Save term, vote and player state before anything that promises them goes out."""
        term, voted_for = self.election.vote_state()
        self.state_file.save(
            Durable(term, voted_for, self.state, self.state.last, self._last_log_at)
        )

    def _run_effects(self, effects: list[Effect]) -> None:
        if effects:
            self._persist()  # a vote (or a new term) is on disk before it is sent
        for eff in effects:
            if isinstance(eff, SendHeartbeat):
                self._send(
                    "hb",
                    index=self.state.index,
                    log_term=self.state.term,
                    plist=self.state.hash,
                    lead=self._lead(),
                )
            elif isinstance(eff, RequestVotes):
                self.bus.publish(self.topics.status, b"offline", retain=True)
                self._send("vote_req", last_log=list(eff.last_log))
            elif isinstance(eff, GrantVote):
                self._send_to(eff.to, "vote", granted=eff.granted)
            elif isinstance(eff, RequestPreVotes):
                # the proposed term rides in the body: the envelope keeps our real term, so a
                # pre-vote never raises anyone's term
                self._send("prevote_req", next_term=eff.term, last_log=list(eff.last_log))
            elif isinstance(eff, GrantPreVote):
                self._send_to(eff.to, "prevote", pre_term=eff.term, granted=eff.granted)
            elif isinstance(eff, BecameMaster):
                self._become_master()
            elif isinstance(eff, BecameFollower):
                self._become_follower(eff.master)
        self._wake.set()

    def _become_master(self) -> None:
        log.info("node %s is master for term %d", self.cfg.id, self.election.term)
        self._was_master = True
        pb = self.state.playback
        if pb.at is not None and self.est.offset_at(self.clock.now()) is not None:
            # the playback's instants were on the old master's clock: move them onto ours
            from dataclasses import replace

            self.state = replace(self.state, playback=replace(pb, at=self.est.to_local(pb.at)))
        self.est.reset()
        self._fail_pending("a new master took over before f+1 nodes acknowledged")
        self.commits = Commits(self.majority, self.timing.ack_timeout_s, self.state.index)
        self.finished.clear()
        self.recovering = False
        self._published.clear()
        now = self.clock.now()
        for node in self.cfg.peers:
            self.last_seen.setdefault(node, now)
        # the term's first operation: once f+1 nodes hold it, what this master holds of older
        # terms is committed, and what it lacks is discarded everywhere
        new, op = start_term(self.state, self.election.term)
        self._commit(new, op, None)
        self.bus.publish(self.topics.status, b"online", retain=True)
        self._publish_state()
        self._publish_library()
        self._publish_node_state(force=True)

    def _become_follower(self, master: str | None) -> None:
        if master is None and self._was_master:
            log.warning("node %s is master no more (term %d)", self.cfg.id, self.election.term)
            self.bus.publish(self.topics.status, b"offline", retain=True)
        if self._was_master:
            self._fail_pending(
                "the master stepped down before f+1 nodes acknowledged; the command may or may "
                "not take effect: check the state"
            )
        self._was_master = False
        log.info("node %s follows %s in term %d", self.cfg.id, master, self.election.term)
        if master != self._est_master:
            self.est.reset()
            self._est_master = master
        self._publish_node_state(force=True)

    _est_master: str | None = None
    _was_master = False

    # ------------------------------------------------------------------ internal messages

    def _on_internal(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            return
        # everything is checked before anything is acted on: a message that fails changes
        # nothing, not even the term
        try:
            msg = decode(payload)
            if msg.src == self.cfg.id:
                return
            if msg.src not in self.cfg.peers:
                raise ProtocolError(f"from {msg.src!r}, which is not a peer of this cluster")
            body = parse_body(msg)
        except ProtocolError as err:
            self.faults.record("bad internal message", err)
            return
        now = self.clock.now()
        self.election.on_peer_alive(now, msg.src)  # any message: that peer is up
        self.peer_seen[msg.src] = now
        if msg.term > self.election.term:
            self._run_effects(self.election.observe_term(now, msg.term))
        try:
            getattr(self, f"_msg_{msg.type}")(now, msg, body)
        except ProtocolError as err:
            self.faults.record(f"bad {msg.type} message", err)

    def _msg_hb(self, now: float, msg: Message, hb: wire.Heartbeat) -> None:
        self._run_effects(self.election.on_heartbeat(now, msg.src, msg.term))
        if self.election.master != msg.src or self.is_master:
            return
        if self._est_master != msg.src:
            self.est.reset()
            self._est_master = msg.src
        if not self._synced or self.recovering:
            # waiting for the master's state (just started, or out of step): ask again now and
            # then, in case a request or its answer was lost
            if now - self._sync_asked_at >= SYNC_RETRY_S:
                why = "waiting for the master's state" if self._synced else "just started"
                self._request_sync(why)
        elif (hb.log_term, hb.index, hb.plist) != (*self.state.last, self.state.hash):
            self._lag += 1
            if self._lag >= 3:
                self._request_sync("behind the master's heartbeat")
        else:
            self._lag = 0

    def _msg_vote_req(self, now: float, msg: Message, req: wire.VoteRequest) -> None:
        self._run_effects(self.election.on_vote_request(now, msg.src, msg.term, req.last_log))

    def _msg_prevote_req(self, now: float, msg: Message, req: wire.PreVoteRequest) -> None:
        self._run_effects(
            self.election.on_prevote_request(now, msg.src, req.next_term, req.last_log)
        )

    def _msg_prevote(self, now: float, msg: Message, pv: wire.PreVote) -> None:
        self._run_effects(self.election.on_prevote(now, msg.src, pv.pre_term, pv.granted))

    def _msg_vote(self, now: float, msg: Message, vote: wire.Vote) -> None:
        self._run_effects(self.election.on_vote(now, msg.src, msg.term, vote.granted))

    def _msg_ping(self, now: float, msg: Message, ping: wire.Ping) -> None:
        if not self.is_master:
            return
        self.last_seen[msg.src] = now
        t2 = self.clock.from_host(self.bus.received_at)
        self._send_to(msg.src, "pong", t1=ping.t1, t2=t2, t3=self.clock.now())

    def _msg_pong(self, now: float, msg: Message, pong: wire.Pong) -> None:
        if msg.src != self.election.master or msg.term != self.election.term:
            return
        was = self.est.calibrated
        t4 = self.clock.from_host(self.bus.received_at)
        self.est.add(pong.t1, pong.t2, pong.t3, t4)
        if not was and self.est.calibrated:
            log.info("clock calibrated against %s: %s", msg.src, self.est.stats())
            if self._sink_pending:
                self._drive_sink(force=True)

    def _msg_op(self, now: float, msg: Message, body: wire.Op) -> None:
        if msg.term < self.election.term or self.is_master:
            return
        if self.election.master != msg.src:
            self._run_effects(self.election.on_heartbeat(now, msg.src, msg.term))
        op, index = body.op, body.op.index
        if self.recovering:
            self._nack(msg.src, index, "recovering: pulling the master's state")
            return
        try:
            new = apply_op(self.state, op)
        except StaleOp as err:
            log.debug("ignored %s", err)
            return
        except Mismatch as err:
            self._nack(msg.src, index, str(err))
            self._request_sync(str(err))
            return
        if new is self.state:  # held already (a re-delivery): say again what this node holds
            self._ack(msg.src)
            return
        old = self._assign_state(new)
        self._persist()
        self._ack(msg.src)  # the promise is the durable state: the sink comes after
        self._soon(lambda: self._state_changed(old))  # after the bus has sent the ack

    def _ack(self, master: str) -> None:
        """Tell ``master`` the last operation this node holds (on disk): it holds every one
        before it too."""
        last_term, index = self.state.last
        self._send("ack", index=index, log_term=last_term, ok=True, msg="", to=master)

    def _nack(self, master: str, index: Any, why: str) -> None:
        self._send("ack", index=index, ok=False, msg=why, to=master)

    def _msg_ack(self, now: float, msg: Message, ack: wire.Ack) -> None:
        if not self.is_master or msg.term != self.election.term:
            return
        if ack.to not in (None, self.cfg.id):
            return
        self.last_seen[msg.src] = now
        if not ack.ok:
            self.commits.refused(msg.src, ack.msg)
            return
        if ack.log_term != self.election.term or ack.index is None:
            return  # holds operations of this term only up to an older one: counts for nothing
        self._answer(self.commits.ack(msg.src, ack.index, self.state.index))

    def _answer(self, requests: list[Request]) -> None:
        """Success to the clients whose operations f+1 nodes now hold."""
        for req in requests:
            self._reply_ok(req, req.note)

    def _wait_commit(self, req: Request, note: str) -> None:
        """Answer ``req`` with success once f+1 nodes hold what this master holds now (at
        once if they already do)."""
        req.note = note
        self._answer(self.commits.wait(self.clock.now(), self.state.index, req))

    def _fail_pending(self, why: str) -> None:
        for req in self.commits.drop():
            self._reply(req, False, why)

    def _check_isolation(self, now: float) -> None:
        """No master, and no election can succeed (fewer than f+1 nodes reachable, this one
        included): stop playing, as the paper prescribes for a partition, and recover when a
        master is heard again. Checked as master too, so that a spell without a master starts
        when a master steps down."""
        others = self._others
        if not self.isolation.cut_off(now, self.election.master, others, self.peer_seen):
            return
        if self.recovering:
            return
        heard = self.isolation.heard(now, others, self.peer_seen)
        log.warning(
            "node %s is cut off (%d of %d peers reachable, no master): stopping playback",
            self.cfg.id,
            heard,
            len(others),
        )
        self.sink.stop()
        self._scheduled = None
        self.recovering = True
        self._synced = False
        self._publish_node_state(force=True)

    def _request_sync(self, why: str) -> None:
        if not self.recovering:
            log.warning("node %s out of step (%s): pulling the master's state", self.cfg.id, why)
        if self._recovery_started is None:
            self._recovery_started = self.clock.now()
        self.recovering = True
        self._lag = 0
        self._sync_asked_at = self.clock.now()
        # the songs held (and how much of those in progress), so the master can push the rest
        partial = self._missing_chunks(set(self.state.playlist))
        self._send(
            "sync_req", index=self.state.index, songs=sorted(self.store.songs()), partial=partial
        )

    def _missing_chunks(self, songs: Collection[str]) -> dict[str, list[int]]:
        """For those of ``songs`` this node holds part of, the chunks it still lacks (one
        look at the transfers in progress for all of them)."""
        out: dict[str, list[int]] = {}
        for manifest in self.store.partial_songs():
            if manifest.song in songs:
                try:
                    missing = self.store.assembly(manifest).missing()
                except (ProtocolError, OSError):
                    continue
                if missing:
                    out[manifest.song] = missing
        return out

    def _msg_sync_req(self, now: float, msg: Message, req: wire.SyncRequest) -> None:
        if not self.is_master:
            return
        manifests = {}
        for song in set(self.state.playlist):
            if self.store.has(song):
                manifests[song] = Manifest(
                    song, self.store.size_of(song), self.cfg.chunk_size_kib * 1024
                ).to_dict()
        push = songs_to_push(self.state.playlist, manifests, req.songs, req.partial)
        self._send_to(
            msg.src, "sync", state=self.state.to_dict(), manifests=manifests, sending=sorted(push)
        )
        for song, indices in push.items():
            self._send_chunks(song, indices, msg.src)  # in the background, after the state

    def _msg_sync(self, now: float, msg: Message, sync: wire.Sync) -> None:
        if msg.src != self.election.master or msg.term < self.election.term:
            return
        if self._synced and not self.recovering:
            return  # an answer to a request already answered
        new = sync.state
        if not takes_sync(self.state.last, new.last):
            log.info(
                "ignored a stale state from %s: %s, holding %s", msg.src, new.last, self.state.last
            )
            return
        if self._recovery_started is not None:
            self.recovery = {"why_at": round(self._recovery_started, 3)}
            self.recovery["state_ms"] = round((now - self._recovery_started) * 1e3, 2)
            self._recovery_started = None
        self.recovering = False
        self._synced = True
        self._lag = 0
        self._set_state(new)
        self._persist()
        self._ack(msg.src)  # holds the master's operations up to its last: they count
        self._drive_sink(force=True)  # the sink may have been stopped while out of step
        coming = sync.sending
        lacking = {s for s in new.playlist if not self.store.has(s)}
        partial = self._missing_chunks(lacking - coming)
        for song in lacking:
            if song in coming:
                self._song_progress[song] = now  # the master pushes it
            else:
                self._want(song, partial.get(song))
        self._check_songs_recovered()
        self._publish_node_state(force=True)

    def _check_songs_recovered(self) -> None:
        """Note when a recovered node holds every playlist song again (node state `recovery`)."""
        rec = self.recovery
        if rec is None or "songs_ms" in rec:
            return
        if all(self.store.has(s) for s in self.state.playlist):
            rec["songs_ms"] = round((self.clock.now() - rec["why_at"]) * 1e3, 2)

    def _want(self, song: str, missing: list[int] | None) -> None:
        """Ask the master for ``song`` (or, if the master lacks it, a node that holds it)."""
        now = self.clock.now()
        self._song_progress[song] = now
        source = choose_source(
            self.cfg.id,
            self.election.master,
            self.holders.get(song, ()),
            self.peer_seen,
            now,
            NODE_ALIVE_S,
        )
        if source is not None:
            self._send("want", song=song, missing=missing, **{"from": source})

    def _retry_stalled_songs(self, now: float) -> None:
        """A node in step that still lacks playlist songs whose transfer stalled (the master
        that sent them died, chunks were lost; or it became master without them) asks again."""
        if self.election.master is None or self.recovering:
            return
        if not (self.is_master or self._synced):
            return
        needed = [s for s in self.state.playlist if not self.store.has(s)]
        retry = self._song_retry_s
        stalled = stalled_songs(now, needed, self._song_progress, retry, SONG_RETRY_S)
        partial = self._missing_chunks(stalled) if stalled else {}
        for song in stalled:
            waited = retry.get(song, SONG_RETRY_S)
            log.info("no progress on %s… for %g s: asking for it", song[:12], waited)
            retry[song] = next_retry_s(waited, SONG_RETRY_S, SONG_RETRY_MAX_S)
            self._want(song, partial.get(song))

    def _msg_want(self, now: float, msg: Message, want: wire.Want) -> None:
        if want.giver != self.cfg.id and not (want.giver is None and self.is_master):
            return  # asked of another node
        if not self.store.has(want.song):
            return
        self._send_chunks(want.song, want.missing, msg.src)

    def _send_chunks(self, song: str, indices: Iterable[int] | None, node: str) -> None:
        """Owe ``node`` these chunks of ``song`` (all with None); the transfer loop sends
        them in the background."""
        manifest = Manifest(song, self.store.size_of(song), self.cfg.chunk_size_kib * 1024)
        n = manifest.n_chunks
        wanted = range(n) if indices is None else indices
        self.transfers.add(node, song, (i for i in wanted if isinstance(i, int) and 0 <= i < n))
        self._transfer_wake.set()

    async def _transfer_loop(self) -> None:
        """Send the chunks owed, paced: at most TRANSFER_WINDOW of them not yet taken by the
        broker, so a command's messages never queue behind more than that much song data."""
        window = asyncio.Semaphore(TRANSFER_WINDOW)
        sending: set[asyncio.Task[None]] = set()

        async def send(topic: str, payload: bytes) -> None:
            try:
                await self.bus.publish_acked(topic, payload, TRANSFER_ACK_TIMEOUT_S)
            finally:
                window.release()

        def next_chunk(item: tuple[str, str, int]) -> tuple[str, bytes] | None:
            """(topic, frame) of an owed chunk, or None if it is no longer to be sent."""
            node, song, index = item
            if not self.store.has(song):
                self.transfers.drop(song)
                return None
            if self.clock.now() - self.peer_seen.get(node, -math.inf) > NODE_ALIVE_S:
                log.info("%s went quiet: dropping the chunks owed to it", node)
                self.transfers.drop_node(node)
                return None
            manifest = Manifest(song, self.store.size_of(song), self.cfg.chunk_size_kib * 1024)
            data = read_chunk(self.store.path(song), manifest, index)
            frame = encode_chunk(chunk_header(manifest, index), data)
            return self.topics.internal(f"chunk/{node}"), frame

        try:
            while True:
                item = self.transfers.pop()
                if item is None:
                    self._transfer_wake.clear()
                    await self._transfer_wake.wait()
                    continue
                try:
                    chunk = next_chunk(item)
                except Exception as err:  # a song removed meanwhile, a read error: skip it
                    self.faults.record("transfer loop", err)
                    continue
                if chunk is None:
                    continue
                await window.acquire()
                task = asyncio.create_task(send(*chunk))
                sending.add(task)
                task.add_done_callback(sending.discard)
        finally:
            for task in sending:
                task.cancel()

    def _msg_offer(self, now: float, msg: Message, offer: wire.Offer) -> None:
        manifest = offer.manifest
        if self.store.has(manifest.song):
            self._publish_node_state(force=True)
            return
        asm = self.store.assembly(manifest)
        self._want(manifest.song, asm.missing())

    def _msg_finished(self, now: float, msg: Message, fin: wire.Finished) -> None:
        if self.is_master:
            self._count_finished(msg.src, fin.slot, fin.song)

    # ------------------------------------------------------------------ state and the sink

    def _set_state(self, new: PlayerState) -> None:
        self._state_changed(self._assign_state(new))

    def _assign_state(self, new: PlayerState) -> PlayerState:
        """Take the new state (nothing else yet); returns the old one."""
        old = self.state
        self.state = new
        last_log = new.last
        if last_log != self.election.last_log:
            self.election.set_last_log(last_log)
            self._last_log_at = round(time.time(), 3)
        return old

    def _state_changed(self, old: PlayerState) -> None:
        """Carry a state change out: the sink, and (master) the retained state."""
        new = self.state
        if new.playback != old.playback or new.volume != old.volume:
            self._drive_sink()
        if self.is_master:
            self._publish_state_soon()

    def _master_to_host(self, t_master: float) -> float:
        local = t_master if self.is_master else self.est.to_local(t_master)
        return self.clock.to_host(local)

    def _drive_sink(self, force: bool = False) -> None:
        pb = self.state.playback
        self.sink.set_volume(self.state.volume)
        if not self.is_master and not self.est.calibrated:
            self._sink_pending = True
            if pb.state != PLAYING:
                self.sink.stop()
            return
        self._sink_pending = False
        key = (pb, self.election.master if not force else None)
        if key == self._scheduled and not force:
            return
        self._scheduled = key
        if pb.state == PLAYING and pb.song is not None and pb.at is not None:
            track = self.pcm.get(pb.song)
            if track is None:
                if self.store.has(pb.song):
                    self._decode_in_background(pb.song)
                else:
                    self._want(pb.song, None)
            at_host = self._master_to_host(pb.at)
            if self._sink_already_there(pb.song, pb.frame, at_host):
                return
            log.info(
                "play %s… from frame %d in %.3f s",
                pb.song[:12],
                pb.frame,
                at_host - time.monotonic(),
            )
            self.sink.play(pb.song, track, pb.frame, at_host)
            self.store.touch(pb.song, self.clock.now())
        elif pb.at is not None:
            at_host = self._master_to_host(pb.at)
            log.info("%s at frame %d in %.3f s", pb.state, pb.frame, at_host - time.monotonic())
            self.sink.stop(at_host)
        else:
            self.sink.stop()

    def _sink_already_there(self, song: str, frame: int, at_host: float) -> bool:
        """The sink already plays `song` where this schedule puts it (within
        REANCHOR_TOLERANCE_S): a new master's schedule, mapped through a fresh clock estimate,
        differs by a fraction of a millisecond, and re-anchoring for that would click."""
        playing, position = self.sink.position()
        if playing != song or position is None:
            return False
        expected = frame + (time.monotonic() - at_host) * RATE
        return abs(expected - position) < REANCHOR_TOLERANCE_S * RATE

    def _finished_from_sink(self, song: str) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._on_sink_finished, song)

    def _on_sink_finished(self, song: str) -> None:
        pb = self.state.playback
        if pb.state != PLAYING or pb.song != song:
            return
        if self.is_master:
            self._count_finished(self.cfg.id, pb.slot, song)
        else:
            self._send("finished", slot=pb.slot, song=song)

    def _count_finished(self, node: str, slot: int, song: str) -> None:
        reports = self.finished.setdefault((slot, song), set())
        reports.add(node)
        pb = self.state.playback
        if len(reports) >= self.majority and pb.state == PLAYING and pb.slot == slot:
            self.finished.pop((slot, song), None)
            try:
                new, op = next_song(self.state, slot, self._ctx())
            except CommandError:
                return
            self._commit(new, op, None)

    # ------------------------------------------------------------------ songs

    def _on_chunk(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            return
        try:
            header, data = decode_chunk(payload)
        except ProtocolError as err:
            self.faults.record("dropped chunk", err)
            return
        try:
            song, complete = self.store.add_chunk(header, data, self.clock.now())
        except (ProtocolError, OSError) as err:
            self.faults.record("dropped chunk", err)
            claimed = header.get("song")
            if isinstance(claimed, str) and claimed in self.song_events:
                self.load_errors[claimed] = str(err)  # a load waits for it: tell the client
                self.song_events[claimed].set()
            return
        self._song_progress[song] = self.clock.now()
        self._song_retry_s.pop(song, None)  # it moves: back to the first interval
        if complete:
            self._song_arrived(song)

    def _on_upload(self, topic: str, payload: bytes, retain: bool) -> None:
        """A whole song in one message (the `mosquitto_pub -f` path)."""
        if retain:
            return
        try:
            song = self.store.put_bytes(payload, None, self.clock.now())
        except ProtocolError as err:
            if self.is_master:
                self.bus.publish(
                    self.topics.reply("upload"),
                    make_reply(False, "upload", {"size": len(payload)}, str(err)),
                )
            return
        self._song_arrived(song, upload_reply=self.is_master)

    def _song_arrived(self, song: str, upload_reply: bool = False) -> None:
        self._song_progress.pop(song, None)
        self._song_retry_s.pop(song, None)
        self.holders.setdefault(song, set()).add(self.cfg.id)
        self._check_songs_recovered()
        self._evict(keep=song)
        self._decode_in_background(song, upload_reply=upload_reply)
        self._publish_node_state(force=True)
        ev = self.song_events.get(song)
        if ev is not None:
            ev.set()
        if self.state.playback.song == song:
            self._drive_sink(force=True)

    def _evict(self, keep: str) -> None:
        """Keep the store under its cap: least recently used first, never a song in the
        playlist, the one playing, or the one that just arrived."""
        protected = {*self.state.playlist, keep}
        if self.state.playback.song:
            protected.add(self.state.playback.song)
        for gone in self.store.evict(protected, self.clock.now()):
            log.info("evicted song %s… (store over %d MB)", gone[:12], self.cfg.store_cap_mb)
            self.pcm.remove(gone)
            self.holders.get(gone, set()).discard(self.cfg.id)

    def _decode_in_background(self, song: str, upload_reply: bool = False) -> None:
        if song in self._decoding or self.loop is None:
            return
        if self.pcm.get(song) is not None and self.store.meta(song):
            if upload_reply:
                self._upload_done(song, None, self.store.size_of(song))
            return
        self._decoding.add(song)
        src = self.store.path(song)
        size = self.store.size_of(song)

        def work() -> tuple[dict[str, Any], str | None]:
            meta = audio.probe(src)
            try:
                track = self.pcm.decode(song, src)
            except audio.DecodeError as err:
                return meta, str(err)
            meta["frames"] = track.frames
            meta["duration_s"] = track.frames / RATE
            return meta, None

        fut = self.loop.run_in_executor(self._decoder, work)

        def done(f: asyncio.Future[tuple[dict[str, Any], str | None]]) -> None:
            self._decoding.discard(song)
            if f.cancelled():  # the node is stopping
                return
            try:
                meta, error = f.result()
            except Exception as err:  # a decoder crash must not take the node down
                meta, error = {}, f"decoder failed: {err}"
            if error is not None:
                log.warning("song %s… cannot be decoded: %s", song[:12], error)
                if song not in self.state.playlist:
                    self.store.remove(song)
                    self.holders.get(song, set()).discard(self.cfg.id)
                    self._publish_node_state(force=True)
                if upload_reply:
                    self._upload_done(song, error, size)
                ev = self.song_events.get(song)
                if ev is not None:
                    ev.set()
                return
            meta["size"] = size
            self.store.set_meta(song, meta)
            if upload_reply:
                self._upload_done(song, None, size)
            if self.is_master:
                self._publish_library()
                self._publish_state()
            pb = self.state.playback
            track = self.pcm.get(song)
            if pb.song == song and track is not None:
                self.sink.attach(song, track)
            ev = self.song_events.get(song)
            if ev is not None:
                ev.set()

        fut.add_done_callback(done)

    def _upload_done(self, song: str, error: str | None, size: int) -> None:
        if not self.is_master:
            return
        params = {"song": song, "size": size}
        if error:
            msg = f"not a playable song: {error}"
        else:
            msg = f"stored {self.store.meta(song).get('title') or song[:12]}"
            self._offer(song)
        self.bus.publish(
            self.topics.reply("upload"), make_reply(error is None, "upload", params, msg)
        )

    def _offer(self, song: str) -> None:
        manifest = Manifest(song, self.store.size_of(song), self.cfg.chunk_size_kib * 1024)
        self._send("offer", manifest=manifest.to_dict())

    def _on_node_state(self, topic: str, payload: bytes, retain: bool) -> None:
        node = topic.split("/")[-2]
        if node == self.cfg.id or node not in self.cfg.peers:
            return
        if not payload:  # cleared
            self.node_info.pop(node, None)
            return
        try:
            info = PeerState.parse(payload)
        except ProtocolError as err:
            self.faults.record("bad node state", err)
            return
        self.node_info[node] = info
        for song, who in self.holders.items():
            if song not in info.songs:
                who.discard(node)
        for song in info.songs:
            self.holders.setdefault(song, set()).add(node)
            ev = self.song_events.get(song)
            if ev is not None:
                ev.set()

    # ------------------------------------------------------------------ client commands (master)

    def _on_command(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain or not self.is_master:
            return  # a retained command is never replayed; only the master serves
        verb = self.topics.verb_of(topic) or ""
        log.debug("command %s: %r", verb, payload[:200])
        try:
            req = parse_command(verb, payload)
        except (ProtocolError, UnicodeDecodeError) as err:
            rt = _sniff_reply_to(payload)
            if rt:
                self.bus.publish(
                    self.topics.reply(rt), make_reply(False, verb, None, f"bad command: {err}")
                )
            return
        if verb not in VERBS:
            self._reply(
                req, False, f"unknown command {verb!r}; try one of {', '.join(sorted(VERBS))}"
            )
            return
        try:
            if verb == "status":
                self._reply(req, True, self._summary(), state=self._state_doc())
            elif verb == "load":
                self._tasks.append(asyncio.create_task(self._serve_load(req)))
            else:
                self._serve(req)
        except Unchanged as err:
            # nothing to do, and no failure: once f+1 nodes hold the state that makes it so
            self._wait_commit(req, str(err))
        except CommandError as err:
            self._reply(req, False, str(err))
        except ProtocolError as err:
            self._reply(req, False, f"bad {verb} argument: {err}")

    def _serve(self, req: Request) -> None:
        arg = req.arg
        if req.verb == "enqueue":
            arg = self._resolve_song(arg)
        new, op = apply_command(self.state, req.verb, arg, self._ctx())
        self._commit(new, op, req)

    def _resolve_song(self, arg: Any) -> str:
        if not isinstance(arg, str) or not arg:
            raise CommandError("enqueue needs a song hash or an exact title")
        if len(arg) == 56 and all(c in "0123456789abcdef" for c in arg):
            if not self.store.has(arg):
                raise CommandError(f"song {arg[:12]}… is not loaded; load it first")
            return arg
        matches = [s for s in self.store.songs() if self.store.meta(s).get("title") == arg]
        if not matches:
            raise CommandError(f"no loaded song has the title {arg!r}")
        if len(matches) > 1:
            raise CommandError(f"{len(matches)} songs have the title {arg!r}; use the hash")
        return matches[0]

    def _commit(self, new: PlayerState, op: dict[str, Any], req: Request | None) -> None:
        """Apply ``new`` (made by ``op``) here, send ``op`` to the speakers, and answer ``req``
        once f+1 nodes hold it."""
        self.commits.sent(self.clock.now(), new.index, req)
        self._send("op", op=op)
        old = self._assign_state(new)
        term = self.election.term

        def own_part() -> None:
            # the master's own acknowledgement: on disk before any ack is counted (acks are read
            # after this callback). Deferred so that the bus sends the op first, once this
            # handler returns: the speakers' round trip overlaps the fsync and the sink.
            self._persist()
            if self.is_master and self.election.term == term:
                self._answer(self.commits.saved(new.index))
            self._state_changed(old)

        self._soon(own_part)

    def _expire_acks(self, now: float) -> None:
        for failed in self.commits.expire(now):
            why = "; ".join(f"{n}: {m}" for n, m in failed.reasons)
            self._reply(
                failed.request,
                False,
                f"applied on the master but only {failed.held_by} of {self.majority} nodes "
                f"acknowledged in {self.timing.ack_timeout_s:g} s" + (f" ({why})" if why else ""),
            )

    def _reply_ok(self, req: Request, msg: str) -> None:
        self._reply(req, True, msg)

    def _reply(self, req: Request, success: bool, msg: str, **extra: Any) -> None:
        log.debug("reply to %s %s: %s %s", req.reply_to, req.verb, success, msg)
        if self._state_timer is not None:
            self._publish_state()  # a client that hears the reply finds the retained state current
        if req.reply_to is None:
            return
        self.bus.publish(
            self.topics.reply(req.reply_to),
            make_reply(success, req.verb, req.params, msg, req.client_req_id, **extra),
        )

    def _ctx(self) -> Context:
        frames: dict[str, int] = {}
        for song in self.store.songs():
            track = self.pcm.get(song)
            if track is not None:
                frames[song] = track.frames
            else:
                dur = self.store.meta(song).get("duration_s")
                frames[song] = int(dur * RATE) if isinstance(dur, (int, float)) else UNKNOWN_FRAMES
        return Context(self.clock.now(), self._lead(), frames, term=self.election.term)

    def _lead(self) -> float:
        rtts: list[float | None] = []
        now = self.clock.now()
        for node, info in self.node_info.items():
            if now - self.last_seen.get(node, -1e9) < NODE_ALIVE_S:
                rtts.append(info.rtt_p90_s)
        return lead_time(
            rtts, self.timing.lead_min_s, self.timing.lead_max_s, self.timing.lead_rtt_factor
        )

    async def _serve_load(self, req: Request) -> None:
        try:
            manifest = Manifest.from_dict(
                {
                    "song": req.params.get("song"),
                    "size": req.params.get("size"),
                    "chunk_size": req.params.get("chunk_size", self.cfg.chunk_size_kib * 1024),
                },
                max_size=self.cfg.max_song_mb * 1024 * 1024,
            )
        except ProtocolError as err:
            self._reply(req, False, f"bad load manifest: {err}")
            return
        if not isinstance(req.params.get("bg", False), bool):
            self._reply(req, False, "bad load manifest: bg must be true or false")
            return
        if req.reply_to is None:
            log.warning("a load without reply_to cannot be served (nobody to ask for chunks)")
            return
        song = manifest.song
        ev = self.song_events.setdefault(song, asyncio.Event())
        xfer = self.topics.internal(f"xfer/{req.reply_to}")
        try:
            if self.store.has(song):  # nothing to send; the client now waits for replication
                self.bus.publish(xfer, json.dumps({"song": song, "missing": []}).encode())
            else:
                asm = self.store.assembly(manifest)
                self.bus.publish(
                    xfer, json.dumps({"song": song, "missing": asm.missing()}).encode()
                )
                last = asm.received_count
                while not self.store.has(song):
                    ev.clear()
                    try:
                        await wait_event(ev, self.timing.upload_idle_timeout_s)
                        error = self.load_errors.pop(song, None)
                        if error is not None:
                            self._reply(req, False, f"the song's bytes were refused: {error}")
                            return
                    except TimeoutError:
                        got = asm.received_count
                        if got == last and not self.store.has(song):
                            self._reply(
                                req,
                                False,
                                f"upload incomplete: received {got} of {manifest.n_chunks} "
                                "chunks; load again to resume",
                            )
                            return
                        last = got
            # a cheap look at the bytes refuses what is plainly not audio; the decode that
            # follows in the background decides for good (an undecodable song is dropped)
            try:
                with self.store.path(song).open("rb") as f:
                    kind = audio.sniff(f.read(12))
            except OSError:  # the decoder refused it already and dropped it
                kind = None
            if kind is None:
                if song not in self.state.playlist:
                    self.store.remove(song)
                    self._publish_node_state(force=True)
                self._reply(req, False, "not a playable song: not a known audio format")
                return
            self.holders.setdefault(song, set()).add(self.cfg.id)
            name = req.params.get("name")
            name = name[:200] if isinstance(name, str) else None
            title = self.store.meta(song).get("title") or name or song[:12]
            if req.params.get("bg"):
                self._offer(song)
                self._reply(req, True, f"{title} is on the master; replicating in the background")
                return
            self._offer(song)
            deadline = self.clock.now() + max(10.0, manifest.size / 1e6)
            while len(self.holders.get(song, ())) < self.majority:
                if self.clock.now() > deadline:
                    held = len(self.holders.get(song, ()))
                    self._reply(req, False, f"only {held} of {self.majority} nodes hold {title}")
                    return
                ev.clear()
                with contextlib.suppress(TimeoutError):
                    await wait_event(ev, 1.0)
            self._reply(req, True, f"loaded {title} on {len(self.holders[song])} nodes")
        finally:
            self.song_events.pop(song, None)
            self.load_errors.pop(song, None)

    # ------------------------------------------------------------------ published state

    def _title(self, song: str | None) -> dict[str, Any]:
        return self.store.meta(song) if song and self.store.has(song) else {}

    def _state_doc(self) -> dict[str, Any]:
        now = self.clock.now()
        pb = self.state.playback
        meta = self._title(pb.song)
        alive = [self.cfg.id] + [
            n
            for n in self.cfg.peers
            if n != self.cfg.id and now - self.last_seen.get(n, -1e9) < NODE_ALIVE_S
        ]
        return {
            "playback": pb.state,
            "song": pb.song,
            "title": meta.get("title"),
            "artist": meta.get("artist"),
            "duration": meta.get("duration_s"),
            "position": round(pb.frame_at(now) / RATE, 3),
            "position_at": round(time.time(), 3),
            "queue": list(self.state.playlist[pb.slot + 1 :]),
            "playlist": list(self.state.playlist),
            "slot": pb.slot,
            "volume": self.state.volume,
            "master": self.cfg.id,
            "term": self.election.term,
            "nodes": sorted(alive),
        }

    def _summary(self) -> str:
        d = self._state_doc()
        what = d["title"] or (d["song"][:12] if d["song"] else "nothing")
        return (
            f"{d['playback']}: {what} at {d['position']:.1f} s, volume {d['volume']}, "
            f"{len(d['playlist'])} in playlist, master {d['master']} (term {d['term']}), "
            f"nodes {','.join(d['nodes'])}"
        )

    def _publish_state_soon(self) -> None:
        """Publish the retained state shortly, once for a burst of changes: off the path of
        the command that changed it."""
        if self._state_timer is None and self.loop is not None:
            self._state_timer = self.loop.call_later(STATE_PUBLISH_DELAY_S, self._publish_state)

    def _publish_state(self) -> None:
        if self._state_timer is not None:
            self._state_timer.cancel()
            self._state_timer = None
        doc = self._state_doc()
        self._retain(self.topics.state, json.dumps(doc, separators=(",", ":")).encode(), force=True)
        for key, value in doc.items():
            if key == "position_at":
                continue
            text = (
                ""
                if value is None
                else (json.dumps(value) if isinstance(value, (list, dict)) else str(value))
            )
            self._retain(self.topics.state_field(key), text.encode())
        self._retain(self.topics.state_field("position_at"), str(doc["position_at"]).encode())

    def _retain(self, topic: str, payload: bytes, force: bool = False) -> None:
        if not force and self._published.get(topic) == payload:
            return
        self._published[topic] = payload
        self.bus.publish(topic, payload, retain=True)

    def _publish_library(self) -> None:
        lib = []
        for song in sorted(self.store.songs()):
            meta = self.store.meta(song)
            lib.append(
                {
                    "hash": song,
                    "title": meta.get("title"),
                    "artist": meta.get("artist"),
                    "duration": meta.get("duration_s"),
                    "size": self.store.size_of(song),
                }
            )
        self._retain(self.topics.library, json.dumps(lib, separators=(",", ":")).encode())

    def _publish_node_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._node_state_sent < NODE_STATE_PERIOD_S:
            return
        stats = self.est.stats()
        stats["rtt_p90_s"] = self.est.rtt_estimate()
        doc = {
            "role": self.election.role.value,
            "term": self.election.term,
            "master": self.election.master,
            "recovering": self.recovering,
            "recovery": self.recovery,
            "clock": stats,
            "songs": sorted(self.store.songs()),
            "index": self.state.index,
            "last_op": {
                "term": self.election.last_log[0],
                "index": self.election.last_log[1],
                "applied_at": self._last_log_at,
            },
            "playlist_hash": self.state.hash,
            "playback": self.state.playback.state,
            "faults": self.faults.snapshot(),  # failures survived, by where and type
            "loop_stalls": self.watchdog.stalls,  # event loop blocked > 0.5 s
        }
        payload = json.dumps(doc, separators=(",", ":")).encode()
        self._node_state_sent = now
        self.bus.publish(self.topics.node_state(self.cfg.id), payload, retain=True)


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait for `event`, raising TimeoutError after `timeout_s`. (asyncio.wait_for can swallow a
    cancellation on Python 3.11 when the event fires at the same moment; asyncio.timeout cannot.)"""
    async with asyncio.timeout(timeout_s):
        await event.wait()


def _sniff_reply_to(payload: bytes) -> str | None:
    try:
        obj = json.loads(payload)
        rt = obj.get("reply_to") if isinstance(obj, dict) else None
        from nsync_mqtt.messages import check_id

        return check_id(rt) if rt else None
    except (ValueError, RecursionError, ProtocolError, UnicodeDecodeError, AttributeError):
        return None


def run_node(cfg: NodeConfig) -> int:
    """Blocking entry point of `nsync node`: runs until SIGINT/SIGTERM."""

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack

    async def main() -> None:
        node = Node(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
        loop.add_signal_handler(signal.SIGUSR2, log_tasks)  # `kill -USR2 <pid>`: every task
        await node.run()

    try:
        asyncio.run(main())
    except NSyncError as err:
        log.error("%s", err)
        return 1
    return 0
