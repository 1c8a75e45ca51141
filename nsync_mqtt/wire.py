"""Typed bodies of the internal messages, and of the node states peers publish.

Anyone who can publish to the broker can publish on the cluster's topics, so nothing read from
them is used before it is checked here: every field gets its type and range (integers that are
not booleans, finite numbers, node ids, song hashes), and a body that fails becomes one
:class:`ProtocolError`. docs/protocol.md describes each message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.messages import (
    HASH_RE,
    MAX_WIRE_INT,
    Message,
    check_hash,
    check_id,
    is_int,
    is_wire_int,
    song_name,
)
from nsync_mqtt.playlist import Operation, PlayerState
from nsync_mqtt.replication import Manifest, parse_held

MAX_FAILURE_TEXT = 200  # characters of a peer's failure message kept


def _int(body: Mapping[str, Any], key: str, minimum: int = 0) -> int:
    v = body.get(key)
    if not is_int(v) or not minimum <= v <= MAX_WIRE_INT:
        raise ProtocolError(
            f"field {key!r} must be an integer from {minimum} to {MAX_WIRE_INT}, got {v!r}"
        )
    return v


def _opt_int(body: Mapping[str, Any], key: str) -> int | None:
    return None if body.get(key) is None else _int(body, key)


def _float(body: Mapping[str, Any], key: str) -> float:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"field {key!r} must be a finite number, got {v!r}")
    return float(v)


def _bool(body: Mapping[str, Any], key: str) -> bool:
    v = body.get(key)
    if not isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be true or false, got {v!r}")
    return v


def _last_log(body: Mapping[str, Any]) -> tuple[int, int]:
    v = body.get("last_log")
    if not isinstance(v, list) or len(v) != 2 or not all(_wire_int(x) for x in v):
        raise ProtocolError(f"field 'last_log' must be [term, index], got {v!r}")
    return v[0], v[1]


def _wire_int(x: object) -> bool:
    return is_wire_int(x) and x >= 0


def _songs(v: object, what: str) -> frozenset[str]:
    if not isinstance(v, list):
        raise ProtocolError(f"{what} must be a list of song hashes")
    return frozenset(check_hash(s, what) for s in v)


@dataclass(frozen=True)
class Heartbeat:
    index: int
    log_term: int
    plist: str

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Heartbeat:
        plist = b.get("plist")
        if not isinstance(plist, str) or not HASH_RE.fullmatch(plist):
            raise ProtocolError("field 'plist' must be a playlist hash")
        return cls(_int(b, "index"), _int(b, "log_term"), plist)


@dataclass(frozen=True)
class VoteRequest:
    last_log: tuple[int, int]

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> VoteRequest:
        return cls(_last_log(b))


@dataclass(frozen=True)
class PreVoteRequest:
    next_term: int
    last_log: tuple[int, int]

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> PreVoteRequest:
        return cls(_int(b, "next_term", 1), _last_log(b))


@dataclass(frozen=True)
class PreVote:
    pre_term: int
    granted: bool

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> PreVote:
        return cls(_int(b, "pre_term"), _bool(b, "granted"))


@dataclass(frozen=True)
class Vote:
    granted: bool

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Vote:
        return cls(_bool(b, "granted"))


@dataclass(frozen=True)
class Ping:
    t1: float

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Ping:
        return cls(_float(b, "t1"))


@dataclass(frozen=True)
class Pong:
    t1: float
    t2: float
    t3: float

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Pong:
        return cls(_float(b, "t1"), _float(b, "t2"), _float(b, "t3"))


@dataclass(frozen=True)
class Op:
    op: Operation

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Op:
        return cls(Operation.from_dict(b.get("op")))


@dataclass(frozen=True)
class Ack:
    index: int | None
    log_term: int | None  # on success: the term of the op at ``index`` on the acknowledging node
    ok: bool
    msg: str
    to: str | None

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Ack:
        ok = _bool(b, "ok")
        text = b.get("msg", "")
        to = b.get("to")
        if to is not None:
            check_id(to, "field 'to'")
        if ok:
            return cls(_int(b, "index"), _int(b, "log_term"), True, "", to)
        why = text if isinstance(text, str) else repr(text)
        return cls(_opt_int(b, "index"), None, False, why[:MAX_FAILURE_TEXT], to)


@dataclass(frozen=True)
class SyncRequest:
    index: int
    songs: frozenset[str]
    partial: dict[str, list[int]]

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> SyncRequest:
        held, partial = parse_held(b.get("songs"), b.get("partial"))
        return cls(_int(b, "index"), frozenset(held), partial)


@dataclass(frozen=True)
class Sync:
    state: PlayerState
    sending: frozenset[str]

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Sync:
        sending = b.get("sending", [])
        return cls(PlayerState.from_dict(b.get("state")), _songs(sending, "field 'sending'"))


@dataclass(frozen=True)
class Want:
    song: str
    giver: str | None  # the node asked; None: the master
    missing: tuple[int, ...] | None  # chunk indices; None: all

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Want:
        giver = b.get("from")
        if giver is not None:
            check_id(giver, "field 'from'")
        missing = b.get("missing")
        if missing is not None and (
            not isinstance(missing, list) or not all(is_int(i) and i >= 0 for i in missing)
        ):
            raise ProtocolError("field 'missing' must be a list of chunk indices or null")
        return cls(
            check_hash(b.get("song"), "field 'song'"),
            giver,
            None if missing is None else tuple(missing),
        )


@dataclass(frozen=True)
class Offer:
    manifest: Manifest
    name: str | None = None  # the file or URL name it was loaded under, if known
    upload: bool = False  # a client is uploading it now (its chunks come on chunk/all)

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Offer:
        upload = False if b.get("upload") is None else _bool(b, "upload")
        return cls(Manifest.from_dict(b.get("manifest")), song_name(b.get("name")), upload)


@dataclass(frozen=True)
class Finished:
    slot: int
    song: str

    @classmethod
    def parse(cls, b: Mapping[str, Any]) -> Finished:
        return cls(_int(b, "slot"), check_hash(b.get("song"), "field 'song'"))


Body = (
    Heartbeat
    | VoteRequest
    | PreVoteRequest
    | PreVote
    | Vote
    | Ping
    | Pong
    | Op
    | Ack
    | SyncRequest
    | Sync
    | Want
    | Offer
    | Finished
)

PARSERS: dict[str, Callable[[Mapping[str, Any]], Body]] = {
    "hb": Heartbeat.parse,
    "vote_req": VoteRequest.parse,
    "prevote_req": PreVoteRequest.parse,
    "prevote": PreVote.parse,
    "vote": Vote.parse,
    "ping": Ping.parse,
    "pong": Pong.parse,
    "op": Op.parse,
    "ack": Ack.parse,
    "sync_req": SyncRequest.parse,
    "sync": Sync.parse,
    "want": Want.parse,
    "offer": Offer.parse,
    "finished": Finished.parse,
}


def parse_body(msg: Message) -> Body:
    """The typed body of an internal message; ProtocolError if it does not check out, its type
    is unknown, or it disagrees with its envelope (an op of another term than its sender's)."""
    parser = PARSERS.get(msg.type)
    if parser is None:
        raise ProtocolError(f"unknown message type {msg.type[:40]!r}")
    body = parser(msg.body)
    if isinstance(body, Op) and body.op.term != msg.term:
        raise ProtocolError("an op must carry the term of the master that sends it")
    return body


@dataclass(frozen=True)
class PeerState:
    """What a node uses of another node's published state (``node/<id>/state``)."""

    songs: frozenset[str]
    rtt_p90_s: float | None  # its round trip to the master, 90th percentile

    @classmethod
    def parse(cls, payload: bytes) -> PeerState:
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ProtocolError(f"node state is not JSON: {err}") from err
        if not isinstance(doc, dict):
            raise ProtocolError("node state must be a JSON object")
        clock = doc.get("clock")
        if clock is None:
            clock = {}
        if not isinstance(clock, dict):
            raise ProtocolError("node state field 'clock' must be an object")
        rtt = clock.get("rtt_p90_s")
        if rtt is not None:
            rtt = _float(clock, "rtt_p90_s")
            if rtt < 0:
                raise ProtocolError("node state field 'clock.rtt_p90_s' must not be negative")
        return cls(_songs(doc.get("songs", []), "node state field 'songs'"), rtt)
