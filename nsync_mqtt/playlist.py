"""The replicated player state and the commands that change it (pure).

Every node holds a :class:`PlayerState`: the playlist (song hashes, in order), the slot (index of
the current song), the playback (playing/paused/idle, and which song frame plays at which
instant of the master's clock) and the volume. The master turns a client command into a new state
and an *operation*; speakers apply the operation to their own state.

Operations form a log, as in Raft. Every operation carries the index it takes in that log, the
term (election epoch) of the master that created it, and the term of the operation before it; a
state remembers the ``(term, index)`` of the last operation applied to it. A master creates at
most one operation per index in its term, so two states whose last operations share
``(term, index)`` hold the same operations (log matching). A speaker therefore applies an
operation only when it comes right after its own last one (same index + 1, same previous term);
one it already holds (same term, index at or below its own) is a harmless re-delivery; anything
else (a gap, or another term at an index it holds) is a conflict, and the speaker takes the
master's whole state instead of acknowledging. The NSync paper's hash checks stay as a second
line: an operation that changes the playlist carries the hash of the playlist before and after
it, and every playback operation carries the slotted song's hash and the playlist hash, so a
speaker never plays a song other than the master's.

A new master starts its term with a ``term`` operation that changes nothing but the log: once
f+1 nodes hold it, every operation of an older term that the master holds is committed with it,
and every one it lacks is discarded everywhere (the nodes holding such an operation meet a
conflict and take the master's state).

Times in a playback are on the master's clock. A playing playback says "frame ``frame`` reaches
the speakers at master time ``at``"; the position at any later instant follows from the rate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nsync_mqtt.errors import CommandError, NSyncError, ProtocolError, SongMissing
from nsync_mqtt.messages import check_hash, is_wire_int

RATE = 44100
PLAYING, PAUSED, IDLE = "playing", "paused", "idle"
PLAYBACK_STATES = (PLAYING, PAUSED, IDLE)
BACKWARD_RESTART_S = 3.0  # backward within this many seconds of a song's start goes to the previous
MAX_PLAYLIST_LEN = 5000  # songs; an enqueue beyond it is refused (each edit re-hashes the list)
MAX_SECONDS = 7 * 24 * 3600.0  # a position beyond this is in no song (even unknown lengths)


EMPTY_PLAYLIST_HASH = hashlib.sha224(b"").hexdigest()


def chain_hash(before: str, song: str) -> str:
    """The hash of a playlist whose hash was ``before``, with ``song`` appended."""
    return hashlib.sha224(f"{before}\n{song}".encode()).hexdigest()


def playlist_hash(songs: Iterable[str], start: str = EMPTY_PLAYLIST_HASH) -> str:
    """The playlist hash, a chain over the ordered song hashes: the empty playlist's is
    sha224(b"") and ``hash(playlist + [s]) = sha224(hash(playlist) + "\n" + s)`` (hex digests).
    Equal playlists, equal hashes; an enqueue derives the new hash from the old one in O(1).
    This is the O(n) reference: a :class:`PlayerState` keeps its playlist's hash and carries it
    forward. ``start`` continues the chain from a known prefix's hash."""
    h = start
    for song in songs:
        h = chain_hash(h, song)
    return h


EDITS = ("clear", "remove", "move", "insert", "replace")


def edit_songs(
    playlist: tuple[str, ...], edit: str, at: int = 0, to: int = 0, song: str | None = None
) -> tuple[str, ...]:
    """The playlist after one edit: ``clear``; ``remove`` the entry at ``at``; ``move`` the
    entry at ``at`` to ``to``; ``insert`` ``song`` at ``at``; ``replace`` everything with
    ``song``. ValueError if a position is out of range."""
    n = len(playlist)
    if edit == "clear":
        return ()
    if edit == "replace" and song is not None:
        return (song,)
    if edit == "insert" and song is not None and 0 <= at <= n:
        return (*playlist[:at], song, *playlist[at:])
    if edit == "remove" and 0 <= at < n:
        return playlist[:at] + playlist[at + 1 :]
    if edit == "move" and 0 <= at < n and 0 <= to < n:
        rest = playlist[:at] + playlist[at + 1 :]
        return (*rest[:to], playlist[at], *rest[to:])
    raise ValueError(f"cannot {edit} at {at} (to {to}) in a playlist of {n}")


def moved_slot(slot: int, edit: str, at: int = 0, to: int = 0) -> int:
    """Where the entry at ``slot`` is after a ``remove``, ``move`` or ``insert`` at ``at`` (a
    removed slot stays where it was: the next entry takes its place)."""
    if edit == "remove":
        return slot - 1 if at < slot else slot
    if edit == "insert":
        return slot + 1 if at <= slot else slot
    if edit == "move":
        if slot == at:
            return to
        slot -= at < slot
        return slot + (to <= slot)
    return slot


@dataclass(frozen=True)
class Playback:
    state: str = IDLE
    slot: int = 0
    song: str | None = None
    frame: int = 0
    at: float | None = None  # master-clock instant at which `frame` plays (playing) or stopped

    def frame_at(self, t: float, rate: int = RATE) -> int:
        if self.state == PLAYING and self.at is not None and t > self.at:
            return self.frame + int((t - self.at) * rate)
        return self.frame

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "slot": self.slot,
            "song": self.song,
            "frame": self.frame,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: object) -> Playback:
        if not isinstance(d, dict):
            raise ProtocolError("playback must be an object")
        state = d.get("state")
        if state not in PLAYBACK_STATES:
            raise ProtocolError(f"playback.state must be one of {PLAYBACK_STATES}")
        slot, frame, at = d.get("slot"), d.get("frame"), d.get("at")
        if not is_wire_int(slot) or slot < 0 or not is_wire_int(frame) or frame < 0:
            raise ProtocolError("playback.slot and playback.frame must be non-negative integers")
        if at is not None and (
            isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at)
        ):
            raise ProtocolError("playback.at must be a finite number or null")
        song = d.get("song")
        if song is not None:
            check_hash(song, "playback.song")
        return cls(state, slot, song, frame, None if at is None else float(at))


@dataclass(frozen=True)
class PlayerState:
    playlist: tuple[str, ...] = ()
    playback: Playback = field(default_factory=Playback)
    volume: int = 50
    index: int = 0  # operations applied so far: the index of the last one
    term: int = 0  # the term in which the last applied operation was created
    # during an announcement: where playback returns when it ends (slot, song, frame and
    # whether it was playing, paused or idle; ``at`` None), the announcement being at ``slot``
    resume: Playback | None = None
    # (playlist, its hash), kept so that no read hashes the whole playlist again: valid only for
    # that very playlist object. `replace()` passes it on; a new playlist object drops it, so a
    # state built with another playlist never carries a wrong hash (see `with_songs`).
    _hashed: tuple[tuple[str, ...], str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self._hashed is not None and self._hashed[0] is not self.playlist:
            object.__setattr__(self, "_hashed", None)

    @property
    def last(self) -> tuple[int, int]:
        """``(term, index)`` of the last applied operation: what elections compare."""
        return self.term, self.index

    @property
    def hash(self) -> str:
        """The playlist hash (:func:`playlist_hash`), computed once per playlist and carried
        forward by every change: O(1) per operation."""
        if self._hashed is None:
            object.__setattr__(self, "_hashed", (self.playlist, playlist_hash(self.playlist)))
            assert self._hashed is not None
        return self._hashed[1]

    def with_songs(self, songs: Iterable[str], **changes: Any) -> PlayerState:
        """This state with ``songs`` appended to the playlist (and ``changes``); the new hash
        comes from the current one in O(len(songs))."""
        added = tuple(songs)
        playlist = self.playlist + added
        return replace(
            self, playlist=playlist, _hashed=(playlist, playlist_hash(added, self.hash)), **changes
        )

    @property
    def slotted(self) -> str | None:
        slot = self.playback.slot
        return self.playlist[slot] if 0 <= slot < len(self.playlist) else None

    def at_rest(self) -> PlayerState:
        """The same place with no schedule: playing becomes paused at the last known frame."""
        pb = self.playback
        if pb.at is None:
            return self
        state = PAUSED if pb.state == PLAYING else pb.state
        return replace(self, playback=replace(pb, state=state, at=None))

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "playlist": list(self.playlist),
            "playback": self.playback.to_dict(),
            "volume": self.volume,
            "index": self.index,
            "term": self.term,
        }
        if self.resume is not None:
            doc["resume"] = self.resume.to_dict()
        return doc

    @classmethod
    def from_dict(cls, d: object, default_term: int | None = None) -> PlayerState:
        """Validate a state document; ``default_term`` stands in for a missing ``term`` (files
        written before states kept it), otherwise ``term`` is required."""
        if not isinstance(d, dict):
            raise ProtocolError("state must be an object")
        playlist = d.get("playlist")
        if not isinstance(playlist, list):
            raise ProtocolError("state.playlist must be a list")
        songs = tuple(check_hash(s, "playlist entry") for s in playlist)
        volume, index = d.get("volume"), d.get("index")
        if not is_wire_int(volume) or not 0 <= volume <= 100:
            raise ProtocolError("state.volume must be an integer 0-100")
        if not is_wire_int(index) or index < 0:
            raise ProtocolError("state.index must be a non-negative integer")
        term = d.get("term", default_term)
        if not is_wire_int(term) or term < 0:
            raise ProtocolError("state.term must be a non-negative integer")
        resume = Playback.from_dict(d["resume"]) if d.get("resume") is not None else None
        return cls(songs, Playback.from_dict(d.get("playback")), volume, index, term, resume)


# --- the master side: commands -> (new state, operation) -------------------------------------


@dataclass(frozen=True)
class Context:
    """What the master knows when it applies a command."""

    now: float  # master clock
    lead_s: float  # how far ahead playback changes are scheduled
    song_frames: Mapping[str, int]  # known length of each held song, in frames
    rate: int = RATE
    term: int = 0  # the master's term: every operation it creates carries it


class Unchanged(NSyncError):
    """The command asks for what already is (``pause`` when paused): nothing to do, and no
    failure either (the paper's no-op). The message says so."""


def _op(state: PlayerState, new: PlayerState, kind: str, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op": kind,
        "index": new.index,
        "term": new.term,
        "prev_term": state.term,
        "pre": state.hash,
        "post": new.hash,
    }
    op.update(extra)
    if kind == "playback":
        op["playback"] = new.playback.to_dict()
    if new.resume is not None:  # every operation states whether an announcement is on
        op["resume"] = new.resume.to_dict()
    return op


def _next(state: PlayerState, ctx: Context, **changes: Any) -> PlayerState:
    """``state`` with ``changes``, one operation further along, in the master's term."""
    return replace(state, index=state.index + 1, term=ctx.term, **changes)


def _with_playback(state: PlayerState, pb: Playback, ctx: Context) -> PlayerState:
    return _next(state, ctx, playback=pb)


def start_term(state: PlayerState, term: int) -> tuple[PlayerState, dict[str, Any]]:
    """The first operation of a new master's ``term``: once f+1 nodes hold it, everything
    before it in this master's state is committed. It carries the master's playback, whose
    instants the new master has moved onto its own clock: every node then holds them on the
    clock of the master it follows (a node that kept an older master's instants would map them
    through its estimate of the new master's clock, hours off when the clocks are)."""
    if not is_wire_int(term) or term <= state.term:
        raise ValueError(f"a new term must be above {state.term}, got {term!r}")
    new = replace(state, index=state.index + 1, term=term)
    op = _op(state, new, "term")
    op["playback"] = new.playback.to_dict()
    return new, op


def _start(state: PlayerState, slot: int, frame: int, ctx: Context) -> Playback:
    return Playback(PLAYING, slot, state.playlist[slot], frame, ctx.now + ctx.lead_s)


def _cued(state: PlayerState, slot: int, playing: bool, ctx: Context) -> Playback:
    """Slot `slot` at frame 0: playing from now+lead if `playing`, else paused at 0."""
    if slot >= len(state.playlist):
        return Playback(IDLE, len(state.playlist), None, 0, None)
    if playing:
        return _start(state, slot, 0, ctx)
    return Playback(PAUSED if state.playback.state == PAUSED else IDLE, slot, state.playlist[slot])


def _stop_at(pb: Playback, ctx: Context, new_state: str) -> Playback:
    """Stop `pb` at now+lead, remembering the frame reached then."""
    at = ctx.now + ctx.lead_s
    frame = pb.frame_at(at, ctx.rate)
    return Playback(new_state, pb.slot, pb.song, frame, at)


def _frames_of(song: str | None, ctx: Context) -> int | None:
    return None if song is None else ctx.song_frames.get(song)


def apply_command(
    state: PlayerState, verb: str, arg: Any, ctx: Context
) -> tuple[PlayerState, dict[str, Any]]:
    """Apply one client command; raise CommandError (state unchanged) if it cannot apply."""
    pb = state.playback
    if state.resume is not None and verb not in ("volume", "play", "pause", "announce"):
        if verb in ("forward", "next"):  # skipping an announcement ends it
            return end_announcement(state, ctx)
        # anything else makes the announcement an ordinary entry of the playlist
        state = replace(state, resume=None)
    if verb == "announce":
        return _announce(state, arg, ctx)
    if verb in EDIT_VERBS:
        return _edit_command(state, verb, arg, ctx)
    if verb == "enqueue":
        song = _loaded(arg, ctx)
        _room_for_one(state)
        new_pb = pb
        if pb.song is None:  # nothing slotted: the new song becomes the current one
            new_pb = replace(pb, slot=len(state.playlist), song=song, frame=0, at=None)
        new = state.with_songs((song,), playback=new_pb, index=state.index + 1, term=ctx.term)
        return new, _op(state, new, "enqueue", song=song, playback=new_pb.to_dict())

    if verb == "play":
        if pb.state == PLAYING:
            raise Unchanged("already playing: nothing changed")
        if not state.playlist:
            raise CommandError("the playlist is empty: enqueue a song first")
        if pb.song is None:  # the playlist ended: play it again from the top
            new = _with_playback(state, _start(state, 0, 0, ctx), ctx)
        else:
            new = _with_playback(state, _start(state, pb.slot, pb.frame, ctx), ctx)
        return new, _op(state, new, "playback")

    if verb == "pause":
        if pb.state != PLAYING:
            raise Unchanged(
                f"already {'paused' if pb.state == PAUSED else 'stopped'}: nothing changed"
            )
        new = _with_playback(state, _stop_at(pb, ctx, PAUSED), ctx)
        return new, _op(state, new, "playback")

    if verb == "stop":
        if pb.state == IDLE and pb.frame == 0:
            raise Unchanged("already stopped: nothing changed")
        at = ctx.now + ctx.lead_s
        new = _with_playback(state, Playback(IDLE, pb.slot, pb.song, 0, at), ctx)
        return new, _op(state, new, "playback")

    if verb in ("forward", "next"):
        if pb.song is None:
            raise CommandError("nothing to skip: the playlist is empty or has ended")
        new = _with_playback(state, _cued(state, pb.slot + 1, pb.state == PLAYING, ctx), ctx)
        return new, _op(state, new, "playback")

    if verb in ("backward", "previous"):
        if not state.playlist:
            raise CommandError("the playlist is empty")
        slot = min(pb.slot, len(state.playlist))
        pos_s = pb.frame_at(ctx.now, ctx.rate) / ctx.rate if pb.song is not None else 0.0
        if pb.song is None or (pos_s < BACKWARD_RESTART_S and slot > 0):
            slot -= 1
        new = _with_playback(state, _cued(state, slot, pb.state == PLAYING, ctx), ctx)
        return new, _op(state, new, "playback")

    if verb == "seek":
        seconds = _number(arg, "seek")
        if pb.song is None:
            raise CommandError("nothing to seek in: no song is slotted")
        frames = _frames_of(pb.song, ctx)
        frame = round(seconds * ctx.rate)
        if frames is not None and frame >= frames:
            raise CommandError(
                f"seek to {seconds:g} s is past the end of the song ({frames / ctx.rate:.1f} s)"
            )
        if pb.state == PLAYING:
            new_pb = Playback(PLAYING, pb.slot, pb.song, frame, ctx.now + ctx.lead_s)
        else:
            new_pb = Playback(PAUSED, pb.slot, pb.song, frame, None)
        new = _with_playback(state, new_pb, ctx)
        return new, _op(state, new, "playback")

    if verb == "volume":
        volume = parse_volume(arg, state.volume)
        if volume == state.volume:
            raise Unchanged(f"volume already {volume}: nothing changed")
        new = _next(state, ctx, volume=volume)
        return new, _op(state, new, "volume", volume=volume)

    raise CommandError(f"unknown command {verb!r}")


EDIT_VERBS = ("clear", "remove", "move", "replace", "enqueue_next", "enqueue_play")


def _loaded(arg: Any, ctx: Context) -> str:
    song = check_hash(arg)
    if song not in ctx.song_frames:
        raise SongMissing(f"song {song[:12]}… is not loaded; load it first")
    return song


def _room_for_one(state: PlayerState) -> None:
    if len(state.playlist) >= MAX_PLAYLIST_LEN:
        raise CommandError(
            f"the playlist is full ({MAX_PLAYLIST_LEN} songs): remove or clear some first"
        )


def _position(value: Any, what: str, n: int) -> int:
    """A playlist position 0..n-1 (the first song is 0, as the state's ``slot`` counts)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        try:
            value = int(value)
        except ValueError:  # "²" is a digit int() refuses; so are 5000 of them
            raise CommandError(f"{what} needs a playlist position, got {value[:20]!r}") from None
    if not is_wire_int(value):
        raise CommandError(f"{what} needs a playlist position (0 is the first song), got {value!r}")
    if not 0 <= value < n:
        if n == 0:
            raise CommandError("the playlist is empty")
        raise CommandError(f"{what} {value} is out of range: the playlist has positions 0-{n - 1}")
    return value


def _edit_command(
    state: PlayerState, verb: str, arg: Any, ctx: Context
) -> tuple[PlayerState, dict[str, Any]]:
    """The playlist-editing commands: one ``edit`` operation each, which the speakers replay
    with :func:`edit_songs` and check against the new playlist's hash."""
    pb = state.playback
    n = len(state.playlist)
    at = to = 0
    song: str | None = None
    if verb == "clear":
        if not state.playlist:
            raise Unchanged("the playlist is already empty: nothing changed")
        edit = "clear"
    elif verb == "replace":
        edit, song = "replace", _loaded(arg, ctx)
    elif verb == "remove":
        edit, at = "remove", _position(arg, "remove", n)
    elif verb == "move":
        if not isinstance(arg, (tuple, list)) or len(arg) != 2:
            raise CommandError("move needs two playlist positions: FROM TO")
        edit, at, to = "move", _position(arg[0], "move from", n), _position(arg[1], "move to", n)
        if at == to:
            raise Unchanged(f"song {at} is already at position {to}: nothing changed")
    else:  # enqueue_next, enqueue_play: right after the current song (or at the end)
        edit, song = "insert", _loaded(arg, ctx)
        _room_for_one(state)
        at = pb.slot + 1 if pb.song is not None else n
    playlist = edit_songs(state.playlist, edit, at, to, song)
    edited = replace(state, playlist=playlist)
    new_pb = _playback_after_edit(state, edited, verb, edit, at, to, ctx)
    new = _next(edited, ctx, playback=new_pb)
    extra: dict[str, Any] = {"edit": edit, "playback": new_pb.to_dict()}
    if edit in ("remove", "move", "insert"):
        extra["at"] = at
    if edit == "move":
        extra["to"] = to
    if song is not None:
        extra["song"] = song
    return new, _op(state, new, "edit", **extra)


def _playback_after_edit(
    state: PlayerState, edited: PlayerState, verb: str, edit: str, at: int, to: int, ctx: Context
) -> Playback:
    """Where playback is after an edit: the current song goes on where it now stands; if it was
    removed (or the list cleared) the next one takes its place, playing if it was; ``replace``
    and ``enqueue_play`` start their song."""
    pb = state.playback
    playing = pb.state == PLAYING
    if edit == "replace" or verb == "enqueue_play":
        return _start(edited, 0 if edit == "replace" else at, 0, ctx)
    if verb == "enqueue_next" and pb.song is None:  # nothing slotted: the song becomes current
        return replace(pb, slot=at, song=edited.playlist[at], frame=0, at=None)
    if edit == "clear" or (edit == "remove" and at == pb.slot):
        slot = 0 if edit == "clear" else at
        cued = _cued(edited, slot, playing, ctx)
        if cued.song is None and playing:  # nothing left to play: stop at the lead instant
            return replace(cued, at=ctx.now + ctx.lead_s)
        return cued
    return replace(pb, slot=moved_slot(pb.slot, edit, at, to))


def _announce(state: PlayerState, arg: Any, ctx: Context) -> tuple[PlayerState, dict[str, Any]]:
    """Interrupt what plays (or not) with ``song``: it goes in at the current slot and plays
    from the lead instant on every speaker; the state remembers where playback was, and when
    the announcement ends (or is skipped) :func:`end_announcement` takes it out and returns
    there."""
    song = _loaded(arg, ctx)
    if state.resume is not None:
        raise CommandError("an announcement is playing already: try again when it ends")
    _room_for_one(state)
    pb = state.playback
    slot = min(pb.slot, len(state.playlist))
    at = ctx.now + ctx.lead_s
    frame = pb.frame_at(at, ctx.rate) if pb.state == PLAYING else pb.frame
    resume = Playback(pb.state, slot, pb.song, frame, None)
    edited = replace(state, playlist=edit_songs(state.playlist, "insert", slot, 0, song))
    new_pb = _start(edited, slot, 0, ctx)
    new = _next(edited, ctx, playback=new_pb, resume=resume)
    extra = {"edit": "insert", "at": slot, "song": song, "playback": new_pb.to_dict()}
    return new, _op(state, new, "edit", **extra)


def end_announcement(state: PlayerState, ctx: Context) -> tuple[PlayerState, dict[str, Any]]:
    """The announcement ended or was skipped: remove it and go back to where playback was,
    playing on from the frame it was interrupted at if it was playing."""
    pb, resume = state.playback, state.resume
    assert resume is not None
    slot = pb.slot
    edited = replace(state, playlist=edit_songs(state.playlist, "remove", slot), resume=None)
    lead_at = ctx.now + ctx.lead_s
    if resume.song is None:
        new_pb = Playback(IDLE, len(edited.playlist), None, 0, lead_at)
    elif resume.state == PLAYING:
        new_pb = Playback(PLAYING, slot, resume.song, resume.frame, lead_at)
    else:  # paused or idle: the announcement stops at the lead instant
        new_pb = Playback(resume.state, slot, resume.song, resume.frame, lead_at)
    new = _next(edited, ctx, playback=new_pb)
    return new, _op(state, new, "edit", edit="remove", at=slot, playback=new_pb.to_dict())


def next_song(state: PlayerState, finished_slot: int, ctx: Context) -> tuple[PlayerState, dict]:
    """The slotted song finished on a quorum: move on (idle after the last song), or back to
    where an announcement interrupted."""
    pb = state.playback
    if pb.state != PLAYING or pb.slot != finished_slot:
        raise CommandError("stale finish report")
    if state.resume is not None:
        return end_announcement(state, ctx)
    new = _with_playback(state, _cued(state, pb.slot + 1, True, ctx), ctx)
    return new, _op(state, new, "playback")


def _number(arg: Any, what: str) -> float:
    if isinstance(arg, bool):
        raise CommandError(f"{what} needs a number of seconds, got {arg!r}")
    try:
        value = float(arg)
    except (TypeError, ValueError):
        raise CommandError(f"{what} needs a number of seconds, got {arg!r}") from None
    if value != value or value < 0 or value == float("inf"):
        raise CommandError(f"{what} needs a non-negative number of seconds, got {arg!r}")
    if value > MAX_SECONDS:
        raise CommandError(f"{what} to {value:g} s is beyond any song ({MAX_SECONDS:g} s at most)")
    return value


def parse_volume(arg: Any, current: int) -> int:
    """0-100 absolute, or "+N"/"-N" relative (clamped). Only text is relative: a JSON number
    is a level, so ``{"volume": -5}`` is refused rather than taken as "-5"."""
    text = str(arg).strip() if not isinstance(arg, bool) else ""
    relative = isinstance(arg, str) and text[:1] in ("+", "-")
    try:
        value = int(text)
    except ValueError:
        try:  # a dashboard slider may send 35.0
            number = float(text)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise CommandError(f"volume must be 0-100 or +N/-N, got {arg!r}") from None
        value = int(number)
    if relative:
        return max(0, min(100, current + value))
    if not 0 <= value <= 100:
        raise CommandError(f"volume must be between 0 and 100, got {value}")
    return value


# --- the speaker side: operation -> new state ---------------------------------------------


class Mismatch(ProtocolError):
    """This node's state disagrees with the master's: it must pull the master's state."""


class StaleOp(ProtocolError):
    """An operation of an older term than this node's last one: a delayed message from a
    deposed master, to be ignored (neither applied nor acknowledged)."""


OP_KINDS = ("enqueue", "playback", "volume", "term", "edit")


@dataclass(frozen=True)
class Operation:
    """An operation as it travels, checked: its place in the log and what it changes."""

    kind: str
    term: int
    index: int
    prev_term: int
    pre: str  # playlist hash before
    post: str  # and after
    song: str | None = None  # enqueue; edit insert, replace
    playback: Playback | None = None  # enqueue, playback, edit
    volume: int | None = None  # volume
    edit: str | None = None  # edit: one of EDITS
    at: int = 0  # edit remove, move, insert: the position
    to: int = 0  # edit move: where to
    resume: Playback | None = None  # any: the state's resume after it (an announcement is on)

    @classmethod
    def from_dict(cls, op: object) -> Operation:
        """Check every field of a decoded operation; ProtocolError names the first bad one."""
        if not isinstance(op, Mapping):
            raise ProtocolError("an operation must be an object")
        kind = op.get("op")
        if kind not in OP_KINDS:
            raise ProtocolError(f"op.op must be one of {OP_KINDS}, got {str(kind)[:40]!r}")
        index, term, prev_term = op.get("index"), op.get("term"), op.get("prev_term")
        if not is_wire_int(index) or index < 1:
            raise ProtocolError("op.index must be a positive integer")
        if not is_wire_int(term) or not is_wire_int(prev_term) or not 0 <= prev_term <= term:
            raise ProtocolError("op.term and op.prev_term must be integers, 0 <= prev_term <= term")
        pre = check_hash(op.get("pre"), "op.pre")
        post = check_hash(op.get("post"), "op.post")
        song = playback = volume = edit = None
        at = to = 0
        if kind == "enqueue":
            song = check_hash(op.get("song"), "op.song")
        elif kind == "edit":
            edit = op.get("edit")
            if edit not in EDITS:
                raise ProtocolError(f"op.edit must be one of {EDITS}, got {str(edit)[:40]!r}")
            if edit in ("insert", "replace"):
                song = check_hash(op.get("song"), "op.song")
            at, to = op.get("at", 0), op.get("to", 0)
            if not is_wire_int(at) or not is_wire_int(to) or at < 0 or to < 0:
                raise ProtocolError("op.at and op.to must be non-negative integers")
        elif post != pre:
            raise ProtocolError(f"a {kind} operation must leave the playlist as it is")
        if kind in ("enqueue", "playback", "edit") or (kind == "term" and "playback" in op):
            playback = Playback.from_dict(op.get("playback"))
        if kind == "volume":
            volume = op.get("volume")
            if not is_wire_int(volume) or not 0 <= volume <= 100:
                raise ProtocolError("op.volume must be an integer 0-100")
        resume = Playback.from_dict(op["resume"]) if op.get("resume") is not None else None
        return cls(
            kind, term, index, prev_term, pre, post, song, playback, volume, edit, at, to, resume
        )

    def to_dict(self) -> dict[str, Any]:
        """The operation as it travels: ``Operation.from_dict(op.to_dict()) == op``."""
        doc: dict[str, Any] = {
            "op": self.kind,
            "index": self.index,
            "term": self.term,
            "prev_term": self.prev_term,
            "pre": self.pre,
            "post": self.post,
        }
        if self.song is not None:
            doc["song"] = self.song
        if self.playback is not None:
            doc["playback"] = self.playback.to_dict()
        if self.volume is not None:
            doc["volume"] = self.volume
        if self.edit is not None:
            doc["edit"] = self.edit
            if self.edit in ("remove", "move", "insert"):
                doc["at"] = self.at
            if self.edit == "move":
                doc["to"] = self.to
        if self.resume is not None:
            doc["resume"] = self.resume.to_dict()
        return doc


def apply_op(state: PlayerState, op: Mapping[str, Any] | Operation) -> PlayerState:
    """Apply a master's operation. One this node already holds leaves the state unchanged (the
    same object); a gap or a conflict raises Mismatch; an older term's raises StaleOp."""
    o = op if isinstance(op, Operation) else Operation.from_dict(op)
    term, index = o.term, o.index
    if term < state.term:
        raise StaleOp(
            f"op ({term}, {index}) is older than the last one held ({state.term}, {state.index})"
        )
    if term == state.term and index <= state.index:
        return state  # held already: the same operation (one master per term, one op per index)
    if index <= state.index:
        raise Mismatch(
            f"conflict: holds ({state.term}, {state.index}) but the master has term {term} "
            f"at index {index}"
        )
    if index != state.index + 1:
        raise Mismatch(f"missed operations: have {state.index}, got {index}")
    if o.prev_term != state.term:
        raise Mismatch(
            f"conflict: the op before index {index} is of term {state.term} here, "
            f"{o.prev_term} on the master"
        )
    if state.hash != o.pre:
        raise Mismatch("playlist hash differs from the master's before this operation")
    if state.resume != o.resume:
        state = replace(state, resume=o.resume)  # an announcement starts, goes on or ends
    if o.edit is not None:
        try:
            playlist = edit_songs(state.playlist, o.edit, o.at, o.to, o.song)
        except ValueError as err:
            raise Mismatch(f"the master's {o.edit} does not fit this playlist: {err}") from None
        state = replace(state, playlist=playlist)
        if state.hash != o.post:
            raise Mismatch(f"playlist hash differs from the master's after this {o.edit}")
    elif o.song is not None:  # enqueue
        new = state.with_songs((o.song,), playback=o.playback, index=index, term=term)
        if new.hash != o.post:
            raise Mismatch("playlist hash differs from the master's after this enqueue")
        assert o.playback is not None
        return new
    if o.playback is not None:
        pb = o.playback
        slotted = state.playlist[pb.slot] if pb.slot < len(state.playlist) else None
        if pb.song is not None and slotted != pb.song:
            raise Mismatch("slotted song differs from the master's")
        return replace(state, playback=pb, index=index, term=term)
    if o.volume is not None:
        return replace(state, volume=o.volume, index=index, term=term)
    return replace(state, index=index, term=term)  # a term's first operation


def takes_sync(current: tuple[int, int], offered: tuple[int, int]) -> bool:
    """Whether a node whose last operation is ``current`` (term, index) takes a master's state
    whose last one is ``offered``: a state of a newer term always (it settles a conflict, and
    drops operations of older terms that never committed), one of the same term only if it is
    not behind (a delayed answer must not undo operations applied since), an older term never."""
    return offered[0] > current[0] or (offered[0] == current[0] and offered[1] >= current[1])
