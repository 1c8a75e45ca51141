"""Every node's duties, pure: the node's state machine.

:class:`Speaker` is one node as the cluster protocol sees it: the election, the clock estimate
against the master, the replicated player state (apply an operation, save it, acknowledge it),
recovery (pull the master's state and the songs it lacks), the sink's schedule and the
"finished" reports. When the election makes this node master, a :class:`master.Master` is
created beside it for the master's duties and dropped on step-down.

Every entry point takes ``now`` (this node's clock, read once per event by the driver) and
returns :class:`effects.Effects`. ``step`` checks a message once (envelope, peer, typed body,
then the term, as raft's ``Step`` does) and hands it to the handler table of the node's role.
Songs on disk are seen through a read-only :class:`Library`; the driver changes the store and
reports back (``song_arrived``, ``decoded``, ``chunk_progress``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from nsync_mqtt import wire
from nsync_mqtt.effects import (
    HOLD,
    PLAY,
    RETIME,
    STOP,
    Decode,
    Effects,
    Publish,
    SendChunks,
    SinkPlan,
)
from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.master import NODE_ALIVE_S, Master
from nsync_mqtt.messages import Message, Topics, decode, encode
from nsync_mqtt.persist import Durable
from nsync_mqtt.playlist import PLAYING, Mismatch, PlayerState, StaleOp, apply_op, takes_sync
from nsync_mqtt.replication import Manifest, choose_source, next_retry_s, stalled_songs
from nsync_mqtt.timesync import ClockEstimator
from nsync_mqtt.timing import Timing
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
    SendHeartbeat,
)
from nsync_mqtt.wire import PeerState, parse_body

log = logging.getLogger("nsync.node")

BROKER_FAILOVER_GRACE_S = 1.5  # per broker in the list, before a masterless node gives up
SYNC_RETRY_S = 0.5  # a node waiting for the master's state asks again this often
PING_BURST_SAMPLES = 32  # samples taken quickly after a master change ...
PING_BURST_INTERVAL_S = 0.02  # ... at this interval
SONG_RETRY_S = 3.0  # a lacked playlist song with no progress for this long is asked for again
SONG_RETRY_MAX_S = 60.0  # ... the interval doubling up to this while it stays stalled
SONG_PROGRESS_KEEP_S = 600.0  # progress on a song outside the playlist is forgotten after this
PINGS_REMEMBERED = 64  # a pong must answer one of this node's last pings
LAG_HEARTBEATS = 3  # heartbeats showing another log before a node pulls the master's state


class Library(Protocol):
    """What a node holds on disk, read-only (the driver's song store and PCM cache)."""

    def has(self, song: str) -> bool: ...
    def songs(self) -> list[str]: ...
    def meta(self, song: str) -> dict[str, Any]: ...
    def size_of(self, song: str) -> int: ...
    def frames(self, song: str) -> int | None:
        """The decoded length in frames, when the song is decoded."""
        ...

    def missing_chunks(self, songs: Collection[str]) -> dict[str, list[int]]:
        """For those of ``songs`` partly received, the chunks still lacking."""
        ...

    def assembly_missing(self, manifest: Manifest) -> list[int]:
        """The chunks of ``manifest`` not received yet (opens its transfer)."""
        ...

    def received_count(self, manifest: Manifest) -> int: ...
    def sniff(self, song: str) -> str | None:
        """The audio format the song's first bytes announce, None if none."""
        ...


class Speaker:
    def __init__(
        self,
        node_id: str,
        peers: Sequence[str],
        cluster: str,
        timing: Timing,
        library: Library,
        rng: random.Random,
        now: float,
        durable: Durable,
        *,
        chunk_size: int,
        max_song_bytes: int,
        brokers: int = 1,
        wall: Callable[[], float] = time.time,
        discovery_prefix: str | None = None,
    ) -> None:
        self.id = node_id
        self.peers = list(peers)
        self.others = [p for p in peers if p != node_id]
        self.topics = Topics(cluster)
        self.timing = timing
        self.lib = library
        self.chunk_size = chunk_size
        self.max_song_bytes = max_song_bytes
        self.wall = wall  # Unix time, for the timestamps users read (never for decisions)
        self.discovery_prefix = discovery_prefix  # Home Assistant MQTT discovery, if on
        self.election = Election(
            node_id,
            peers,
            timing,
            rng,
            now,
            term=durable.term,
            voted_for=durable.voted_for,
            last_log=durable.state.last,
        )
        self.est = ClockEstimator(calibration_samples=timing.calibration_pings)
        # the saved playback's instants were on a clock of the past: keep the place, not the
        # schedule (a restarted node pulls the master's state; a restarted cluster is paused)
        self.state = durable.state.at_rest()
        self.last_log_at = durable.last_log_at  # Unix time, kept across restarts
        self.synced = False  # pull the master's state at the first heartbeat
        self.recovering = False
        self.recovery: dict[str, float] | None = None  # the last recovery's timings
        self._recovery_started: float | None = None
        self._sync_asked_at = -math.inf
        self._lag = 0
        self._est_master: str | None = None
        self._sink_pending = False  # playback waits for clock calibration
        self._scheduled: tuple[Any, ...] | None = None
        self.song_progress: dict[str, float] = {}  # song lacked -> last chunk in or request out
        self._song_retry_s: dict[str, float] = {}  # song stalled -> interval before asking again
        self.peer_seen: dict[str, float] = {}  # any message from a peer
        self._pings_sent: deque[float] = deque(maxlen=PINGS_REMEMBERED)  # t1 of recent pings
        self.stray_pongs = 0  # pongs that answered none of them: not used for the clock
        self.holders: dict[str, set[str]] = {}  # song -> nodes that hold it
        self.node_info: dict[str, PeerState] = {}  # peers' retained node states
        # the bus may still be working through its broker list: give each broker its turn
        self.isolation = IsolationWatch(
            window_s=timing.election_timeout_max_s,
            grace_s=timing.election_timeout_max_s + brokers * BROKER_FAILOVER_GRACE_S,
            majority=self.majority,
        )
        self.master: Master | None = None
        # one handler table per role (the master's in Master.handlers), then these for all
        self.common_handlers: dict[str, Callable[..., None]] = {
            "hb": self._hb,
            "vote_req": self._vote_req,
            "prevote_req": self._prevote_req,
            "prevote": self._prevote,
            "vote": self._vote,
            "want": self._want_msg,
            "offer": self._offer,
        }
        self.follower_handlers: dict[str, Callable[..., None]] = {
            "pong": self._pong,
            "op": self._op,
            "sync": self._sync,
        }

    # ------------------------------------------------------------------ reading

    @property
    def majority(self) -> int:
        return self.election.majority

    @property
    def term(self) -> int:
        return self.election.term

    def durable(self) -> Durable:
        term, voted_for = self.election.vote_state()
        return Durable(term, voted_for, self.state, self.state.last, self.last_log_at)

    def ping_interval(self) -> float:
        """A burst of quick pings after a (new) master: a good estimate within a second."""
        if self.est.sample_count < PING_BURST_SAMPLES:
            return PING_BURST_INTERVAL_S
        return self.timing.ping_interval_s

    def send(self, eff: Effects, type_: str, **body: Any) -> None:
        eff.out.append(self._msg(type_, type_, body))

    def send_to(self, eff: Effects, node: str, type_: str, **body: Any) -> None:
        eff.out.append(self._msg(f"to/{node}", type_, body))

    def send_master(self, eff: Effects, type_: str, master: str | None = None, **body: Any) -> None:
        """To the master alone (``master``, or the one this node follows), on its ``to/`` topic;
        broadcast when no master is known."""
        master = master or self.election.master
        if master is None:
            self.send(eff, type_, **body)
        else:
            self.send_to(eff, master, type_, **body)

    def _msg(self, name: str, type_: str, body: dict[str, Any]) -> Publish:
        payload = encode(type_, self.id, self.election.term, **body)
        return Publish(self.topics.internal(name), payload)

    # ------------------------------------------------------------------ messages

    def step(
        self, now: float, payload: bytes, rx: float | None = None, signer: str | None = None
    ) -> Effects:
        """An internal message (not a retained one) read off the bus at local time ``rx``;
        ``signer``: the peer whose key signature it carried, when the cluster signs."""
        eff = Effects()
        # everything is checked before anything is acted on: a message that fails changes
        # nothing, not even the term
        try:
            msg = decode(payload)
            if msg.src == self.id:
                return eff
            if msg.src not in self.peers:
                raise ProtocolError(f"from {msg.src!r}, which is not a peer of this cluster")
            if signer is not None and msg.src != signer:
                raise ProtocolError(f"signed by {signer!r} but sent as {msg.src!r}")
            body = parse_body(msg)
        except ProtocolError as err:
            eff.faults.append(("bad internal message", err))
            return eff
        self.election.on_peer_alive(now, msg.src)  # any message: that peer is up
        self.peer_seen[msg.src] = now
        if msg.term > self.election.term:
            self._election(now, eff, self.election.observe_term(now, msg.term))
        table = self.master.handlers if self.master is not None else self.follower_handlers
        handler = table.get(msg.type) or self.common_handlers.get(msg.type)
        if handler is None:
            return eff
        try:
            handler(now, eff, msg, body, now if rx is None else rx)
        except ProtocolError as err:
            eff.faults.append((f"bad {msg.type} message", err))
        except Exception as err:  # a bug: counted, and what was decided so far is carried out
            eff.faults.append((f"{msg.type} handler", err))
        return eff

    def _hb(self, now: float, eff: Effects, msg: Message, hb: wire.Heartbeat, rx: float) -> None:
        self._election(now, eff, self.election.on_heartbeat(now, msg.src, msg.term))
        if self.election.master != msg.src or self.master is not None:
            return
        self._follow_clock_of(msg.src)
        if not self.synced or self.recovering:
            # waiting for the master's state (just started, or out of step): ask again now and
            # then, in case a request or its answer was lost
            if now - self._sync_asked_at >= SYNC_RETRY_S:
                why = "waiting for the master's state" if self.synced else "just started"
                self.request_sync(now, eff, why)
        elif (hb.log_term, hb.index, hb.plist) != (*self.state.last, self.state.hash):
            self._lag += 1
            if self._lag >= LAG_HEARTBEATS:
                self.request_sync(now, eff, "behind the master's heartbeat")
        else:
            self._lag = 0

    def _follow_clock_of(self, master: str | None) -> None:
        if self._est_master != master:
            self.est.reset()
            self._est_master = master

    def _vote_req(self, now: float, eff: Effects, msg: Message, req: Any, rx: float) -> None:
        self._election(
            now, eff, self.election.on_vote_request(now, msg.src, msg.term, req.last_log)
        )

    def _prevote_req(self, now: float, eff: Effects, msg: Message, req: Any, rx: float) -> None:
        effects = self.election.on_prevote_request(now, msg.src, req.next_term, req.last_log)
        self._election(now, eff, effects)

    def _prevote(self, now: float, eff: Effects, msg: Message, pv: Any, rx: float) -> None:
        self._election(now, eff, self.election.on_prevote(now, msg.src, pv.pre_term, pv.granted))

    def _vote(self, now: float, eff: Effects, msg: Message, vote: Any, rx: float) -> None:
        self._election(now, eff, self.election.on_vote(now, msg.src, msg.term, vote.granted))

    def _pong(self, now: float, eff: Effects, msg: Message, pong: wire.Pong, rx: float) -> None:
        if msg.src != self.election.master or msg.term != self.election.term:
            return
        if pong.t1 not in self._pings_sent:  # a duplicate, a late answer or a forgery
            self.stray_pongs += 1
            return
        self._pings_sent.remove(pong.t1)  # one sample per ping (a duplicate answers nothing)
        was = self.est.calibrated
        sample = self.est.add(pong.t1, pong.t2, pong.t3, rx)
        if not was and self.est.calibrated:
            log.info("clock calibrated against %s: %s", msg.src, self.est.stats())
            if self._sink_pending:
                self.drive_sink(now, eff, force=True)
        elif sample is not None and self.est.calibrated:
            self.retime_sink(eff)

    def _op(self, now: float, eff: Effects, msg: Message, body: wire.Op, rx: float) -> None:
        if msg.term < self.election.term:
            return
        if self.election.master != msg.src:
            self._election(now, eff, self.election.on_heartbeat(now, msg.src, msg.term))
            if self.master is not None:
                return
        op, index = body.op, body.op.index
        if self.recovering:
            self._nack(eff, msg.src, index, "recovering: pulling the master's state")
            return
        try:
            new = apply_op(self.state, op)
        except StaleOp as err:
            log.debug("ignored %s", err)
            return
        except Mismatch as err:
            self._nack(eff, msg.src, index, str(err))
            self.request_sync(now, eff, str(err))
            return
        if new is self.state:  # held already (a re-delivery): say again what this node holds
            self._ack(eff, msg.src)
            return
        old = self.assign_state(new)
        eff.persist, eff.op = True, op
        self._ack(eff, msg.src)  # the promise is the durable state: the sink comes after
        self.state_changed(now, eff, old)

    def _ack(self, eff: Effects, master: str) -> None:
        """Tell ``master`` the last operation this node holds (on disk): it holds every one
        before it too."""
        last_term, index = self.state.last
        self.send_master(
            eff, "ack", master, index=index, log_term=last_term, ok=True, msg="", to=master
        )

    def _nack(self, eff: Effects, master: str, index: Any, why: str) -> None:
        self.send_master(eff, "ack", master, index=index, ok=False, msg=why, to=master)

    def _sync(self, now: float, eff: Effects, msg: Message, sync: wire.Sync, rx: float) -> None:
        if msg.src != self.election.master or msg.term < self.election.term:
            return
        if self.synced and not self.recovering:
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
        self.synced = True
        self._lag = 0
        self.assign_state(new)
        eff.persist = True
        self._ack(eff, msg.src)  # holds the master's operations up to its last: they count
        self.drive_sink(now, eff, force=True)  # the sink may have been stopped while out of step
        coming = sync.sending
        lacking = {s for s in new.playlist if not self.lib.has(s)}
        partial = self.lib.missing_chunks(lacking - coming)
        for song in sorted(lacking):
            if song in coming:
                self.song_progress[song] = now  # the master pushes it
            else:
                self.want(now, eff, song, partial.get(song))
        self._check_songs_recovered(now)
        eff.node_state = True

    def _want_msg(self, now: float, eff: Effects, msg: Message, want: wire.Want, rx: float) -> None:
        if want.giver != self.id and not (want.giver is None and self.master is not None):
            return  # asked of another node
        if not self.lib.has(want.song):
            return
        self.send_chunks(eff, want.song, want.missing, msg.src)

    def _offer(self, now: float, eff: Effects, msg: Message, offer: wire.Offer, rx: float) -> None:
        manifest = offer.manifest
        if offer.name is not None:
            eff.names.append((manifest.song, offer.name))
        if self.lib.has(manifest.song):
            eff.node_state = True
            return
        if offer.upload:  # a client is sending it on chunk/all: take those chunks
            eff.expect.append(manifest)
            return
        self.want(now, eff, manifest.song, self.lib.assembly_missing(manifest))

    def send_chunks(
        self, eff: Effects, song: str, indices: Iterable[int] | None, node: str
    ) -> None:
        n = self.manifest(song).n_chunks
        wanted = None if indices is None else tuple(i for i in indices if 0 <= i < n)
        eff.chunks.append(SendChunks(node, song, wanted))

    def manifest(self, song: str) -> Manifest:
        return Manifest(song, self.lib.size_of(song), self.chunk_size)

    # ------------------------------------------------------------------ the election

    def _election(self, now: float, eff: Effects, effects: list[Effect]) -> None:
        if effects:
            eff.persist = True  # a vote (or a new term) is on disk before it is sent
        for e in effects:
            if isinstance(e, SendHeartbeat):
                self.send(
                    eff,
                    "hb",
                    index=self.state.index,
                    log_term=self.state.term,
                    plist=self.state.hash,
                    lead=self.master.lead(now) if self.master else self.timing.lead_min_s,
                )
            elif isinstance(e, RequestVotes):
                eff.out.append(Publish(self.topics.status, b"offline", retain=True))
                self.send(eff, "vote_req", last_log=list(e.last_log))
            elif isinstance(e, GrantVote):
                self.send_to(eff, e.to, "vote", granted=e.granted)
            elif isinstance(e, RequestPreVotes):
                # the proposed term rides in the body: the envelope keeps our real term, so a
                # pre-vote never raises anyone's term
                self.send(eff, "prevote_req", next_term=e.term, last_log=list(e.last_log))
            elif isinstance(e, GrantPreVote):
                self.send_to(eff, e.to, "prevote", pre_term=e.term, granted=e.granted)
            elif isinstance(e, BecameMaster):
                self._become_master(now, eff)
            elif isinstance(e, BecameFollower):
                self._become_follower(now, eff, e.master)
        eff.wake = True

    def election_tick(self, now: float) -> Effects:
        eff = Effects()
        self._election(now, eff, self.election.tick(now))
        return eff

    def _become_master(self, now: float, eff: Effects) -> None:
        log.info("node %s is master for term %d", self.id, self.election.term)
        pb = self.state.playback
        if pb.at is not None and self.est.offset_at(now) is not None:
            # the playback's instants were on the old master's clock: move them onto ours
            self.state = replace(self.state, playback=replace(pb, at=self.est.to_local(pb.at)))
        self.est.reset()
        self._est_master = self.id
        self.recovering = False
        self.master = Master(self, now)
        self.master.start(now, eff)
        eff.node_state = True

    def _become_follower(self, now: float, eff: Effects, master: str | None) -> None:
        if self.master is not None:
            self.master.step_down(eff, master)
            self.master = None
        log.info("node %s follows %s in term %d", self.id, master, self.election.term)
        self._follow_clock_of(master)
        eff.node_state = True

    # ------------------------------------------------------------------ timers

    def ping(self, now: float) -> Effects:
        eff = Effects()
        master = self.election.master
        if master and master != self.id:
            self._pings_sent.append(now)
            self.send_to(eff, master, "ping", t1=now)
        return eff

    def tick(self, now: float) -> Effects:
        """Housekeeping, every 0.25 s: acks and loads that expire, isolation, stalled songs."""
        eff = Effects()
        if self.master is not None:
            self.master.tick(now, eff)
        self._check_isolation(now, eff)
        self._forget_stale_progress(now)
        self._retry_stalled_songs(now, eff)
        return eff

    def _forget_stale_progress(self, now: float) -> None:
        """Chunks of songs nobody finished (a load given up, junk from a peer) leave progress
        behind: forgotten after ``SONG_PROGRESS_KEEP_S`` unless the playlist needs the song, so
        the maps keyed by song stay bounded."""
        stale = [s for s, at in self.song_progress.items() if now - at > SONG_PROGRESS_KEEP_S]
        if stale:  # (the playlist, thousands of songs long, is read only then)
            wanted = set(self.state.playlist)
            for song in stale:
                if song not in wanted:
                    del self.song_progress[song]
        for song in list(self._song_retry_s):
            if song not in self.song_progress:
                del self._song_retry_s[song]

    def _check_isolation(self, now: float, eff: Effects) -> None:
        """No master, and no election can succeed (fewer than f+1 nodes reachable, this one
        included): stop playing, as the paper prescribes for a partition, and recover when a
        master is heard again. Checked as master too, so that a spell without a master starts
        when a master steps down."""
        if not self.isolation.cut_off(now, self.election.master, self.others, self.peer_seen):
            return
        if self.recovering:
            return
        heard = self.isolation.heard(now, self.others, self.peer_seen)
        log.warning(
            "node %s is cut off (%d of %d peers reachable, no master): stopping playback",
            self.id,
            heard,
            len(self.others),
        )
        eff.sink = SinkPlan(STOP, self.state.volume)
        self._scheduled = None
        self.recovering = True
        self.synced = False
        eff.node_state = True

    def request_sync(self, now: float, eff: Effects, why: str) -> None:
        if not self.recovering:
            log.warning("node %s out of step (%s): pulling the master's state", self.id, why)
        if self._recovery_started is None:
            self._recovery_started = now
        self.recovering = True
        self._lag = 0
        self._sync_asked_at = now
        # the songs held (and how much of those in progress), so the master can push the rest
        partial = self.lib.missing_chunks(set(self.state.playlist))
        songs = sorted(self.lib.songs())
        self.send_master(eff, "sync_req", index=self.state.index, songs=songs, partial=partial)

    def _check_songs_recovered(self, now: float) -> None:
        """Note when a recovered node holds every playlist song again (node state `recovery`)."""
        rec = self.recovery
        if rec is None or "songs_ms" in rec:
            return
        if all(self.lib.has(s) for s in self.state.playlist):
            rec["songs_ms"] = round((now - rec["why_at"]) * 1e3, 2)

    def want(self, now: float, eff: Effects, song: str, missing: list[int] | None) -> None:
        """Ask the master for ``song`` (or, if the master lacks it, a node that holds it)."""
        self.song_progress[song] = now
        source = choose_source(
            self.id,
            self.election.master,
            self.holders.get(song, ()),
            self.peer_seen,
            now,
            NODE_ALIVE_S,
        )
        if source is not None:
            self.send(eff, "want", song=song, missing=missing, **{"from": source})

    def _retry_stalled_songs(self, now: float, eff: Effects) -> None:
        """A node in step that still lacks playlist songs whose transfer stalled (the master
        that sent them died, chunks were lost; or it became master without them) asks again."""
        if self.election.master is None or self.recovering:
            return
        if not (self.master is not None or self.synced):
            return
        needed = [s for s in self.state.playlist if not self.lib.has(s)]
        retry = self._song_retry_s
        stalled = stalled_songs(now, needed, self.song_progress, retry, SONG_RETRY_S)
        partial = self.lib.missing_chunks(stalled) if stalled else {}
        for song in stalled:
            waited = retry.get(song, SONG_RETRY_S)
            log.info("no progress on %s… for %g s: asking for it", song[:12], waited)
            retry[song] = next_retry_s(waited, SONG_RETRY_S, SONG_RETRY_MAX_S)
            self.want(now, eff, song, partial.get(song))

    # ------------------------------------------------------------------ state and the sink

    def assign_state(self, new: PlayerState) -> PlayerState:
        """Take the new state (nothing else yet); returns the old one."""
        old = self.state
        self.state = new
        if new.last != self.election.last_log:
            self.election.set_last_log(new.last)
            self.last_log_at = round(self.wall(), 3)
        return old

    def state_changed(self, now: float, eff: Effects, old: PlayerState) -> None:
        """Carry a state change out: the sink, and (master) the retained state."""
        new = self.state
        if new.playback != old.playback or new.volume != old.volume:
            self.drive_sink(now, eff)
        if self.master is not None:
            self.master.state_dirty = True
            eff.state_soon = True

    def drive_sink(self, now: float, eff: Effects, force: bool = False) -> None:
        pb = self.state.playback
        volume = self.state.volume
        if self.master is None and not self.est.calibrated:
            self._sink_pending = True
            eff.sink = SinkPlan(HOLD if pb.state == PLAYING else STOP, volume)
            return
        self._sink_pending = False
        key = (pb, self.election.master if not force else None)
        if key == self._scheduled and not force:
            eff.sink = SinkPlan(HOLD, volume)
            return
        self._scheduled = key
        if pb.state == PLAYING and pb.song is not None and pb.at is not None:
            if self.lib.frames(pb.song) is None:
                if self.lib.has(pb.song):
                    eff.decode.append(Decode(pb.song))
                else:
                    self.want(now, eff, pb.song, None)
            at = self.to_local(pb.at)
            eff.sink = SinkPlan(PLAY, volume, pb.song, pb.frame, at, self.speed(), pb.at)
        elif pb.at is not None:
            eff.sink = SinkPlan(STOP, volume, pb.song, pb.frame, self.to_local(pb.at))
        else:
            eff.sink = SinkPlan(STOP, volume)

    def retime_sink(self, eff: Effects) -> None:
        """The clock estimate moved: map the playing song's schedule through it again, so the
        sink steers onto where the master's clock now puts it (within a song, node and master
        clocks drift apart by up to ~0.1 ms a second)."""
        pb = self.state.playback
        if eff.sink is not None or self._sink_pending or self._scheduled is None:
            return
        if self._scheduled[0] != pb:
            return
        if pb.state == PLAYING and pb.song is not None and pb.at is not None:
            local = self.to_local(pb.at)
            speed = self.speed()
            eff.sink = SinkPlan(RETIME, self.state.volume, pb.song, pb.frame, local, speed, pb.at)

    def to_local(self, t_master: float) -> float:
        return t_master if self.master is not None else self.est.to_local(t_master)

    def speed(self) -> float:
        """Master seconds per second of this node's clock."""
        return 1.0 if self.master is not None else 1.0 + self.est.rate_ppm * 1e-6

    def sink_finished(self, now: float, song: str) -> Effects:
        """The sink played ``song`` to its end."""
        eff = Effects()
        pb = self.state.playback
        if pb.state != PLAYING or pb.song != song:
            return eff
        if self.master is not None:
            self.master.count_finished(now, eff, self.id, pb.slot, song)
        else:
            self.send_master(eff, "finished", slot=pb.slot, song=song)
        return eff

    def publish_state(self, now: float) -> Effects:
        """(Master) the retained state, if it changed since it was last published."""
        eff = Effects()
        m = self.master
        if m is not None and (m.state_dirty or m.playlist_unpublished):
            m.flush_state(now, eff)
        return eff

    def connected(self, now: float) -> Effects:
        """The bus (re)connected: a broker restart loses what was retained."""
        eff = Effects(node_state=True)
        if self.master is not None:
            self.master.republish(now, eff)
        return eff

    def persisted(self, now: float) -> Effects:
        """The durable state is on disk (the master counts its own copy now)."""
        eff = Effects()
        if self.master is not None:
            self.master.saved(now, eff)
        return eff

    # ------------------------------------------------------------------ songs

    def chunk_progress(self, now: float, song: str) -> None:
        self.song_progress[song] = now
        self._song_retry_s.pop(song, None)  # it moves: back to the first interval

    def chunk_refused(self, now: float, song: object, why: str) -> Effects:
        eff = Effects()
        if self.master is not None and isinstance(song, str):
            self.master.loads.refused(now, eff, song, why)
        return eff

    def song_arrived(self, now: float, song: str, upload_reply: bool = False) -> Effects:
        """``song`` is whole and verified in the store."""
        eff = Effects()
        self.song_progress.pop(song, None)
        self._song_retry_s.pop(song, None)
        self.holders.setdefault(song, set()).add(self.id)
        self._check_songs_recovered(now)
        eff.evict_keep = song
        eff.decode.append(Decode(song, upload_reply and self.master is not None))
        eff.node_state = True
        if self.master is not None:
            self.master.loads.arrived(now, eff, song)
        if self.state.playback.song == song:
            self.drive_sink(now, eff, force=True)
        return eff

    def upload_refused(self, size: int, why: str) -> Effects:
        eff = Effects()
        if self.master is not None:
            self.master.upload_done(eff, None, size, why)
        return eff

    def protected(self, keep: str) -> set[str]:
        """Songs eviction must spare: the playlist, the one playing, the one just arrived."""
        out = {*self.state.playlist, keep}
        if self.state.playback.song:
            out.add(self.state.playback.song)
        return out

    def songs_gone(self, songs: Iterable[str]) -> None:
        for song in songs:
            self.holders.get(song, set()).discard(self.id)

    def decoded(
        self, now: float, song: str, error: str | None, size: int, upload_reply: bool = False
    ) -> Effects:
        """The decode of ``song`` finished (the driver stored its tags if it worked)."""
        eff = Effects()
        if error is not None:
            log.warning("song %s… cannot be decoded: %s", song[:12], error)
            if song not in self.state.playlist:
                eff.remove.append(song)
                self.holders.get(song, set()).discard(self.id)
                eff.node_state = True
        elif self.state.playback.song == song and self.lib.frames(song) is not None:
            eff.attach.append(song)
        if self.master is not None:
            if upload_reply:
                self.master.upload_done(eff, song, size, error)
            if error is not None:
                self.master.loads.undecodable(now, eff, song, error)
            else:
                self.master.publish_library(eff)
                self.master.flush_state(now, eff)
        return eff

    def node_state(self, now: float, peer: str, info: PeerState | None) -> Effects:
        """A peer's retained node state (None: cleared)."""
        eff = Effects()
        if info is None:
            self.node_info.pop(peer, None)
            return eff
        self.node_info[peer] = info
        for song, who in list(self.holders.items()):
            if song not in info.songs:
                who.discard(peer)
                if not who:  # nobody holds it: forgotten (a state may list any hashes)
                    del self.holders[song]
        for song in sorted(info.songs):
            self.holders.setdefault(song, set()).add(peer)
        if self.master is not None:
            self.master.loads.holders_changed(now, eff)
        return eff

    def node_state_doc(self) -> dict[str, Any]:
        stats = self.est.stats()
        stats["rtt_p90_s"] = self.est.rtt_estimate()
        return {
            "role": self.election.role.value,
            "term": self.election.term,
            "master": self.election.master,
            "recovering": self.recovering,
            "recovery": self.recovery,
            "clock": stats,
            "stray_pongs": self.stray_pongs,
            "songs": sorted(self.lib.songs()),
            "index": self.state.index,
            "last_op": {
                "term": self.election.last_log[0],
                "index": self.election.last_log[1],
                "applied_at": self.last_log_at,
            },
            "playlist_hash": self.state.hash,
            "playback": self.state.playback.state,
        }
