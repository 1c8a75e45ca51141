"""Typed message bodies: what a node takes from the cluster's topics, checked before use."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.messages import Message
from nsync_mqtt.playlist import PlayerState, playlist_hash
from nsync_mqtt.wire import (
    PARSERS,
    Ack,
    Heartbeat,
    Op,
    PeerState,
    Pong,
    Sync,
    Want,
    parse_body,
)

SONG = "ab" * 28
PLIST = playlist_hash(())
OP = {"op": "term", "index": 4, "term": 2, "prev_term": 1, "pre": PLIST, "post": PLIST}

GOOD: dict[str, dict[str, Any]] = {
    "hb": {"index": 3, "log_term": 2, "plist": PLIST, "lead": 0.08},
    "vote_req": {"last_log": [2, 3]},
    "prevote_req": {"next_term": 3, "last_log": [2, 3]},
    "prevote": {"pre_term": 3, "granted": True},
    "vote": {"granted": False},
    "ping": {"t1": 12.5},
    "pong": {"t1": 12.5, "t2": 3600.25, "t3": 3600.26},
    "op": {"op": OP},
    "ack": {"index": 4, "log_term": 2, "ok": True, "msg": "", "to": "n1"},
    "sync_req": {"index": 3, "songs": [SONG], "partial": {SONG: [0, 2]}},
    "sync": {"state": PlayerState().to_dict(), "sending": [SONG]},
    "want": {"song": SONG, "missing": [1, 2], "from": "n2"},
    "offer": {"manifest": {"song": SONG, "size": 1000, "chunk_size": 65536}},
    "finished": {"slot": 0, "song": SONG},
}

BAD: list[tuple[str, dict[str, Any]]] = [
    ("hb", {"index": "3", "log_term": 2, "plist": PLIST}),
    ("hb", {"index": 3, "log_term": True, "plist": PLIST}),
    ("hb", {"index": 3, "log_term": 2, "plist": "short"}),
    ("vote_req", {"last_log": "x"}),
    ("vote_req", {"last_log": [1, 2, 3]}),
    ("vote_req", {"last_log": [-1, 2]}),
    ("prevote_req", {"next_term": 0, "last_log": [0, 0]}),
    ("prevote", {"pre_term": 3, "granted": "yes"}),
    ("vote", {}),
    ("ping", {"t1": "now"}),
    ("ping", {"t1": float("nan")}),
    ("pong", {"t1": 1.0, "t2": float("inf"), "t3": 2.0}),
    ("pong", {"t1": 1.0, "t2": True, "t3": 2.0}),
    ("op", {"op": "x"}),
    ("op", {"op": {**OP, "op": "shuffle"}}),
    ("op", {"op": {**OP, "prev_term": 3}}),
    ("op", {"op": {**OP, "op": "volume", "volume": 101}}),
    ("ack", {"ok": "yes"}),
    ("ack", {"ok": True, "index": 4}),  # success says which term it holds
    ("ack", {"ok": True, "index": 4, "log_term": 2, "to": "Not An Id"}),
    ("sync_req", {"index": 3, "songs": "x"}),
    ("sync_req", {"index": 3, "songs": [], "partial": {SONG: ["a"]}}),
    ("sync", {"state": "x"}),
    ("sync", {"state": PlayerState().to_dict(), "sending": "all"}),
    ("want", {"song": "nope"}),
    ("want", {"song": SONG, "missing": [-1]}),
    ("offer", {"manifest": {"song": SONG, "size": 0, "chunk_size": 65536}}),
    ("finished", {"slot": -1, "song": SONG}),
    ("no such type", {}),
]


def msg(type_: str, body: dict[str, Any], term: int = 2) -> Message:
    return Message(type_, "n1", term, body)


@pytest.mark.parametrize("type_", sorted(GOOD))
def test_good_bodies_parse(type_: str) -> None:
    body = parse_body(msg(type_, json.loads(json.dumps(GOOD[type_]))))
    assert isinstance(body, PARSERS[type_].__self__)


def test_every_message_type_has_a_good_example() -> None:
    assert set(GOOD) == set(PARSERS)


@pytest.mark.parametrize(("type_", "body"), BAD)
def test_bad_bodies_are_one_protocol_error(type_: str, body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_body(msg(type_, body))


def test_parsed_fields_have_their_types() -> None:
    hb = parse_body(msg("hb", GOOD["hb"]))
    assert hb == Heartbeat(3, 2, PLIST)
    pong = parse_body(msg("pong", {"t1": 1, "t2": 2, "t3": 3}))
    assert pong == Pong(1.0, 2.0, 3.0) and isinstance(pong, Pong) and type(pong.t1) is float
    want = parse_body(msg("want", {"song": SONG}))
    assert want == Want(SONG, None, None)
    nack = parse_body(msg("ack", {"ok": False, "msg": {"not": "text"}, "index": None}))
    assert nack == Ack(None, None, False, "{'not': 'text'}", None)
    sync = parse_body(msg("sync", GOOD["sync"]))
    assert isinstance(sync, Sync) and sync.sending == frozenset({SONG})


def test_an_op_must_carry_its_senders_term() -> None:
    assert isinstance(parse_body(msg("op", {"op": OP}, term=2)), Op)
    with pytest.raises(ProtocolError, match="term"):
        parse_body(msg("op", {"op": OP}, term=10**9))


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1]",
        b'{"clock": "x"}',
        b'{"clock": {"rtt_p90_s": "slow"}}',
        b'{"clock": {"rtt_p90_s": -0.5}}',
        b'{"clock": {"rtt_p90_s": NaN}}',
        b'{"songs": 5}',
        b'{"songs": ["nope"]}',
        b"[" * 100_000,
    ],
)
def test_a_bad_peer_state_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        PeerState.parse(payload)


def test_a_peer_state_keeps_what_the_master_uses() -> None:
    doc = {"role": "follower", "clock": {"rtt_p90_s": 0.004, "other": "x"}, "songs": [SONG]}
    assert PeerState.parse(json.dumps(doc).encode()) == PeerState(frozenset({SONG}), 0.004)
    assert PeerState.parse(b"{}") == PeerState(frozenset(), None)
