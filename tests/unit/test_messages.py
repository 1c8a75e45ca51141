"""Internal message envelope, binary chunk frame and topic names."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.messages import (
    CHUNK_MAGIC,
    ENVELOPE_VERSION,
    Message,
    Topics,
    check_hash,
    check_id,
    decode,
    decode_chunk,
    encode,
    encode_chunk,
    song_name,
)

SONG = hashlib.sha224(b"song").hexdigest()

# --- envelope ---------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    payload = encode("op", "node-1", 7, index=3, op={"op": "volume", "volume": 40}, ok=True)
    msg = decode(payload)
    assert msg == Message(
        "op", "node-1", 7, {"index": 3, "op": {"op": "volume", "volume": 40}, "ok": True}
    )
    assert msg.get("index") == 3
    assert msg.get("absent") is None
    assert msg.get("absent", 5) == 5


def test_encode_writes_the_documented_envelope() -> None:
    obj = json.loads(encode("ping", "a", 0, t1=1.5))
    assert obj == {"v": ENVELOPE_VERSION, "t": "ping", "src": "a", "term": 0, "t1": 1.5}
    assert b" " not in encode("ping", "a", 0, t1=1.5)  # compact


def test_decode_round_trips_floats_exactly() -> None:
    t = 1234.567891234567
    assert decode(encode("ping", "a", 1, t1=t)).get("t1") == t


def test_decode_of_an_envelope_without_body() -> None:
    assert decode(b'{"v":1,"t":"hb","src":"n_2","term":0}') == Message("hb", "n_2", 0, {})


def test_decode_of_non_ascii_text() -> None:
    msg = decode(encode("note", "a", 1, title="Für Elise ♫"))
    assert msg.get("title") == "Für Elise ♫"


def envelope(**changes: Any) -> bytes:
    obj: dict[str, Any] = {"v": 1, "t": "hb", "src": "a", "term": 3}
    for k, v in changes.items():
        if v is ...:
            obj.pop(k)
        else:
            obj[k] = v
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'"text"',
        b"42",
        b"null",
        envelope(v=...),
        envelope(v=2),
        envelope(v="1"),
        envelope(t=...),
        envelope(t=5),
        envelope(t=None),
        envelope(src=...),
        envelope(src="Node A"),
        envelope(src=""),
        envelope(src="x" * 65),
        envelope(src=7),
        envelope(term=...),
        envelope(term=-1),
        envelope(term=True),
        envelope(term=False),
        envelope(term=1.0),
        envelope(term="3"),
        envelope(term=None),
    ],
)
def test_bad_envelope_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


def test_decode_does_not_leak_envelope_fields_into_the_body() -> None:
    msg = decode(envelope(extra=1))
    assert msg.body == {"extra": 1}


# --- ids and hashes ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "node-1", "n_2", "x" * 64, "0"])
def test_check_id_accepts_valid_ids(value: str) -> None:
    assert check_id(value) == value


@pytest.mark.parametrize("value", ["", "A", "a b", "a/b", "a+", "é", "x" * 65, None, 1, "\na"])
def test_check_id_refuses_bad_ids(value: Any) -> None:
    with pytest.raises(ProtocolError, match="peer"):
        check_id(value, "peer")


def test_check_hash() -> None:
    assert check_hash(SONG) == SONG
    for bad in (SONG.upper(), SONG[:-1], SONG + "0", "g" * 56, None, 5):
        with pytest.raises(ProtocolError, match="song hash"):
            check_hash(bad)


# --- chunk frame ------------------------------------------------------------------------------


def test_chunk_round_trip() -> None:
    header = {"song": SONG, "seq": 3, "of": 10}
    data = bytes(range(256)) * 4
    frame = encode_chunk(header, data)
    assert frame.startswith(CHUNK_MAGIC)
    got_header, got_data = decode_chunk(frame)
    assert got_header == header
    assert isinstance(got_data, memoryview)
    assert bytes(got_data) == data


def test_chunk_layout_is_magic_length_header_data() -> None:
    frame = encode_chunk({"a": 1}, b"xyz")
    head = b'{"a":1}'
    assert frame == b"NSC1" + struct.pack(">I", len(head)) + head + b"xyz"


def test_chunk_with_empty_data() -> None:
    header, data = decode_chunk(encode_chunk({"seq": 0}, b""))
    assert header == {"seq": 0}
    assert bytes(data) == b""


def test_chunk_data_may_contain_the_magic_and_json() -> None:
    data = b"NSC1\x00\x00\x00\x02{}" * 3
    assert bytes(decode_chunk(encode_chunk({"k": "v"}, data))[1]) == data


def test_truncated_chunk_frame_is_a_protocol_error() -> None:
    frame = encode_chunk({"song": SONG, "seq": 1}, b"data")
    head_end = len(frame) - len(b"data")
    for cut in (0, 3, 4, 7, 8, head_end - 1):
        with pytest.raises(ProtocolError):
            decode_chunk(frame[:cut])
    # Losing only data bytes cannot be seen by the frame itself (the header says how many).
    header, data = decode_chunk(frame[:head_end])
    assert header["seq"] == 1
    assert bytes(data) == b""


@pytest.mark.parametrize(
    "frame",
    [
        b"NSC2" + struct.pack(">I", 2) + b"{}",
        b"nsc1" + struct.pack(">I", 2) + b"{}",
        b"NSC1" + struct.pack(">I", 3) + b"{x}",
        b"NSC1" + struct.pack(">I", 2) + b"[]",
        b"NSC1" + struct.pack(">I", 4) + b"\xff\xff\xff\xff",
        b"NSC1" + struct.pack(">I", 0xFFFFFFFF) + b"{}",
        b'{"v":1,"t":"hb","src":"a","term":0}',
    ],
)
def test_bad_chunk_frame_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_chunk(frame)


# --- topics -----------------------------------------------------------------------------------


def test_topics_builders() -> None:
    t = Topics("home")
    assert t.base == "nsync/home"
    assert t.cmd_all == "nsync/home/cmd/+"
    assert t.upload == "nsync/home/upload"
    assert t.state == "nsync/home/state"
    assert t.status == "nsync/home/status"
    assert t.library == "nsync/home/library"
    assert t.cmd("play") == "nsync/home/cmd/play"
    assert t.reply("cli-42") == "nsync/home/reply/cli-42"
    assert t.state_field("volume") == "nsync/home/state/volume"
    assert t.node_status("a") == "nsync/home/node/a/status"
    assert t.node_state("a") == "nsync/home/node/a/state"
    assert t.internal("op") == "nsync/home/internal/op"


def test_topics_use_the_cluster_name() -> None:
    t = Topics("flat_2")
    assert t.cluster == "flat_2"
    assert t.cmd("stop") == "nsync/flat_2/cmd/stop"
    assert t.node_state("b") == "nsync/flat_2/node/b/state"


@pytest.mark.parametrize("cluster", ["", "Home", "a/b", "+", "#", "my house"])
def test_topics_refuse_a_bad_cluster_name(cluster: str) -> None:
    with pytest.raises(ProtocolError, match="cluster"):
        Topics(cluster)


@pytest.mark.parametrize("verb", ["play", "pause", "next", "volume", "enqueue"])
def test_verb_of_a_command_topic(verb: str) -> None:
    t = Topics("home")
    assert t.verb_of(t.cmd(verb)) == verb


@pytest.mark.parametrize(
    "topic",
    [
        "nsync/home/state",
        "nsync/home/reply/play",
        "nsync/other/cmd/play",
        "nsync/homely/cmd/play",
        "nsync/home/cmd",
        "home/cmd/play",
        "",
    ],
)
def test_verb_of_another_topic_is_none(topic: str) -> None:
    assert Topics("home").verb_of(topic) is None


# --- regressions: defects found and fixed --------------------------------------------------------

TRAILING_NEWLINE = (
    "messages.py: ID_RE/HASH_RE end in '$', which also matches before a trailing newline; "
    "use re.fullmatch or '\\Z'"
)


def test_check_id_refuses_a_trailing_newline() -> None:
    with pytest.raises(ProtocolError):
        check_id("a\n")


def test_check_hash_refuses_a_trailing_newline() -> None:
    with pytest.raises(ProtocolError):
        check_hash(SONG + "\n")


def test_envelope_src_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode(envelope(src="a\n"))


@pytest.mark.parametrize(
    ("given", "title"),
    [
        ("Morning Birds.mp3", "Morning Birds"),
        ("/music/a/Track 01.flac", "Track 01"),
        ("C:\\Music\\Song.wav", "Song"),
        ("tts_0a1b2c", "tts_0a1b2c"),
        ("bad\x00name\n.ogg", "badname"),
        ("x" * 500 + ".mp3", "x" * 200),
        ("", None),
        ("   ", None),
        (42, None),
        (None, None),
    ],
)
def test_song_name_gives_a_printable_title_or_none(given: object, title: str | None) -> None:
    assert song_name(given) == title
