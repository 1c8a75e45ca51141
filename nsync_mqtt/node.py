"""One NSync node: the driver around its pure roles.

The node's decisions live in :class:`speaker.Speaker` (every node's duties) and
:class:`master.Master` (the elected node's); they take ``now`` and an event and return
:class:`effects.Effects`. This driver owns what they may not touch: the MQTT connection, the
timers, the disk (durable state, song store, PCM cache), the decoder thread and the sink. It
reads its clock once per event, hands the event to the roles and carries out what comes back in
one place (``_do``): early messages, then the durable state, then the messages that promise it,
then the sink. docs/protocol.md describes the internal messages; docs/architecture.md the split.
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
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nsync_mqtt import audio
from nsync_mqtt.broker_embed import EmbeddedBroker
from nsync_mqtt.bus import Bus, parse_broker_url
from nsync_mqtt.clock import SimClock
from nsync_mqtt.config import NodeConfig, parse_host_port
from nsync_mqtt.effects import PLAY, RETIME, STOP, Decode, Effects, SinkPlan
from nsync_mqtt.errors import NSyncError, ProtocolError
from nsync_mqtt.guard import Faults, LoopWatchdog, decade, forever, log_tasks
from nsync_mqtt.limits import oversize
from nsync_mqtt.master import NODE_ALIVE_S, STATE_PUBLISH_DELAY_S
from nsync_mqtt.messages import Topics, decode_chunk, encode_chunk
from nsync_mqtt.persist import StateFile
from nsync_mqtt.playlist import RATE
from nsync_mqtt.replication import (
    PARTIAL_IDLE_S,
    Manifest,
    SongStore,
    TransferQueue,
    chunk_header,
    read_chunk,
    sha224_file,
)
from nsync_mqtt.seal import Opener, Sealer, next_boot, read_key
from nsync_mqtt.speaker import Speaker
from nsync_mqtt.wire import PeerState

log = logging.getLogger("nsync.node")

NODE_STATE_PERIOD_S = 1.0
HOUSEKEEPING_S = 0.25
TRANSFER_WINDOW = 2  # chunks of a background song transfer not yet taken by the broker
TRANSFER_ACK_TIMEOUT_S = 2.0  # a chunk the broker has not taken by then no longer holds up the next
DAMAGED = "the stored file does not match its hash"
MAX_EXPECTED_UPLOADS = 8  # client uploads whose chunks a signing node takes at once
UNEXPECTED_CHUNK = "chunk of no upload in progress"


class StoreLibrary:
    """The roles' read-only view of the song store and the PCM cache."""

    def __init__(self, store: SongStore, pcm: audio.PcmCache) -> None:
        self.store = store
        self.pcm = pcm

    def has(self, song: str) -> bool:
        return self.store.has(song)

    def songs(self) -> list[str]:
        return self.store.songs()

    def meta(self, song: str) -> dict[str, Any]:
        return self.store.meta(song)

    def size_of(self, song: str) -> int:
        return self.store.size_of(song)

    def frames(self, song: str) -> int | None:
        track = self.pcm.get(song)
        return None if track is None else track.frames

    def missing_chunks(self, songs: Collection[str]) -> dict[str, list[int]]:
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

    def assembly_missing(self, manifest: Manifest) -> list[int]:
        return self.store.assembly(manifest).missing()

    def received_count(self, manifest: Manifest) -> int:
        return self.store.assembly(manifest).received_count

    def sniff(self, song: str) -> str | None:
        try:
            with self.store.path(song).open("rb") as f:
                return audio.sniff(f.read(12))
        except OSError:  # the decoder refused it already and dropped it
            return None


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.clock = SimClock(cfg.clock_offset, cfg.clock_drift_ppm)
        self.topics = Topics(cfg.cluster)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = SongStore(
            cfg.data_dir / "store",
            cap_bytes=cfg.store_cap_mb * 1024 * 1024,
            max_song_bytes=cfg.max_song_mb * 1024 * 1024,
        )
        self.pcm = audio.PcmCache(cfg.data_dir / "pcm")
        self.sink = audio.make_sink(cfg.sink, cfg.sink_log, cfg.dac_drift_ppm, cfg.audio_device)
        # seconds of this node's clock per host second (1 on a real box)
        self._local_per_host = self.clock.from_host(1.0) - self.clock.from_host(0.0)
        self.state_file = StateFile(cfg.data_dir / "state.json")
        # signing: every internal message and chunk carries a MAC of the cluster key
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        if cfg.key_file is not None:
            key = read_key(cfg.key_file)
            boot = next_boot(cfg.data_dir / "boot", time.time())
            self.sealer = Sealer(key, cfg.cluster, cfg.id, boot)
            self.opener = Opener(key, cfg.cluster, cfg.id, set(cfg.peers))
        self._internal = self.topics.internal("")
        self._unsealed = (self.topics.internal("xfer/"), self.topics.internal("chunk/all"))
        # client uploads announced by the master (signed): their chunks on chunk/all are taken
        self._expected: dict[str, tuple[Manifest, float]] = {}
        self._refused_local: dict[str, int] = {}
        self.core = Speaker(
            cfg.id,
            cfg.peers,
            cfg.cluster,
            cfg.timing,
            StoreLibrary(self.store, self.pcm),
            random.Random(cfg.seed),
            self.clock.now(),
            self.state_file.load(),
            chunk_size=cfg.chunk_size_kib * 1024,
            max_song_bytes=cfg.max_song_mb * 1024 * 1024,
            brokers=len(cfg.broker),
            discovery_prefix=cfg.ha_discovery_prefix if cfg.ha_discovery else None,
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.faults = Faults(log)
        self.bus = Bus(
            list(cfg.broker),
            client_id=f"nsync-{cfg.cluster}-{cfg.id}",
            will=(self.topics.node_status(cfg.id), b"offline", True),
            on_connect=self._on_connect,
            on_handler_error=self.faults.record,
            ca_file=cfg.ca_file,
        )
        self.broker: EmbeddedBroker | None = None
        self.watchdog = LoopWatchdog()
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsync-decode")
        self._decoding: set[str] = set()
        self._evict_after_decode: set[str] = set()  # new songs: the store is trimmed once they play
        self._wake = asyncio.Event()
        self._waits_until = -math.inf  # node time the election step sleeps until
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.transfers = TransferQueue()  # chunks owed to other nodes
        self._transfer_wake = asyncio.Event()
        self._state_timer: asyncio.TimerHandle | None = None
        self._node_state_sent = -math.inf

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_master(self) -> bool:
        return self.core.master is not None

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(self._loop_exception)
        self.watchdog.start()
        self.sink.on_finished = self._finished_from_sink
        self.sink.faults = self.faults
        if self.cfg.embed_broker:
            host, port = parse_host_port("embed_broker", self.cfg.embed_broker)
            self.broker = EmbeddedBroker(
                host,
                port,
                self.cfg.embed_broker_password_file,
                self.cfg.embed_broker_acl_file,
                cluster=self.cfg.cluster,
                nodes=self.cfg.peers,
            )
            await self.broker.start()
        t = self.topics
        internal = [
            "hb",
            "vote_req",
            "prevote_req",
            "op",
            "offer",
            f"to/{self.cfg.id}",  # ping, ack, sync_req, finished to the master; vote, sync, ...
            "want",
        ]
        lim = self._limited  # each topic's payload limit, checked before anything is parsed
        subs: list[tuple[str, Callable[[str, bytes, bool], None]]] = [
            *((t.internal(name), lim("internal", self._on_internal)) for name in internal),
            (t.internal("chunk/all"), lim("chunk", self._on_chunk)),
            (t.internal(f"chunk/{self.cfg.id}"), lim("chunk", self._on_chunk)),
            (t.upload, self._on_upload),  # the store checks the size before hashing
            (t.cmd_all, lim("command", self._on_command)),
            (f"{t.base}/node/+/state", lim("node_state", self._on_node_state)),
        ]
        if self.cfg.ha_discovery:  # Home Assistant restarted: announce the cluster again
            subs.append(
                (f"{self.cfg.ha_discovery_prefix}/status", lim("ha_status", self._on_ha_status))
            )
        for topic, handler in subs:
            self.bus.subscribe(topic, handler)
        for song in self.store.songs():
            self._decode(Decode(song))
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
        self._do(self.core.connected(self.clock.now()))

    # ------------------------------------------------------------------ loops

    # Each loop is one step run forever by guard.forever: an exception in a step is counted
    # and logged (once per kind, then at 10, 100, ...) and the loop goes on.

    async def _election_step(self) -> None:
        now = self.clock.now()
        self._do(self.core.election_tick(now))
        delay = min(max(0.0, self.core.election.deadline() - now), 1.0)
        self._waits_until = now + delay
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await wait_event(self._wake, delay)

    async def _ping_step(self) -> None:
        await asyncio.sleep(self.core.ping_interval())
        self._do(self.core.ping(self.clock.now()))

    async def _housekeeping_step(self) -> None:
        await asyncio.sleep(HOUSEKEEPING_S)
        self._publish_node_state()
        now = self.clock.now()
        for song in self.store.prune_partials(now):
            log.info("dropped the transfer of %s: no chunk for %g s", song, PARTIAL_IDLE_S)
        self._do(self.core.tick(now))

    # ------------------------------------------------------------------ carrying out effects

    def _do(self, eff: Effects) -> None:
        """Carry out what a role decided. Early messages go at once; the rest follows right
        after the bus has sent them (before the next message is read), so the speakers' round
        trip overlaps this node's fsync."""
        for where, err in eff.faults:
            self.faults.record(where, err)
        if not eff:
            return
        for p in eff.early:
            self._publish(p.topic, p.payload, p.retain)
        if eff.early:
            assert self.loop is not None
            self.loop.call_soon(self._do_rest, eff)
        else:
            self._do_rest(eff)

    def _do_rest(self, eff: Effects) -> None:
        saved = None
        if eff.persist:
            # term, vote and player state on disk before anything that promises them goes out
            if eff.op is not None:
                self.state_file.append(self.core.durable(), eff.op)  # one line, not the state
            else:
                self.state_file.save(self.core.durable())
            saved = self.core.persisted(self.clock.now())
        for p in eff.out:
            self._publish(p.topic, p.payload, p.retain)
        if saved:
            self._do(saved)
        for d in eff.decode:
            self._decode(d)
        for c in eff.chunks:
            everything = range(self.core.manifest(c.song).n_chunks)
            self.transfers.add(c.node, c.song, everything if c.indices is None else c.indices)
            self._transfer_wake.set()
        for song in eff.remove:
            self.store.remove(song)
        for manifest in eff.expect:
            self._expect(manifest)
        for song, name in eff.names:
            self.store.set_name(song, name)
        if eff.evict_keep is not None:
            keep = eff.evict_keep
            if self.pcm.get(keep) is not None:
                self._evict(keep)
            else:  # nothing is evicted for a song that may turn out not to play
                self._evict_after_decode.add(keep)
        if eff.node_state:
            self._publish_node_state(force=True)
        if eff.state_soon and self._state_timer is None and self.loop is not None:
            self._state_timer = self.loop.call_later(STATE_PUBLISH_DELAY_S, self._publish_state)
        if eff.wake and self.core.election.deadline() < self._waits_until:
            self._wake.set()  # only a deadline that came earlier (not each heartbeat's)
        if (eff.sink or eff.attach) and self.loop is not None:
            # after the bus has sent this event's messages (an ack goes before the sink's work)
            self.loop.call_soon(self._drive_sink, eff.sink, eff.attach)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.bus.publish(topic, self._seal(topic, payload), retain=retain)

    def _seal(self, topic: str, payload: bytes) -> bytes:
        """Internal messages and chunks go out signed when the cluster has a key (not what
        clients read or send: ``xfer/``, ``chunk/all``)."""
        if self.sealer is None or not topic.startswith(self._internal):
            return payload
        if topic.startswith(self._unsealed):
            return payload
        return self.sealer.seal(topic, payload)

    def _open(self, topic: str, payload: bytes) -> tuple[str | None, bytes] | None:
        """(signer, payload) of a received internal message, or None if it is refused (or
        this node's own). Without a key: (None, payload) unchanged."""
        if self.opener is None:
            return None, payload
        before = sum(self.opener.rejected.values())
        opened = self.opener.open(self.clock.now(), topic, payload)
        if opened is not None:
            return opened.sender, opened.payload
        total = sum(self.opener.rejected.values())
        if total > before and decade(total):
            log.warning(
                "refused %d internal message(s) so far that were unsigned, forged or replayed: %s",
                total,
                self.rejected(),
            )
        return None

    def _limited(
        self, kind: str, handler: Callable[[str, bytes, bool], None]
    ) -> Callable[[str, bytes, bool], None]:
        """``handler`` behind the payload limit of its kind of topic (limits.PAYLOAD_LIMITS):
        a bigger payload is dropped unread and counted as rejected."""

        def checked(topic: str, payload: bytes, retain: bool) -> None:
            if oversize(kind, len(payload)):
                self._refuse(f"oversize {kind} message")
                return
            handler(topic, payload, retain)

        return checked

    def _refuse(self, reason: str) -> None:
        """Count a message refused before it was read (published as ``rejected``)."""
        n = self._refused_local[reason] = self._refused_local.get(reason, 0) + 1
        if decade(n):
            log.warning("refused %d message(s) so far: %s", n, reason)

    def rejected(self) -> dict[str, int]:
        """Messages refused before they were read, by reason."""
        out = dict(self.opener.rejected) if self.opener is not None else {}
        out.update(self._refused_local)
        return out

    def _expect(self, manifest: Manifest) -> None:
        """A client is uploading ``manifest``'s song (the master said so, signed): take its
        chunks from ``chunk/all`` until the upload has been idle a while."""
        self._expected.pop(manifest.song, None)
        while len(self._expected) >= MAX_EXPECTED_UPLOADS:
            del self._expected[next(iter(self._expected))]
        self._expected[manifest.song] = (manifest, self._upload_deadline())

    def _upload_deadline(self) -> float:
        return self.clock.now() + 2 * self.cfg.timing.upload_idle_timeout_s

    def _expected_upload(self, header: dict[str, Any]) -> bool:
        try:
            manifest = Manifest.from_dict(header, self.cfg.max_song_mb * 1024 * 1024)
        except ProtocolError:
            return False
        entry = self._expected.get(manifest.song)
        if entry is None or entry[0] != manifest:
            return False
        if entry[1] < self.clock.now():
            del self._expected[manifest.song]
            return False
        self._expected[manifest.song] = (manifest, self._upload_deadline())
        return True

    def _publish_state(self) -> None:
        self._state_timer = None
        self._do(self.core.publish_state(self.clock.now()))

    def _publish_node_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._node_state_sent < NODE_STATE_PERIOD_S:
            return
        doc = self.core.node_state_doc()
        doc["faults"] = self.faults.snapshot()  # failures survived, by where and type
        doc["loop_stalls"] = self.watchdog.stalls  # event loop blocked > 0.5 s
        doc["sink"] = {"kind": self.cfg.sink, **self.sink.sync_stats()}
        self._node_state_sent = now
        doc["signed"] = self.sealer is not None
        doc["rejected"] = self.rejected()  # unsigned, forged, replayed, not from a peer
        payload = json.dumps(doc, separators=(",", ":")).encode()
        self.bus.publish(self.topics.node_state(self.cfg.id), payload, retain=True)

    def _evict(self, keep: str) -> None:
        """Keep the store under its cap: least recently used first, sparing what the roles
        protect (the playlist, the song playing, the one that just arrived)."""
        gone = self.store.evict(self.core.protected(keep), self.clock.now())
        for song in gone:
            log.info("evicted song %s… (store over %d MB)", song[:12], self.cfg.store_cap_mb)
            self.pcm.remove(song)
        self.core.songs_gone(gone)

    # ------------------------------------------------------------------ the sink

    def _drive_sink(self, plan: SinkPlan | None, attach: list[str]) -> None:
        for song in attach:
            track = self.pcm.get(song)
            if track is not None:
                self.sink.attach(song, track)
        if plan is None:
            return
        self.sink.set_volume(plan.volume)
        if plan.action in (PLAY, RETIME) and plan.song is not None and plan.at is not None:
            at_host = self.clock.to_host(plan.at)
            speed = plan.speed * self._local_per_host
            if plan.action == RETIME:
                self.sink.retime(plan.song, plan.frame, at_host, speed, plan.key)
                return
            track = self.pcm.get(plan.song)
            if self.sink.play(plan.song, track, plan.frame, at_host, speed, plan.key):
                return  # already there: the sink steers onto the new schedule
            log.info(
                "play %s… from frame %d in %.3f s",
                plan.song[:12],
                plan.frame,
                at_host - time.monotonic(),
            )
            self.store.touch(plan.song, self.clock.now())
        elif plan.action == STOP and plan.at is not None:
            at_host = self.clock.to_host(plan.at)
            log.info("stop at frame %d in %.3f s", plan.frame, at_host - time.monotonic())
            self.sink.stop(at_host)
        elif plan.action == STOP:
            self.sink.stop()

    def _finished_from_sink(self, song: str) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._on_sink_finished, song)

    def _on_sink_finished(self, song: str) -> None:
        self._do(self.core.sink_finished(self.clock.now(), song))

    # ------------------------------------------------------------------ messages

    def _on_internal(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            return
        rx = self.clock.from_host(self.bus.received_at)
        opened = self._open(topic, payload)
        if opened is None:
            return
        sender, inner = opened
        self._do(self.core.step(self.clock.now(), inner, rx, sender))

    def _on_command(self, topic: str, payload: bytes, retain: bool) -> None:
        master = self.core.master
        if retain or master is None:
            return  # a retained command is never replayed; only the master serves
        verb = self.topics.verb_of(topic) or ""
        log.debug("command %s: %r", verb, payload[:200])
        self._do(master.command(self.clock.now(), verb, payload))

    def _on_ha_status(self, topic: str, payload: bytes, retain: bool) -> None:
        master = self.core.master
        if payload == b"online" and not retain and master is not None:
            eff = Effects()
            master.publish_discovery(eff)
            self._do(eff)

    def _on_node_state(self, topic: str, payload: bytes, retain: bool) -> None:
        node = topic.split("/")[-2]
        if node == self.cfg.id or node not in self.cfg.peers:
            return
        info = None
        if payload:  # empty: cleared
            try:
                info = PeerState.parse(payload)
            except ProtocolError as err:
                self.faults.record("bad node state", err)
                return
        self._do(self.core.node_state(self.clock.now(), node, info))

    # ------------------------------------------------------------------ songs

    def _on_chunk(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            return
        now = self.clock.now()
        from_client = topic.startswith(self._unsealed[1])
        if not from_client:  # from a node: signed
            opened = self._open(topic, payload)
            if opened is None:
                return
            payload = opened[1]
        try:
            header, data = decode_chunk(payload)
        except ProtocolError as err:
            self.faults.record("dropped chunk", err)
            return
        if from_client and self.opener is not None and not self._expected_upload(header):
            # with signing, a client's chunks go only into an upload the master announced
            self._refuse(UNEXPECTED_CHUNK)
            return
        try:
            song, complete = self.store.add_chunk(header, data, now)
        except (ProtocolError, OSError) as err:
            self.faults.record("dropped chunk", err)
            self._do(self.core.chunk_refused(now, header.get("song"), str(err)))
            return
        self.core.chunk_progress(now, song)
        if complete:
            self._do(self.core.song_arrived(now, song))

    def _on_upload(self, topic: str, payload: bytes, retain: bool) -> None:
        """A whole song in one message (the `mosquitto_pub -f` path)."""
        if retain:
            return
        now = self.clock.now()
        try:
            song = self.store.put_bytes(payload, None, now)
        except (ProtocolError, OSError) as err:  # OSError: the disk is full, say
            self._do(self.core.upload_refused(len(payload), str(err)))
            return
        self._do(self.core.song_arrived(now, song, upload_reply=True))

    def _decode(self, d: Decode) -> None:
        """Decode a song to PCM and read its tags, in the decoder thread."""
        song = d.song
        if song in self._decoding or self.loop is None:
            return
        size = self.store.size_of(song)
        if self.pcm.get(song) is not None and self.store.meta(song):
            if d.upload_reply:
                self._do(self.core.decoded(self.clock.now(), song, None, size, True))
            return
        self._decoding.add(song)
        src = self.store.path(song)

        max_s = self.cfg.max_song_minutes * 60.0

        def work() -> tuple[dict[str, Any], str | None]:
            if sha224_file(src) != song:  # written over, or cut short by a power cut
                return {}, DAMAGED
            meta = audio.probe(src)
            declared = meta.get("duration_s")
            if isinstance(declared, (int, float)) and declared > max_s:  # no need to decode
                return meta, audio.too_long(max_s)
            try:
                track = self.pcm.decode(song, src, max_s)
            except audio.DecodeError as err:
                return meta, str(err)
            meta["frames"] = track.frames
            meta["duration_s"] = track.frames / RATE
            return meta, None

        def done(f: asyncio.Future[tuple[dict[str, Any], str | None]]) -> None:
            self._decoding.discard(song)
            if f.cancelled():  # the node is stopping
                return
            try:
                meta, error = f.result()
            except Exception as err:  # a decoder crash must not take the node down
                meta, error = {}, f"decoder failed: {err}"
            if song in self._evict_after_decode:
                self._evict_after_decode.discard(song)
                if error is None:
                    self._evict(song)
            if error == DAMAGED:  # never played short: dropped, and fetched again if needed
                log.warning("song %s… in the store is damaged: fetching it again", song[:12])
                self.faults.record("damaged song file", ProtocolError(DAMAGED))
                self.store.remove(song)
                self.pcm.remove(song)
                self.core.songs_gone([song])
                self._publish_node_state()
                return
            if error is None:
                meta["size"] = size
                name = self.store.meta(song).get("name")  # learnt from a load, kept
                if name:
                    meta["name"] = name
                self.store.set_meta(song, meta)
            self._do(self.core.decoded(self.clock.now(), song, error, size, d.upload_reply))

        self.loop.run_in_executor(self._decoder, work).add_done_callback(done)

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
            seen = self.core.peer_seen.get(node, -math.inf)
            if self.clock.now() - seen > NODE_ALIVE_S:
                log.info("%s went quiet: dropping the chunks owed to it", node)
                self.transfers.drop_node(node)
                return None
            manifest = Manifest(song, self.store.size_of(song), self.cfg.chunk_size_kib * 1024)
            data = read_chunk(self.store.path(song), manifest, index)
            frame = encode_chunk(chunk_header(manifest, index), data)
            topic = self.topics.internal(f"chunk/{node}")
            return topic, self._seal(topic, frame)

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


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait for `event`, raising TimeoutError after `timeout_s`. (asyncio.wait_for can swallow a
    cancellation on Python 3.11 when the event fires at the same moment; asyncio.timeout cannot.)"""
    async with asyncio.timeout(timeout_s):
        await event.wait()


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
