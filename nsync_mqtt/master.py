"""The master's duties, pure: which operations of its term f+1 nodes hold, and whose command
waits for which.

Acknowledgements are cumulative, as Raft's match index: a node that acknowledges index i of
the master's term holds every operation up to i (it applied them in order, each right after
the one before). An operation is committed once f+1 nodes hold it, the master counted only
once the operation is on its own disk. Commits happen in index order, so a client's reply goes
out once its operation and everything before it is committed: after a new term's first
operation, nothing of the term is answered before what the master holds of older terms is
committed too.

:class:`Commits` reads no clock and sends nothing: the driver passes ``now`` and the events
(an operation sent, the master's own save, an acknowledgement, a refusal, the housekeeping
tick, a step-down) and answers the requests each call returns.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from nsync_mqtt.discovery import device_config_payload, discovery_topic
from nsync_mqtt.effects import Effects, Publish
from nsync_mqtt.errors import CommandError, ProtocolError
from nsync_mqtt.guard import decade
from nsync_mqtt.limits import ALL, RateLimiter
from nsync_mqtt.messages import Message, check_id, reply_object, song_name
from nsync_mqtt.playlist import (
    PLAYING,
    RATE,
    Context,
    PlayerState,
    Unchanged,
    apply_command,
    next_song,
    start_term,
)
from nsync_mqtt.replication import Manifest, songs_to_push
from nsync_mqtt.timesync import lead_time

if TYPE_CHECKING:
    from nsync_mqtt.speaker import Speaker

log = logging.getLogger("nsync.node")

R = TypeVar("R")  # whatever the driver needs to answer a client


@dataclass
class _Waiting(Generic[R]):
    deadline: float
    requests: list[R] = field(default_factory=list)


@dataclass(frozen=True)
class Failed(Generic[R]):
    """A request whose operation f+1 nodes did not hold in time."""

    request: R
    held_by: int  # nodes holding it when it expired, the master included
    reasons: tuple[tuple[str, str], ...]  # (node, why) of the refusals heard meanwhile


class Commits(Generic[R]):
    """One master term's commit tracking."""

    def __init__(self, majority: int, ack_timeout_s: float, own_index: int = 0) -> None:
        self.majority = majority
        self.ack_timeout_s = ack_timeout_s
        self.match: dict[str, int] = {}  # node -> highest index of this term it holds
        self.own = own_index  # highest index on the master's own disk
        self.commit_index = 0  # highest index known held by f+1 nodes
        self._waiting: dict[int, _Waiting[R]] = {}
        self._refusals: dict[str, str] = {}  # node -> why, since the oldest waiting index

    def held_by(self, index: int) -> int:
        """How many nodes hold ``index``, the master included once it saved it."""
        return (1 if index <= self.own else 0) + sum(1 for m in self.match.values() if m >= index)

    def sent(self, now: float, index: int, request: R | None = None) -> None:
        """The operation at ``index`` went out; ``request`` (if any) waits for its commit."""
        waiting = self._waiting.setdefault(index, _Waiting(now + self.ack_timeout_s))
        if request is not None:
            waiting.requests.append(request)

    def wait(self, now: float, index: int, request: R) -> list[R]:
        """``request`` is answered once ``index`` is committed: at once (returned) if it is."""
        if index <= self.commit_index or self.held_by(index) >= self.majority:
            return [request]
        self.sent(now, index, request)
        return []

    def saved(self, index: int) -> list[R]:
        """The master's own copy of ``index`` is on disk. Returns the requests now committed."""
        self.own = max(self.own, index)
        return self._advance()

    def ack(self, node: str, index: int, last_index: int) -> list[R]:
        """``node`` holds this term's operations up to ``index`` (capped at ``last_index``, the
        master's own last: a node cannot hold more of this term than its master made)."""
        if index <= self.match.get(node, 0):
            return []
        self.match[node] = min(index, last_index)
        return self._advance()

    def refused(self, node: str, why: str) -> None:
        """``node`` could not apply an operation (it will pull the master's state)."""
        if self._waiting:
            self._refusals[node] = why

    def expire(self, now: float) -> list[Failed[R]]:
        """The requests whose operation was not committed within ``ack_timeout_s``."""
        out: list[Failed[R]] = []
        for index in sorted(self._waiting):
            waiting = self._waiting[index]
            if now < waiting.deadline:
                continue
            del self._waiting[index]
            reasons = tuple(sorted(self._refusals.items()))
            out += [Failed(r, self.held_by(index), reasons) for r in waiting.requests]
        if not self._waiting:
            self._refusals.clear()
        return out

    def drop(self) -> list[R]:
        """The master steps down: every waiting request, none of them answered."""
        requests = [r for w in self._waiting.values() for r in w.requests]
        self._waiting.clear()
        self._refusals.clear()
        return requests

    def _advance(self) -> list[R]:
        done: list[R] = []
        for index in sorted(self._waiting):
            if self.held_by(index) < self.majority:
                break
            done += self._waiting.pop(index).requests
            self.commit_index = max(self.commit_index, index)
        if not self._waiting:
            self._refusals.clear()
        return done


# --------------------------------------------------------------------------------------------
# The elected node's duties: commands and replies, commits, loads, the retained public state.
# --------------------------------------------------------------------------------------------

VERBS = frozenset(
    {
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
        "clear",
        "remove",
        "move",
        "replace",
        "announce",
    }
)
UNKNOWN_FRAMES = 1 << 62  # a held song whose length is not known yet
STATE_PUBLISH_DELAY_S = 0.02  # retained state follows a change within this, coalesced
QUEUE_SHOWN = 50  # the state document lists this many upcoming songs; state/playlist has all
NODE_ALIVE_S = 3.0  # a peer heard from within this is alive (lead time, state, transfers)
MAX_UPLOADS = 8  # songs clients may be uploading at once (each holds a transfer open)
MAX_LOADS_WAITING = 64  # loads waiting for their bytes or for f+1 holders, all clients


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
            check_id(reply_to, "reply_to")
        params = obj
        for key in ("arg", "value", "song", "title", "volume", "seconds", "position", "index"):
            if key in obj:
                arg = obj[key]
                break
    elif text:
        arg = text
        params = {"arg": text}
    return Request(verb, arg, params, reply_to, req_id)


def sniff_reply_to(payload: bytes) -> str | None:
    """The reply_to of a payload too broken to parse as a command, if it names a valid one."""
    try:
        obj = json.loads(payload)
        rt = obj.get("reply_to") if isinstance(obj, dict) else None
        return check_id(rt) if rt else None
    except (ValueError, RecursionError, ProtocolError, UnicodeDecodeError, AttributeError):
        return None


def make_reply(
    success: bool, command: str, params: Any, msg: str, client_req_id: Any = None, **extra: Any
) -> bytes:
    obj = reply_object(success, command, params, msg, client_req_id, **extra)
    return json.dumps(obj, separators=(",", ":")).encode()


def _text(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":")).encode()
    return str(value).encode()


def _move_arg(req: Request) -> tuple[Any, Any]:
    """``move``'s two positions: ``{"from": A, "to": B}`` or the plain text ``A B``."""
    if "from" in req.params or "to" in req.params:
        return req.params.get("from"), req.params.get("to")
    parts = str(req.arg or "").replace(",", " ").split()
    if len(parts) != 2:
        raise CommandError('move needs two playlist positions: "FROM TO" or {"from": A, "to": B}')
    return parts[0], parts[1]


def title_of(meta: dict[str, Any]) -> str | None:
    """A song's title: its tag, else the file or URL name it was loaded under (never its
    hash); None when neither is known."""
    title = meta.get("title") or meta.get("name")
    return title if isinstance(title, str) else None


class Master:
    """The master's duties of one term, beside the node's :class:`speaker.Speaker` (``sp``):
    created on election, dropped on step-down."""

    def __init__(self, sp: Speaker, now: float) -> None:
        self.sp = sp
        self.commits: Commits[Request] = Commits(
            sp.majority, sp.timing.ack_timeout_s, sp.state.index
        )
        self.finished: dict[tuple[int, str], set[str]] = {}  # the current slot's reports only
        self.rate = RateLimiter()  # commands per client (reply_to), a token bucket each
        self.last_seen: dict[str, float] = dict.fromkeys(sp.peers, now)
        self.loads = Loads(self)
        self._published: dict[str, bytes] = {}
        self._playlist_published: tuple[str, ...] | None = None
        self.state_dirty = False
        self.handlers: dict[str, Callable[..., None]] = {
            "ping": self._ping,
            "ack": self._ack,
            "sync_req": self._sync_req,
            "finished": self._finished,
        }

    @property
    def majority(self) -> int:
        return self.sp.majority

    def start(self, now: float, eff: Effects) -> None:
        """This node just won the election."""
        sp = self.sp
        # the term's first operation: once f+1 nodes hold it, what this master holds of older
        # terms is committed, and what it lacks is discarded everywhere
        new, op = start_term(sp.state, sp.term)
        self.commit(now, eff, new, op, None)
        self.republish(now, eff)

    def republish(self, now: float, eff: Effects) -> None:
        """Everything retained, again (after an election or a reconnect)."""
        self._published.clear()
        self._playlist_published = None
        eff.out.append(Publish(self.sp.topics.status, b"online", retain=True))
        self.flush_state(now, eff)
        self.publish_library(eff)
        self.publish_discovery(eff)

    def publish_discovery(self, eff: Effects) -> None:
        """Home Assistant's MQTT discovery of the cluster (retained), if switched on: after
        an election, a reconnect, and when Home Assistant says it is ``online`` again."""
        prefix = self.sp.discovery_prefix
        if prefix is not None:
            topic = discovery_topic(prefix, self.sp.topics.cluster)
            payload = device_config_payload(self.sp.topics, self.sp.peers)
            eff.out.append(Publish(topic, payload, retain=True))

    def step_down(self, eff: Effects, new_master: str | None) -> None:
        """Another node leads now (or none yet): the requests still waiting are told so."""
        sp = self.sp
        if new_master is None:
            log.warning("node %s is master no more (term %d)", sp.id, sp.term)
            eff.out.append(Publish(sp.topics.status, b"offline", retain=True))
        why = (
            "the master stepped down before f+1 nodes acknowledged; the command may or may "
            "not take effect: check the state"
        )
        for req in self.commits.drop():
            self.reply(0.0, eff, req, False, why)
        self.loads.drop(eff)

    # ------------------------------------------------------------------ messages

    def _ping(self, now: float, eff: Effects, msg: Message, ping: Any, rx: float) -> None:
        self.last_seen[msg.src] = now
        self.sp.send_to(eff, msg.src, "pong", t1=ping.t1, t2=rx, t3=now)

    def _ack(self, now: float, eff: Effects, msg: Message, ack: Any, rx: float) -> None:
        sp = self.sp
        if msg.term != sp.term or ack.to not in (None, sp.id):
            return
        self.last_seen[msg.src] = now
        if not ack.ok:
            self.commits.refused(msg.src, ack.msg)
            return
        if ack.log_term != sp.term or ack.index is None:
            return  # holds operations of this term only up to an older one: counts for nothing
        self._answer(now, eff, self.commits.ack(msg.src, ack.index, sp.state.index))

    def _sync_req(self, now: float, eff: Effects, msg: Message, req: Any, rx: float) -> None:
        sp = self.sp
        manifests = {}
        for song in sorted(set(sp.state.playlist)):
            if sp.lib.has(song):
                manifests[song] = sp.manifest(song).to_dict()
        push = songs_to_push(sp.state.playlist, manifests, req.songs, req.partial)
        state = sp.state.to_dict()
        sp.send_to(eff, msg.src, "sync", state=state, manifests=manifests, sending=sorted(push))
        for song in sorted(push):  # in the background, after the state
            sp.send_chunks(eff, song, push[song], msg.src)

    def _finished(self, now: float, eff: Effects, msg: Message, fin: Any, rx: float) -> None:
        self.count_finished(now, eff, msg.src, fin.slot, fin.song)

    def count_finished(self, now: float, eff: Effects, node: str, slot: int, song: str) -> None:
        sp = self.sp
        pb = sp.state.playback
        if (slot, song) != (pb.slot, pb.song):
            return  # a stale report (or a forged one): it could never count
        if (slot, song) not in self.finished:
            self.finished.clear()  # reports of slots played before: no longer of use
        reports = self.finished.setdefault((slot, song), set())
        reports.add(node)
        if len(reports) >= self.majority and pb.state == PLAYING and pb.slot == slot:
            self.finished.pop((slot, song), None)
            try:
                new, op = next_song(sp.state, slot, self._ctx(now))
            except CommandError:
                return
            self.commit(now, eff, new, op, None)

    # ------------------------------------------------------------------ commits

    def commit(
        self, now: float, eff: Effects, new: PlayerState, op: dict[str, Any], req: Request | None
    ) -> None:
        """Apply ``new`` (made by ``op``) here, send ``op`` to the speakers (before this
        node's own save: their round trip overlaps it) and answer ``req`` once f+1 nodes hold
        it, this one counted once its copy is on disk (``saved``)."""
        sp = self.sp
        self.commits.sent(now, new.index, req)
        eff.early.append(sp._msg("op", "op", {"op": op}))
        old = sp.assign_state(new)
        eff.persist, eff.op = True, op
        sp.state_changed(now, eff, old)

    def saved(self, now: float, eff: Effects) -> None:
        """The node's state is on disk: its copy of every operation up to its last counts."""
        self._answer(now, eff, self.commits.saved(self.sp.state.index))

    def _answer(self, now: float, eff: Effects, requests: list[Request]) -> None:
        """Success to the clients whose operations f+1 nodes now hold."""
        for req in requests:
            self.reply(now, eff, req, True, req.note)

    def tick(self, now: float, eff: Effects) -> None:
        for failed in self.commits.expire(now):
            why = "; ".join(f"{n}: {m}" for n, m in failed.reasons)
            self.reply(
                now,
                eff,
                failed.request,
                False,
                f"applied on the master but only {failed.held_by} of {self.majority} nodes "
                f"acknowledged in {self.sp.timing.ack_timeout_s:g} s"
                + (f" ({why})" if why else ""),
            )
        self.loads.tick(now, eff)

    # ------------------------------------------------------------------ client commands

    def command(self, now: float, verb: str, payload: bytes) -> Effects:
        """A client command on ``cmd/<verb>`` (never a retained one)."""
        eff = Effects()
        try:
            req = parse_command(verb, payload)
        except (ProtocolError, UnicodeDecodeError) as err:
            rt = sniff_reply_to(payload)
            if rt:
                reply = make_reply(False, verb, None, f"bad command: {err}")
                eff.out.append(Publish(self.sp.topics.reply(rt), reply))
            return eff
        over = self.rate.check(now, req.reply_to or "")
        if over is not None:
            if decade(self.rate.refused):
                log.warning(
                    "refused %d command(s) so far from clients over the rate limit (last: %s)",
                    self.rate.refused,
                    req.reply_to or "one without reply_to",
                )
            r = self.rate
            if over == ALL:
                why = (
                    f"too many commands from all clients together: at most {r.total_rate:g} "
                    f"a second after a burst of {r.total_burst:g}; try again shortly"
                )
            else:
                why = (
                    f"too many commands from this client: at most {r.rate:g} a second after a "
                    f"burst of {r.burst:g}; slow down"
                )
            self.reply(now, eff, req, False, why)
            return eff
        if verb not in VERBS:
            known = ", ".join(sorted(VERBS))
            self.reply(now, eff, req, False, f"unknown command {verb!r}; try one of {known}")
            return eff
        try:
            if verb == "status":
                doc = {**self.state_doc(now), "playlist": list(self.sp.state.playlist)}
                self.reply(now, eff, req, True, self.summary(now), state=doc)
            elif verb == "load":
                self.loads.start(now, eff, req)
            else:
                self._serve(now, eff, req)
        except Unchanged as err:
            # nothing to do, and no failure: once f+1 nodes hold the state that makes it so
            req.note = str(err)
            self._answer(now, eff, self.commits.wait(now, self.sp.state.index, req))
        except CommandError as err:
            self.reply(now, eff, req, False, str(err))
        except ProtocolError as err:
            self.reply(now, eff, req, False, f"bad {verb} argument: {err}")
        return eff

    def _serve(self, now: float, eff: Effects, req: Request) -> None:
        verb, arg = req.verb, req.arg
        if verb in ("enqueue", "replace", "announce"):
            arg = self._resolve_song(verb, arg)
        if verb == "enqueue":
            play, nxt = req.params.get("play", False), req.params.get("next", False)
            if not isinstance(play, bool) or not isinstance(nxt, bool):
                raise CommandError("enqueue's next and play must be true or false")
            verb = "enqueue_play" if play else "enqueue_next" if nxt else "enqueue"
        elif verb == "move":
            arg = _move_arg(req)
        new, op = apply_command(self.sp.state, verb, arg, self._ctx(now))
        self.commit(now, eff, new, op, req)

    def _resolve_song(self, verb: str, arg: Any) -> str:
        lib = self.sp.lib
        if not isinstance(arg, str) or not arg:
            raise CommandError(f"{verb} needs a song hash or an exact title")
        if len(arg) == 56 and all(c in "0123456789abcdef" for c in arg):
            if not lib.has(arg):
                raise CommandError(f"song {arg[:12]}… is not loaded; load it first")
            return arg
        matches = [s for s in lib.songs() if title_of(lib.meta(s)) == arg]
        if not matches:
            raise CommandError(f"no loaded song has the title {arg!r}")
        if len(matches) > 1:
            raise CommandError(f"{len(matches)} songs have the title {arg!r}; use the hash")
        return matches[0]

    def _ctx(self, now: float) -> Context:
        lib = self.sp.lib
        frames: dict[str, int] = {}
        for song in lib.songs():
            n = lib.frames(song)
            if n is not None:
                frames[song] = n
            else:
                dur = lib.meta(song).get("duration_s")
                frames[song] = int(dur * RATE) if isinstance(dur, (int, float)) else UNKNOWN_FRAMES
        return Context(now, self.lead(now), frames, term=self.sp.term)

    def lead(self, now: float) -> float:
        rtts: list[float | None] = []
        for node, info in sorted(self.sp.node_info.items()):
            if now - self.last_seen.get(node, -math.inf) < NODE_ALIVE_S:
                rtts.append(info.rtt_p90_s)
        t = self.sp.timing
        return lead_time(rtts, t.lead_min_s, t.lead_max_s, t.lead_rtt_factor)

    def reply(
        self, now: float, eff: Effects, req: Request, success: bool, msg: str, **extra: Any
    ) -> None:
        log.debug("reply to %s %s: %s %s", req.reply_to, req.verb, success, msg)
        if self.state_dirty:  # a client that hears the reply finds the state current
            self.flush_state(now, eff, with_playlist=False)
        if req.reply_to is None:
            return
        payload = make_reply(success, req.verb, req.params, msg, req.client_req_id, **extra)
        eff.out.append(Publish(self.sp.topics.reply(req.reply_to), payload))

    def upload_done(self, eff: Effects, song: str | None, size: int, error: str | None) -> None:
        """Answer a whole-file upload (``song`` None: refused before it was stored)."""
        params: dict[str, Any] = {"size": size} if song is None else {"song": song, "size": size}
        if song is None:
            msg = str(error)
        elif error:
            msg = f"not a playable song: {error}"
        else:
            msg = f"stored {title_of(self.sp.lib.meta(song)) or song[:12]}"
            self.offer(eff, song)
        reply = make_reply(error is None, "upload", params, msg)
        eff.out.append(Publish(self.sp.topics.reply("upload"), reply))

    def offer(self, eff: Effects, song: str, name: str | None = None) -> None:
        """Tell the speakers the master holds ``song`` (and the name it was loaded under)."""
        name = name or self.sp.lib.meta(song).get("name")
        extra = {"name": name} if isinstance(name, str) else {}
        self.sp.send(eff, "offer", manifest=self.sp.manifest(song).to_dict(), **extra)

    # ------------------------------------------------------------------ published state

    def state_doc(self, now: float) -> dict[str, Any]:
        sp = self.sp
        pb = sp.state.playback
        meta = sp.lib.meta(pb.song) if pb.song and sp.lib.has(pb.song) else {}
        alive = [sp.id] + [
            n
            for n in sp.peers
            if n != sp.id and now - self.last_seen.get(n, -math.inf) < NODE_ALIVE_S
        ]
        playlist = sp.state.playlist
        queue = playlist[pb.slot + 1 :]
        return {
            "playback": pb.state,
            "song": pb.song,
            "title": title_of(meta),
            "artist": meta.get("artist"),
            "album": meta.get("album"),
            "duration": meta.get("duration_s"),
            "position": round(pb.frame_at(now) / RATE, 3),
            "position_at": round(sp.wall(), 3),
            "queue": list(queue[:QUEUE_SHOWN]),
            "queue_length": len(queue),
            "playlist_length": len(playlist),
            "slot": pb.slot,
            "volume": sp.state.volume,
            "master": sp.id,
            "term": sp.term,
            "nodes": sorted(alive),
        }

    def summary(self, now: float) -> str:
        d = self.state_doc(now)
        what = d["title"] or (d["song"][:12] if d["song"] else "nothing")
        return (
            f"{d['playback']}: {what} at {d['position']:.1f} s, volume {d['volume']}, "
            f"{d['playlist_length']} in playlist, master {d['master']} (term {d['term']}), "
            f"nodes {','.join(d['nodes'])}"
        )

    def flush_state(self, now: float, eff: Effects, with_playlist: bool = True) -> None:
        """The retained state: the document, a topic per field, and the whole playlist on its
        own topic, republished only when it changed and never on a reply's path (a reply
        flushes the rest; the playlist follows with the coalesced publish, within
        STATE_PUBLISH_DELAY_S), so no command's cost grows with the playlist."""
        self.state_dirty = False
        t = self.sp.topics
        doc = self.state_doc(now)
        eff.out.append(Publish(t.state, json.dumps(doc, separators=(",", ":")).encode(), True))
        self._published[t.state] = b""
        for key, value in doc.items():
            if key != "position_at":
                self._retain(eff, t.state_field(key), _text(value))
        if with_playlist:
            playlist = self.sp.state.playlist
            if playlist is not self._playlist_published:
                self._playlist_published = playlist
                self._retain(eff, t.state_field("playlist"), _text(list(playlist)))
        self._retain(eff, t.state_field("position_at"), _text(doc["position_at"]))

    @property
    def playlist_unpublished(self) -> bool:
        return self.sp.state.playlist is not self._playlist_published

    def _retain(self, eff: Effects, topic: str, payload: bytes) -> None:
        if self._published.get(topic) == payload:
            return
        self._published[topic] = payload
        eff.out.append(Publish(topic, payload, True))

    def publish_library(self, eff: Effects) -> None:
        lib = self.sp.lib
        songs = []
        for song in sorted(lib.songs()):
            meta = lib.meta(song)
            songs.append(
                {
                    "hash": song,
                    "title": title_of(meta),
                    "artist": meta.get("artist"),
                    "album": meta.get("album"),
                    "duration": meta.get("duration_s"),
                    "size": lib.size_of(song),
                }
            )
        self._retain(eff, self.sp.topics.library, json.dumps(songs, separators=(",", ":")).encode())


@dataclass
class _Load:
    req: Request
    manifest: Manifest
    deadline: float
    received: int = 0  # chunks received at the last look (upload phase)
    replicating: bool = False  # the master holds it; waiting for f+1 holders
    title: str = ""


class Loads:
    """Loads waiting: first for the client's chunks (an idle timeout), then, unless ``bg``,
    for f+1 nodes to hold the song. Pure: events come from the node (a song arrived, chunks
    refused, holders changed, a decode failed, the housekeeping tick, a step-down)."""

    def __init__(self, master: Master) -> None:
        self.m = master
        self.waiting: list[_Load] = []

    def start(self, now: float, eff: Effects, req: Request) -> None:
        sp = self.m.sp
        try:
            manifest = Manifest.from_dict(
                {
                    "song": req.params.get("song"),
                    "size": req.params.get("size"),
                    "chunk_size": req.params.get("chunk_size", sp.chunk_size),
                },
                max_size=sp.max_song_bytes,
            )
        except ProtocolError as err:
            self.m.reply(now, eff, req, False, f"bad load manifest: {err}")
            return
        if not isinstance(req.params.get("bg", False), bool):
            self.m.reply(now, eff, req, False, "bad load manifest: bg must be true or false")
            return
        if req.reply_to is None:
            log.warning("a load without reply_to cannot be served (nobody to ask for chunks)")
            return
        xfer = sp.topics.internal(f"xfer/{req.reply_to}")
        song = manifest.song
        if len(self.waiting) >= MAX_LOADS_WAITING:
            msg = f"too many loads waiting ({len(self.waiting)}): try again in a few seconds"
            self.m.reply(now, eff, req, False, msg)
            return
        uploads = {w.manifest.song for w in self.waiting if not w.replicating}
        if not sp.lib.has(song) and song not in uploads and len(uploads) >= MAX_UPLOADS:
            msg = f"too many uploads in progress ({len(uploads)}): try again when one ends"
            self.m.reply(now, eff, req, False, msg)
            return
        load = _Load(req, manifest, now + sp.timing.upload_idle_timeout_s)
        if sp.lib.has(song):  # nothing to send; the client now waits for replication
            eff.out.append(Publish(xfer, json.dumps({"song": song, "missing": []}).encode()))
            self._stored(now, eff, load)
            return
        missing = sp.lib.assembly_missing(manifest)
        # the speakers take the client's chunks too (a signing cluster only those it announced)
        eff.expect.append(manifest)
        sp.send(eff, "offer", manifest=manifest.to_dict(), upload=True)
        eff.out.append(Publish(xfer, json.dumps({"song": song, "missing": missing}).encode()))
        load.received = manifest.n_chunks - len(missing)
        self.waiting.append(load)

    def _stored(self, now: float, eff: Effects, load: _Load) -> None:
        """The master holds the song: a cheap look at its bytes refuses what is plainly not
        audio (the decode that follows decides for good), then wait for f+1 holders."""
        sp, song = self.m.sp, load.manifest.song
        if sp.lib.sniff(song) is None:
            if song not in sp.state.playlist:
                eff.remove.append(song)
                eff.node_state = True
            self._done(now, eff, load, False, "not a playable song: not a known audio format")
            return
        sp.holders.setdefault(song, set()).add(sp.id)
        name = song_name(load.req.params.get("name"))
        if name is not None:
            eff.names.append((song, name))
        load.title = title_of(sp.lib.meta(song)) or name or song[:12]
        self.m.offer(eff, song, name)
        if load.req.params.get("bg"):
            msg = f"{load.title} is on the master; replicating in the background"
            self._done(now, eff, load, True, msg)
            return
        load.replicating = True
        load.deadline = now + max(10.0, load.manifest.size / 1e6)
        if load not in self.waiting:
            self.waiting.append(load)
        self.holders_changed(now, eff)

    def _done(self, now: float, eff: Effects, load: _Load, ok: bool, msg: str) -> None:
        if load in self.waiting:
            self.waiting.remove(load)
        self.m.reply(now, eff, load.req, ok, msg)

    def _of(self, song: str, replicating: bool) -> list[_Load]:
        return [w for w in self.waiting if w.manifest.song == song and w.replicating is replicating]

    def arrived(self, now: float, eff: Effects, song: str) -> None:
        for load in self._of(song, False):
            self._stored(now, eff, load)

    def refused(self, now: float, eff: Effects, song: str, why: str) -> None:
        for load in self._of(song, False):
            self._done(now, eff, load, False, f"the song's bytes were refused: {why}")

    def undecodable(self, now: float, eff: Effects, song: str, why: str) -> None:
        for load in self._of(song, True):
            self._done(now, eff, load, False, f"not a playable song: {why}")

    def holders_changed(self, now: float, eff: Effects) -> None:
        sp = self.m.sp
        for load in [w for w in self.waiting if w.replicating]:
            held = len(sp.holders.get(load.manifest.song, ()))
            if held >= self.m.majority:
                self._done(now, eff, load, True, f"loaded {load.title} on {held} nodes")

    def tick(self, now: float, eff: Effects) -> None:
        sp = self.m.sp
        for load in list(self.waiting):
            if now < load.deadline:
                continue
            if load.replicating:
                held = len(sp.holders.get(load.manifest.song, ()))
                msg = f"only {held} of {self.m.majority} nodes hold {load.title}"
                self._done(now, eff, load, False, msg)
                continue
            got = sp.lib.received_count(load.manifest)
            if got == load.received and not sp.lib.has(load.manifest.song):
                self._done(
                    now,
                    eff,
                    load,
                    False,
                    f"upload incomplete: received {got} of {load.manifest.n_chunks} chunks; "
                    "load again to resume",
                )
                continue
            load.received = got
            load.deadline = now + sp.timing.upload_idle_timeout_s

    def drop(self, eff: Effects) -> None:
        """The master steps down: each waiting load is told to try again (the chunks received
        so far are kept, so a load to the next master resumes where this one stopped)."""
        for load in list(self.waiting):
            self._done(
                0.0,
                eff,
                load,
                False,
                "the master stepped down while this load waited; load again to resume",
            )
