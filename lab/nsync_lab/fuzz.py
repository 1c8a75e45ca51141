"""Property-based fuzzing of every topic a node subscribes to (hypothesis strategies and drivers).

What is thrown at a cluster (:func:`junk`): raw bytes; JSON of the wrong shape and type; huge,
negative, non-finite and over-long numbers (``1e999``, 5,000-digit integers); nesting near and
past the JSON parser's recursion limit; unicode (lone surrogates, bidi controls, emoji);
path-like names (``../../etc/passwd``); well-formed internal messages of every type of
``nsync_mqtt.wire`` with mutated fields and envelopes (a huge term under the master's id
included); replays, duplicates, reorderings, bit flips and re-topicings of real messages
captured from the cluster; messages sealed with a wrong key, by a sender outside the peer list
or with a broken seal line; and on command topics unknown verbs, commands with bad arguments
and malformed requests, each carrying a ``reply_to`` of its own.

Every input is junk by construction: it must change nothing. On an unsigned cluster a forged
message that the nodes' own checks would take (a well-formed message under a peer's id) is not
junk but a takeover, which only the key prevents (docs/security.md): such inputs are left out
there (counted as ``skipped``), and run against signed clusters only.

Two drivers check the same properties:

- :class:`SimFuzzer`: a 3-node cluster of the deterministic simulator (``nsync_lab.sim``),
  warmed up (a master, three songs enqueued, a volume set, nothing playing), then only junk:
  no exception escapes a node and no handler fails with anything but NSync's own errors; the
  simulator's invariants hold; no master or term changes; every node's playlist, playback,
  volume and log position and its state file stay as they were; every command with a
  ``reply_to`` gets ``success: false`` with a message. Checked after every input (the disk
  after every batch). The simulator's nodes do not subscribe to chunks and uploads (songs are
  not simulated), so those topics are fuzzed against live nodes only.
- :class:`LiveFuzzer`: the same inputs through a real broker into real ``nsync node``
  processes (see tests/integration/test_fuzz_live.py and bench/bench_fuzz.py), adding the
  chunk, upload and Home Assistant status topics.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from nsync_mqtt.errors import NSyncError
from nsync_mqtt.limits import PAYLOAD_LIMITS
from nsync_mqtt.master import VERBS
from nsync_mqtt.messages import decode, encode_chunk
from nsync_mqtt.playlist import CommandError, parse_volume
from nsync_mqtt.seal import Boot, Sealer
from nsync_mqtt.wire import PeerState, parse_body

# ---------------------------------------------------------------------------- the inputs

REPLY_SLOT = "@reply@"  # replaced by a reply_to id of its own for every input
EMPTY_PLIST = "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f"
WRONG_KEY = bytes(range(100, 132))

PATHS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "~root/.ssh/id_rsa",
    "a/../../b",
    "..\\..\\windows\\system32",
    "%2e%2e%2fetc%2fpasswd",
    "song.mp3/../../../x",
    "/dev/zero",
    "nsync/+/#",
    "\x00",
    "",
]
UNICODE = [
    "é漢字",
    "\u202eevil",  # right-to-left override
    "\ufeffbom",
    "\U0001f3b5",
    "\ud800",  # a lone surrogate: legal in JSON text, not encodable as UTF-8
    "\udfff\ud800",
    "a\u0000b",
    "\u0085\u2028\u2029",
    "Ω" * 300,
]
HUGE = [
    2**63,
    -(2**63) - 1,
    2**64,
    10**30,
    -(10**30),
    10**300,
    -1,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.5,
    math.inf,
    -math.inf,
    math.nan,
]
# JSON number texts a plain serialiser cannot write
NUMBER_TOKENS = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "1" + "0" * 5000,  # past Python's 4,300-digit limit on int parsing
    "-" + "9" * 4400,
    "1e-999",
    "123456789012345678901234567890.5e300",
]
LONG = ["x" * 100_000, "é" * 20_000, "0" * 4400]
DEPTHS = [2, 50, 500, 900, 950, 980, 990, 1000, 1100, 5000, 100_000]


@dataclass(frozen=True)
class Raw:
    """A JSON text written as is (a number token, a long literal)."""

    text: str


@dataclass(frozen=True)
class Deep:
    """A value nested ``depth`` levels deep, written without recursion."""

    depth: int
    kind: str  # "list" or "dict"

    def text(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + "]" * self.depth
        return '{"a":' * self.depth + "1" + "}" * self.depth


def dumps(value: Any) -> str:
    """JSON text of ``value``, with :class:`Raw` and :class:`Deep` parts written verbatim and
    NaN / infinities as the ``NaN`` / ``Infinity`` tokens Python's parser accepts."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Deep):
        return value.text()
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def to_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate stays what it is


@dataclass(frozen=True)
class Junk:
    """One input: ``topic`` relative to ``nsync/<cluster>/`` (or absolute if it starts with
    ``/``: the Home Assistant status topic), the payload, the retain flag, what kind of junk it
    is, and whether a reply on ``reply/<id>`` must come back (``success`` false)."""

    topic: str
    payload: bytes
    kind: str
    retain: bool = False
    expect_reply: bool = False
    follow: tuple[Junk, ...] = ()  # sent right after it (a duplicate, the rest of a reordering)

    def describe(self) -> str:
        shown = self.payload[:300]
        more = f" (+{len(self.payload) - 300} bytes)" if len(self.payload) > 300 else ""
        return f"[{self.kind}] {self.topic} retain={self.retain} {shown!r}{more}"


@dataclass
class Context:
    """What the strategies need to know of the cluster under fuzz."""

    peers: list[str]
    master: str
    term: int
    songs: list[str]  # the songs in the playlist
    playlist_len: int
    signed: bool
    cluster: str
    library: list[str] = field(default_factory=list)  # every song the nodes hold
    captured: list[tuple[str, bytes]] = field(default_factory=list)  # (relative topic, payload)
    live: bool = False  # chunk, upload and Home Assistant topics too


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(PATHS + UNICODE),
    st.sampled_from([Raw(t) for t in NUMBER_TOKENS]),
    st.integers(0, len(LONG) - 1).map(lambda i: Raw(json.dumps(LONG[i]))),
    st.builds(Deep, st.sampled_from(DEPTHS), st.sampled_from(["list", "dict"])),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
raw_payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"\x00\xff\xfe",
            b"not json",
            b"[]",
            b"null",
            b"{}",
            b"NaN",
            b'"a string"',
            b"NSS1 ",
            b"NSS1 n1 1-00000000 0 " + b"0" * 32 + b"\n{}",
            b"NSC1",
            b"NSC1\xff\xff\xff\xff{}",
            b"\xef\xbb\xbf{}",  # a byte order mark
            b"{" * 3000,
            b"\xed\xa0\x80",  # a UTF-8-encoded surrogate
        ]
    ),
    st.builds(lambda v: to_bytes(dumps(v)), values),
    st.builds(lambda t: t.encode(), st.sampled_from(NUMBER_TOKENS)),
    st.builds(
        lambda d: to_bytes(d.text()), st.builds(Deep, st.sampled_from(DEPTHS), st.just("list"))
    ),
)

# the broadcast internal topics (the other types travel on to/<node>)
BROADCAST = ["hb", "vote_req", "prevote_req", "op", "offer", "want"]


def templates(ctx: Context) -> dict[str, dict[str, Any]]:
    """A body of each internal message type that would pass the checks."""
    song = ctx.songs[0] if ctx.songs else "ab" * 28
    pb = {"state": "idle", "slot": 0, "song": None, "frame": 0, "at": None}
    state = {"playlist": [], "playback": pb, "volume": 50, "index": 1, "term": 1}
    op = {
        "op": "volume",
        "index": 7,
        "term": ctx.term,
        "prev_term": ctx.term,
        "pre": EMPTY_PLIST,
        "post": EMPTY_PLIST,
        "volume": 3,
    }
    manifest = {"song": song, "size": 1000, "chunk_size": 262144}
    return {
        "hb": {"index": 3, "log_term": 1, "plist": EMPTY_PLIST, "lead": 0.1},
        "vote_req": {"last_log": [ctx.term, 99]},
        "prevote_req": {"next_term": ctx.term + 1, "last_log": [ctx.term, 99]},
        "prevote": {"pre_term": ctx.term + 1, "granted": True},
        "vote": {"granted": True},
        "ping": {"t1": 1.0},
        "pong": {"t1": 1.0, "t2": 2.0, "t3": 2.5},
        "op": {"op": op},
        "ack": {"index": 7, "log_term": ctx.term, "ok": True, "msg": "", "to": ctx.master},
        "sync_req": {"index": 0, "songs": [song], "partial": {}},
        "sync": {"state": state, "manifests": {}, "sending": []},
        "finished": {"slot": 0, "song": song},
        "offer": {"manifest": manifest, "name": "../../etc/passwd", "upload": True},
        "want": {"song": song, "missing": None, "from": ctx.master},
    }


def topic_of(type_: str, ctx: Context, draw: Callable[[Any], Any]) -> str:
    if type_ in BROADCAST:
        return f"internal/{type_}"
    return f"internal/to/{draw(st.sampled_from(ctx.peers))}"


@st.composite
def mutated_message(draw: Callable[[Any], Any], ctx: Context) -> tuple[str, dict[str, Any]]:
    """(topic, envelope) of an internal message of some type with some fields mutated."""
    tmpl = templates(ctx)
    type_ = draw(st.sampled_from(sorted(tmpl)))
    src = draw(st.sampled_from([*ctx.peers, ctx.master, ctx.master]))
    term = draw(st.sampled_from([ctx.term, ctx.term + 1, 10**9, 2**63, 0]))
    env: dict[str, Any] = {"v": 1, "t": type_, "src": src, "term": term, **tmpl[type_]}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*env, "sig", "x", "body", "__proto__"]))
        how = draw(st.sampled_from(["junk", "junk", "delete", "deep"]))
        if how == "delete":
            env.pop(key, None)
        elif how == "deep":
            env[key] = draw(
                st.builds(Deep, st.sampled_from(DEPTHS), st.sampled_from(["list", "dict"]))
            )
        else:
            env[key] = draw(values)
    if type_ == "op" and isinstance(env.get("op"), dict) and draw(st.booleans()):
        op = dict(env["op"])  # mutate inside the operation
        key = draw(st.sampled_from([*op, "playback", "edit", "song", "resume"]))
        op[key] = draw(values)
        env["op"] = op
    if draw(st.integers(0, 9)) == 0:
        env["t"] = draw(st.sampled_from(["no_such_type", "", "HB", "hb\x00", *UNICODE, *PATHS]))
    return topic_of(type_, ctx, draw), env


def accepted_unsigned(payload: bytes, peers: Sequence[str]) -> bool:
    """Whether an unsigned cluster's nodes would take ``payload`` as a real peer's message (a
    forgery only a key stops); anything that fails the checks, even by crashing, is junk."""
    try:
        msg = decode(payload)
        if msg.src not in peers:
            return False
        parse_body(msg)
    except Exception:
        return False
    return True


def sealed_wrongly(payload: bytes, topic: str, ctx: Context, how: str, sender: str) -> bytes:
    if how == "wrong key":  # a higher boot counter too: it must not reset anyone's window
        return Sealer(WRONG_KEY, ctx.cluster, sender, Boot(2**40, "deadbeef")).seal(topic, payload)
    if how == "not a peer":
        return Sealer(WRONG_KEY, ctx.cluster, "intruder", Boot(1, "00000000")).seal(topic, payload)
    if how == "other cluster":  # sealed by a node of another cluster, with that one's key
        return Sealer(WRONG_KEY, "other", sender, Boot(1, "00000000")).seal(topic, payload)
    if how == "broken line":
        return b"NSS1 " + sender.encode() + b" 1-zz 0 " + b"f" * 31 + b"\n" + payload
    return payload  # unsigned


@st.composite
def internal_junk(draw: Callable[[Any], Any], ctx: Context) -> Junk:
    """Junk on the internal topics: raw bytes, mutated or forged messages."""
    what = draw(st.sampled_from(["raw", "mutated", "mutated", "forged"]))
    if what == "raw":
        name = draw(st.sampled_from([*BROADCAST, *(f"to/{p}" for p in ctx.peers), "to/nobody"]))
        return Junk(f"internal/{name}", draw(raw_payloads), "internal raw")
    topic, env = draw(mutated_message(ctx))
    if what == "forged":  # well formed, from the master, far in the future
        topic = "internal/hb"
        env = {"v": 1, "t": "hb", "src": ctx.master, "term": ctx.term + 1000}
        env.update(templates(ctx)["hb"])
    payload = to_bytes(dumps(env))
    hows = ["unsigned", "wrong key", "not a peer", "other cluster", "broken line"]
    how = draw(st.sampled_from(hows)) if ctx.signed else "unsigned"
    full = f"nsync/{ctx.cluster}/{topic}"
    sender = (
        env["src"] if isinstance(env.get("src"), str) and env["src"] in ctx.peers else ctx.master
    )
    payload = sealed_wrongly(payload, full, ctx, how, sender)
    return Junk(topic, payload, f"internal {what} {how}")


@st.composite
def replayed(draw: Callable[[Any], Any], ctx: Context) -> Junk:
    """Real messages captured from the cluster: replayed, duplicated, reordered, bit-flipped,
    truncated, moved to another topic."""
    if not ctx.captured:
        return draw(internal_junk(ctx))
    how = draw(st.sampled_from(["replay", "duplicate", "reorder", "flip", "truncate", "topic"]))
    picks = draw(st.lists(st.sampled_from(ctx.captured), min_size=1, max_size=5))
    topic, payload = picks[0]
    if how == "replay":
        return Junk(topic, payload, "replay")
    if how == "duplicate":
        return Junk(topic, payload, "replay duplicate", follow=(Junk(topic, payload, "replay"),))
    if how == "reorder":
        order = draw(st.permutations(picks))
        rest = tuple(Junk(t, p, "replay") for t, p in order[1:])
        return Junk(order[0][0], order[0][1], "replay reordered", follow=rest)
    if how == "flip" and payload:
        at = draw(st.integers(0, len(payload) - 1))
        bit = 1 << draw(st.integers(0, 7))
        return Junk(
            topic, payload[:at] + bytes([payload[at] ^ bit]) + payload[at + 1 :], "replay flip"
        )
    if how == "truncate" and payload:
        cut = draw(st.integers(0, len(payload) - 1))
        return Junk(topic, payload[:cut], "replay truncated")
    other = draw(st.sampled_from([*BROADCAST, *(f"to/{p}" for p in ctx.peers)]))
    return Junk(f"internal/{other}", payload, "replay other topic")


# ---------------------------------------------------------------------------- commands

ARG_KEYS = ("arg", "value", "song", "title", "volume", "seconds", "position", "index")
not_number_text = st.text(max_size=12).filter(lambda s: not _is_number(s))
wrong_types = st.one_of(
    st.none(),
    st.booleans(),
    st.lists(values, max_size=3),
    st.dictionaries(st.text(max_size=5), values, max_size=3),
    st.builds(Deep, st.sampled_from(DEPTHS), st.sampled_from(["list", "dict"])),
)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bad_volume(v: Any) -> bool:
    """Not a volume the master would take, whatever the volume now (never 0-100 or +/-N)."""
    if isinstance(v, (Raw, Deep)):
        return True
    try:
        parse_volume(v, 0)
        parse_volume(v, 100)
    except (CommandError, ValueError, TypeError, OverflowError):
        return True
    return False


def bad_args(verb: str, ctx: Context) -> Any:
    """A strategy of arguments ``verb`` must refuse on the fuzzed cluster."""
    if verb == "volume":
        return st.one_of(
            st.integers(101, 10**30),
            st.integers(max_value=-1),  # a number is a level, never relative ("-5" is)
            st.floats(max_value=-0.5),
            st.floats(0.001, 99.999).filter(lambda f: not f.is_integer()),
            st.sampled_from([math.nan, math.inf, -math.inf, 1e308, Raw("1e999"), "1e999", "101"]),
            not_number_text,
            wrong_types,
            st.sampled_from(PATHS + UNICODE),
        ).filter(_bad_volume)
    if verb == "seek":
        return st.one_of(
            st.floats(max_value=-1e-9, allow_infinity=True),
            st.integers(max_value=-1),
            st.floats(1e6, 1e308),  # past the end of any song (and past what a frame holds)
            st.sampled_from([math.nan, math.inf, 1e308, Raw("1e999"), Raw("1e400"), "inf", "nan"]),
            not_number_text,
            wrong_types,
        )
    if verb in ("enqueue", "replace", "announce"):
        return st.one_of(
            st.sampled_from(PATHS + UNICODE + [s.upper() for s in ctx.songs[:1]]),
            st.text(max_size=40),
            st.text("0123456789abcdef", min_size=56, max_size=56),  # a hash nobody loaded
            wrong_types,
            st.integers(0, len(LONG) - 1).map(lambda i: Raw(json.dumps(LONG[i]))),
        ).filter(lambda s: s not in ctx.library and s not in ctx.songs)
    n = ctx.playlist_len
    position = st.one_of(
        st.integers(min_value=n),
        st.integers(max_value=-1),
        st.sampled_from(HUGE),
        st.floats(0.1, n - 0.1 if n > 1 else 0.9).filter(lambda f: not f.is_integer()),
        not_number_text.filter(lambda s: not s.strip().lstrip("-").isdigit()),
        wrong_types,
    )
    if verb == "remove":
        return position
    if verb == "move":
        good = st.integers(0, max(0, n - 1))
        return st.one_of(st.tuples(position, good), st.tuples(good, position))
    raise ValueError(verb)


@st.composite
def load_manifest(draw: Callable[[Any], Any], ctx: Context) -> dict[str, Any]:
    manifest: dict[str, Any] = {"song": "cd" * 28, "size": 1000, "chunk_size": 262144}
    key = draw(st.sampled_from(["song", "size", "chunk_size", "bg", "missing"]))
    if key == "song":
        manifest["song"] = draw(
            st.one_of(st.sampled_from(PATHS + UNICODE), wrong_types, st.integers())
        )
    elif key == "size":
        manifest["size"] = draw(
            st.one_of(
                st.integers(max_value=0), st.integers(10**10), st.sampled_from(HUGE), wrong_types
            )
        )
    elif key == "chunk_size":
        manifest["chunk_size"] = draw(
            st.one_of(
                st.integers(max_value=1023),
                st.integers(2**23 + 1),
                st.sampled_from(HUGE),
                wrong_types,
            )
        )
    elif key == "bg":
        manifest["bg"] = draw(
            st.one_of(
                st.integers(),
                st.text(max_size=5),
                wrong_types.filter(lambda v: not isinstance(v, bool)),
            )
        )
    else:
        manifest.pop(draw(st.sampled_from(["song", "size"])))  # chunk_size has a default
    return manifest


@st.composite
def command_junk(draw: Callable[[Any], Any], ctx: Context) -> Junk:
    """Junk on ``cmd/<verb>``: unknown verbs, bad arguments, malformed requests. Those that
    carry a valid ``reply_to`` must be answered ``success: false``."""
    what = draw(
        st.sampled_from(["unknown verb", "bad argument", "bad argument", "bad request", "raw"])
    )
    extra = draw(
        st.dictionaries(
            st.sampled_from(["x", "note", "../../etc", "é", "client"]), values, max_size=2
        )
    )
    if what == "unknown verb":
        verb = draw(
            st.one_of(
                st.text(min_size=1, max_size=30).filter(
                    lambda v: not any(c in v for c in "/+#\x00") and v not in VERBS
                ),
                st.sampled_from(
                    ["..", "PLAY", "play ", "volume\t", "enqueue.next", "status2", "é"]
                ),
            )
        )
        body: dict[str, Any] = {
            **extra,
            "reply_to": REPLY_SLOT,
            "client_req_id": draw(st.one_of(st.integers(), st.text(max_size=8))),
        }
        return _command(verb, body, what)
    if what == "bad argument":
        verb = draw(
            st.sampled_from(
                ["volume", "seek", "enqueue", "replace", "announce", "remove", "move", "load"]
            )
        )
        body = {**extra, "reply_to": REPLY_SLOT}
        for k in ARG_KEYS:
            body.pop(k, None)
        if verb == "load":
            body.update(draw(load_manifest(ctx)))
            for k in ARG_KEYS:  # the manifest's song is the arg; nothing else may come first
                if k not in ("song",):
                    body.pop(k, None)
        elif verb == "move":
            a, b = draw(bad_args("move", ctx))
            if draw(st.booleans()):
                body["from"], body["to"] = a, b
            else:
                body["arg"] = f"{dumps(a)} {dumps(b)}"
                if not _bad_move_text(body["arg"], ctx.playlist_len):
                    body["arg"] = "x y"
        else:
            key = {"volume": "volume", "seek": "seconds", "remove": "index"}.get(verb, "song")
            body[draw(st.sampled_from([key, "arg"]))] = draw(bad_args(verb, ctx))
            if verb == "enqueue" and draw(st.booleans()):
                body[draw(st.sampled_from(["next", "play"]))] = draw(values)
        if draw(st.booleans()):
            body["client_req_id"] = draw(st.one_of(st.integers(), st.text(max_size=8)))
        return _command(verb, body, f"{what} {verb}")
    verb = draw(st.sampled_from(sorted(VERBS)))
    if what == "bad request":  # the request itself is broken: still answered if reply_to is fine
        broken = draw(st.sampled_from(["client_req_id", "client_req_id", "reply_to", "json"]))
        if broken == "client_req_id":
            req_id = draw(
                st.one_of(
                    st.booleans(),
                    st.floats(),
                    wrong_types.filter(lambda v: v is not None and not isinstance(v, bool)),
                    st.just(True),
                )
            )
            body = {**extra, "reply_to": REPLY_SLOT, "client_req_id": req_id}
            return _command(verb, body, "bad client_req_id")
        if broken == "reply_to":
            rt = draw(
                st.sampled_from([*PATHS[:-1], *UNICODE, "UPPER", "a" * 65, "x/y", "+", "#"])
                | wrong_types.filter(lambda v: v is not None)
            )
            return Junk(f"cmd/{verb}", to_bytes(dumps({**extra, "reply_to": rt})), "bad reply_to")
        text = draw(
            st.sampled_from(
                ['{"reply_to": "' + REPLY_SLOT + '", ', "{", "{]", '{"a": 1}}', "{" * 5000]
            )
        )
        return Junk(f"cmd/{verb}", to_bytes(text), "malformed json")
    # raw bytes: on verbs that take an argument, only what none of them would take
    verb = draw(st.sampled_from(["volume", "seek", "remove", "move", "enqueue", "nosuchverb"]))
    payload = draw(
        st.one_of(
            st.binary(max_size=40).map(lambda b: b"\xff" + b),
            st.sampled_from([b"\xed\xa0\x80", b"\xc0\xaf", b"{\xff}"]),
        )
    )
    return Junk(f"cmd/{verb}", payload, "raw command")


def nesting(value: Any) -> int:
    """How deep ``value`` nests (its :class:`Deep` parts included)."""
    if isinstance(value, Deep):
        return value.depth
    if isinstance(value, dict):
        return 1 + max((nesting(v) for v in value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max((nesting(v) for v in value), default=0)
    return 0


# the largest command a node reads; a bigger one is dropped unread, unanswered
COMMAND_MAX = PAYLOAD_LIMITS["command"]

# a request nested deeper than this may be past what the node's JSON parser takes (its limit
# depends on the stack depth it runs at): then nobody can tell whom to answer
REPLY_NESTING = 400


def _command(verb: str, body: dict[str, Any], kind: str) -> Junk:
    """A JSON command; a reply is due if the master can read whom to answer."""
    payload = to_bytes(dumps(body))
    try:  # a 5,000-digit number or nesting past the parser's limit: nobody to answer
        json.loads(payload)
        readable = nesting(body) < REPLY_NESTING and len(payload) <= COMMAND_MAX
    except (ValueError, RecursionError):
        readable = False
    return Junk(f"cmd/{verb}", payload, kind, expect_reply=readable)


def _bad_move_text(text: str, n: int) -> bool:
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        return True
    try:
        return not all(0 <= int(p) < n for p in parts)
    except ValueError:  # not integers ("²" is a digit int() refuses)
        return True


# ---------------------------------------------------------------------------- the rest


@st.composite
def node_state_junk(draw: Callable[[Any], Any], ctx: Context) -> Junk:
    node = draw(st.sampled_from([*ctx.peers, "nobody", "..", "%2e"]))
    payload = draw(
        st.one_of(
            raw_payloads,
            st.builds(
                lambda d: to_bytes(dumps(d)),
                st.fixed_dictionaries(
                    {"songs": st.one_of(values, st.lists(st.sampled_from(PATHS)))},
                    optional={
                        "clock": st.one_of(values, st.fixed_dictionaries({"rtt_p90_s": values}))
                    },
                ),
            ),
        ).filter(_bad_node_state)
    )
    return Junk(f"node/{node}/state", payload, "node state", retain=draw(st.booleans()))


def _frame(header: Any, data: bytes) -> bytes:
    head = to_bytes(dumps(header))
    return b"NSC1" + len(head).to_bytes(4, "big") + head + data


def _bad_node_state(payload: bytes) -> bool:
    try:
        PeerState.parse(payload)
    except Exception:
        return True
    return not payload  # an empty payload clears: not junk


@st.composite
def chunk_junk(draw: Callable[[Any], Any], ctx: Context) -> Junk:
    name = draw(st.sampled_from(["chunk/all", *(f"chunk/{p}" for p in ctx.peers)]))
    header = draw(
        st.one_of(
            st.fixed_dictionaries(
                {
                    "song": st.one_of(st.sampled_from(ctx.songs or ["ab" * 28]), values),
                    "size": values,
                    "chunk_size": values,
                    "index": values,
                }
            ),
            st.just({"song": "ef" * 28, "size": 1024, "chunk_size": 1024, "index": 0}),
            values,
        )
    )
    data = draw(st.binary(max_size=64))
    payload = draw(
        st.one_of(
            st.just(encode_chunk({"song": "ef" * 28, "size": 1024, "chunk_size": 1024}, data)),
            st.just(_frame(header, data)),
            raw_payloads,
        )
    )
    if ctx.signed and name != "chunk/all" and draw(st.booleans()):
        full = f"nsync/{ctx.cluster}/internal/{name}"
        payload = sealed_wrongly(
            payload, full, ctx, draw(st.sampled_from(["wrong key", "not a peer"])), ctx.master
        )
    return Junk(f"internal/{name}", payload, "chunk")


@st.composite
def live_only_junk(draw: Callable[[Any], Any], ctx: Context) -> Junk:
    what = draw(st.sampled_from(["chunk", "chunk", "chunk", "chunk", "chunk", "ha", "upload"]))
    if what == "chunk":
        return draw(chunk_junk(ctx))
    if what == "ha":
        payload = draw(
            st.one_of(raw_payloads, st.sampled_from([b"offline", b"ONLINE", b"online\x00"]))
        )
        return Junk("/homeassistant/status", payload, "ha status")
    # a whole "song" of junk on upload: stored, refused by the decoder, removed
    payload = draw(
        st.one_of(
            st.binary(min_size=1, max_size=256),
            st.sampled_from([b"RIFF", b"ID3", b"fLaC\x00", b"OggS"]),
        )
    )
    return Junk("upload", payload, "upload")


def junk(ctx: Context) -> Any:
    """The strategy of one input, over every topic the fuzzed nodes subscribe to."""
    parts = [
        (4, internal_junk(ctx)),
        (2, replayed(ctx)),
        (3, command_junk(ctx)),
        (1, node_state_junk(ctx)),
    ]
    if ctx.live:
        parts.append((1, live_only_junk(ctx)))
    return st.one_of(*(s for w, s in parts for _ in range(w)))


def batches(ctx: Context, max_size: int = 40) -> Any:
    return st.lists(junk(ctx), min_size=max(1, max_size // 2), max_size=max_size)


def sample(strategy: Any, n: int, seed: int) -> list[Any]:
    """``n`` values drawn from ``strategy`` by hypothesis, deterministically for ``seed``."""
    out: list[Any] = []
    attempt = 0
    while len(out) < n and attempt < 100:

        @settings(
            max_examples=max(1, n - len(out)),
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis_seed(seed * 1000 + attempt)
        @given(strategy)
        def collect(value: Any) -> None:
            out.append(value)

        collect()
        attempt += 1
    return out[:n]


# ---------------------------------------------------------------------------- results


@dataclass
class Problem:
    what: str  # "crash", "handler error", "invariant", "state change", "reply"
    detail: str
    inputs: list[str]  # the input(s) it followed, described

    def __str__(self) -> str:
        shown = "\n    ".join(self.inputs[-5:])
        return f"{self.what}: {self.detail}\n  after:\n    {shown}"


@dataclass
class Tally:
    inputs: int = 0
    skipped: int = 0  # not sent: forgeries an unsigned cluster cannot refuse (module doc), topics
    # the MQTT client or the broker refuses
    replies_checked: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def count(self, j: Junk) -> None:
        self.inputs += 1
        self.by_kind[j.kind] = self.by_kind.get(j.kind, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        kinds = [p.what for p in self.problems]
        return {
            "inputs": self.inputs,
            "skipped": self.skipped,
            "replies_checked": self.replies_checked,
            "crashes": sum(k in ("crash", "handler error") for k in kinds),
            "state_changes": sum(k in ("state change", "invariant") for k in kinds),
            "bad_replies": sum(k == "reply" for k in kinds),
            "problems": [str(p) for p in self.problems[:20]],
            "by_kind": dict(sorted(self.by_kind.items())),
        }


def flatten(batch: Iterable[Junk]) -> list[Junk]:
    out: list[Junk] = []
    for j in batch:
        out.append(j)
        out.extend(j.follow)
    return out


def check_reply(doc: Any) -> str | None:
    """Why a reply to junk is not a clear refusal, or None."""
    if not isinstance(doc, dict):
        return f"not a reply object: {doc!r}"
    if doc.get("success") is not False:
        return f"junk accepted: {doc!r}"[:400]
    msg = doc.get("msg")
    if not isinstance(msg, str) or not msg.strip():
        return f"no message in the refusal: {doc!r}"[:400]
    return None


# ---------------------------------------------------------------------------- the simulator


def forgery(j: Junk, ctx: Context) -> bool:
    """A message an unsigned cluster takes as a peer's: not junk there, a takeover."""
    return (
        not ctx.signed
        and j.topic.startswith("internal/")
        and j.kind not in EXACT_REPLAYS
        and accepted_unsigned(j.payload, ctx.peers)
    )


EXACT_REPLAYS = ("replay", "replay duplicate", "replay reordered")  # real messages, as sent
SETTLE_S = 0.3  # simulated time after a batch for replies and consequences
GAP_S = 0.001  # simulated time between inputs


class SimFuzzer:
    """A warmed-up 3-node simulated cluster fed junk, checked after every input."""

    def __init__(self, seed: int, signed: bool = True) -> None:
        from nsync_lab.sim.cluster import STATE_FILE, Checker, Simulation, Violation

        self.seed = seed
        self.signed = signed
        self.tally = Tally()
        self.broken = False
        self._recent: list[str] = []
        self._replies: dict[str, list[Any]] = {}
        self._capturing = True
        self._captured: list[tuple[str, bytes]] = []
        self._reply_n = 0
        self._expected: list[tuple[str, Junk]] = []
        self.refusals: dict[str, int] = {}  # what the roles refused (Effects.faults), by where
        self._violation = Violation
        self._state_file = STATE_FILE
        sim = Simulation(seed, nodes=3, duration_s=1e9, faults=0, signed=signed)
        self.sim = sim
        fuzzer = self

        class FuzzChecker(Checker):
            def refused(self, n: Any) -> None:  # junk is refused: that is the point
                pass

            def faults(self, node: str, eff: Any) -> None:
                for where, err in eff.faults:
                    fuzzer.refusals[where] = fuzzer.refusals.get(where, 0) + 1
                    if not isinstance(err, NSyncError):
                        fuzzer._problem("handler error", f"{node}: {where}: {err!r}")

        sim.checker = FuzzChecker(sim)
        for node in sim.nodes.values():
            node._on_message = self._guarded(node, node._on_message)  # type: ignore[method-assign]
        self.base = sim.topics.base
        w = sim.world
        for node in sim.nodes.values():
            w.at(sim.rng.uniform(0, 0.2), node.boot)
        w.at(0.05, sim.client.connect)
        self.conn = sim.broker.connect("fuzzer", self._on_message)
        self.conn.subscribe(f"{self.base}/internal/#")
        self.conn.subscribe(f"{self.base}/reply/#")
        w.run_until(2.0)
        for i, verb in enumerate(["enqueue", "enqueue", "enqueue", "volume"]):
            w.at(2.0 + 0.2 * i, sim.client.command, verb)
        w.run_until(4.0)
        self._capturing = False
        self.conn.unsubscribe(f"{self.base}/internal/#")
        w.run_until(4.5)
        replies = sim.client.replies
        if len(replies) != 4 or not all(r["success"] for r in replies):
            raise RuntimeError(f"the simulated cluster did not warm up: {replies}")
        self.baseline = self._snapshot()
        self.disk = self._disk()
        master = next(n for n in sim.nodes.values() if n.core is not None and n.core.master)
        assert master.core is not None
        self.ctx = Context(
            peers=list(sim.peers),
            master=master.id,
            term=master.core.term,
            songs=list(dict.fromkeys(master.core.state.playlist)),
            playlist_len=len(master.core.state.playlist),
            signed=signed,
            cluster=sim.topics.cluster,
            library=list(sim.songs),
            captured=self._captured,
        )
        self.rejected_before = self.rejected()

    # -------------------------------------------------------------- watching

    def _guarded(self, node: Any, handler: Callable[[str, bytes, bool], None]) -> Any:
        def on_message(topic: str, payload: bytes, retain: bool) -> None:
            try:
                handler(topic, payload, retain)
            except self._violation as err:
                self._problem("invariant", f"{node.id}: {err}")
            except Exception as err:
                tb = "".join(traceback.format_exception(err)[-4:])
                self._problem("crash", f"{node.id} on {topic}: {err!r}\n{tb}")

        return on_message

    def _problem(self, what: str, detail: str) -> None:
        self.broken = True
        self.tally.problems.append(Problem(what, detail, list(self._recent)))

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        rel = topic[len(self.base) + 1 :]
        if rel.startswith("internal/"):
            if self._capturing and not retain:
                self._captured.append((rel, payload))
        elif rel.startswith("reply/"):
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = payload
            self._replies.setdefault(rel[len("reply/") :], []).append(doc)

    def _snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for nid, n in sorted(self.sim.nodes.items()):
            core = n.core
            if core is None:
                out[nid] = None
                continue
            st_ = core.state
            pb = st_.playback
            out[nid] = (
                core.term,
                core.master is not None,
                core.election.master,
                (st_.term, st_.index),
                st_.hash,
                len(st_.playlist),
                st_.volume,
                (pb.state, pb.slot, pb.song, pb.frame, pb.at),
                st_.resume,
            )
        return out

    def _disk(self) -> dict[str, Any]:
        return {
            nid: n.disk.read(self._state_file) if n.disk.exists(self._state_file) else None
            for nid, n in sorted(self.sim.nodes.items())
        }

    def rejected(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.sim.nodes.values():
            for counts in (n.rejected, n.opener.rejected if n.opener else {}):
                for k, v in counts.items():
                    out[k] = out.get(k, 0) + v
        return out

    # -------------------------------------------------------------- feeding

    def send(self, j: Junk) -> bool:
        """Publish one input (False: skipped, a forgery an unsigned cluster cannot refuse)."""
        if forgery(j, self.ctx) or j.topic.startswith("/"):  # no such subscription here
            self.tally.skipped += 1
            return False
        payload = j.payload
        if j.expect_reply:
            self._reply_n += 1
            rid = f"fz{self._reply_n}"
            payload = payload.replace(REPLY_SLOT.encode(), rid.encode())
            self._expected.append((rid, j))
        self.tally.count(j)
        self._recent = [*self._recent[-9:], j.describe()]
        self.conn.publish(f"{self.base}/{j.topic}", payload, j.retain)
        return True

    def feed(self, batch: Sequence[Junk]) -> list[Problem]:
        """Feed a batch and check; returns the problems it caused (also in ``tally``)."""
        if self.broken:
            raise RuntimeError("this simulated cluster already broke: start a new one")
        first = len(self.tally.problems)
        self._expected = []
        w = self.sim.world
        for j in flatten(batch):
            if not self.send(j):
                continue
            try:
                w.run_for(GAP_S)
            except self._violation as err:
                self._problem("invariant", str(err))
            except Exception as err:
                self._problem("crash", f"{err!r}\n{''.join(traceback.format_exception(err)[-4:])}")
            if self.broken:
                return self.tally.problems[first:]
            now = self._snapshot()
            if now != self.baseline:
                self._problem("state change", _diff(self.baseline, now))
                return self.tally.problems[first:]
        w.run_for(SETTLE_S)
        if self._snapshot() != self.baseline:
            self._problem("state change", _diff(self.baseline, self._snapshot()))
        elif self._disk() != self.disk:
            self._problem("state change", "a state file changed")
        for rid, j in self._expected:
            self.tally.replies_checked += 1
            got = self._replies.pop(rid, [])
            if not got:
                self._recent = [j.describe()]
                self._problem("reply", f"no reply to {j.kind} on reply/{rid}")
                continue
            for doc in got:
                why = check_reply(doc)
                if why:
                    self._recent = [j.describe()]
                    self._problem("reply", why)
        return self.tally.problems[first:]


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    names = (
        "term",
        "is master",
        "its master",
        "last op",
        "plist",
        "length",
        "volume",
        "playback",
        "resume",
    )
    out = []
    for nid in a:
        if a[nid] != b.get(nid):
            if a[nid] is None or b.get(nid) is None:
                out.append(f"{nid}: {a[nid]} -> {b.get(nid)}")
                continue
            for name, x, y in zip(names, a[nid], b[nid], strict=True):
                if x != y:
                    out.append(f"{nid} {name}: {x!r} -> {y!r}")
    return "; ".join(out)


def fuzz_sim(
    inputs: int,
    seed: int = 0,
    signed: bool = True,
    batch: int = 40,
    progress: Callable[[Tally], None] | None = None,
) -> Tally:
    """At least ``inputs`` inputs through simulated clusters (a new cluster after any problem,
    and every 20,000 inputs, so that captured replays stay fresh)."""
    total = Tally()
    round_ = 0
    while total.inputs < inputs:
        fz = SimFuzzer(seed * 1000 + round_, signed)
        round_ += 1
        part = 0
        while (
            not fz.broken and fz.tally.inputs < 20_000 and total.inputs + fz.tally.inputs < inputs
        ):
            part += 1
            for b in sample(batches(fz.ctx, batch), 10, seed * 1_000_000 + round_ * 1000 + part):
                fz.feed(b)
                if fz.broken:
                    break
        _merge(total, fz.tally)
        if progress is not None:
            progress(total)
    return total


def _merge(total: Tally, t: Tally) -> None:
    total.inputs += t.inputs
    total.skipped += t.skipped
    total.replies_checked += t.replies_checked
    for k, v in t.by_kind.items():
        total.by_kind[k] = total.by_kind.get(k, 0) + v
    total.problems.extend(t.problems)


# ---------------------------------------------------------------------------- live nodes

MOVING = ("position", "position_at", "nodes")  # state fields that move with time


def known_error_types() -> set[str]:
    """Names of NSync's own error types: a node that counts one of these refused bad input;
    anything else in its ``faults`` is a bug it survived."""
    out: set[str] = set()
    todo: list[type] = [NSyncError]
    while todo:
        cls = todo.pop()
        out.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return out


def mosquitto_refuses_topic(topic: str) -> bool:
    """Whether Mosquitto drops a client that publishes to ``topic``: its UTF-8 check refuses
    control characters (U+0000-U+001F, U+007F-U+009F), surrogates and non-characters (MQTT
    3.1.1 says a topic SHOULD NOT hold them; amqtt takes them)."""
    for ch in topic:
        c = ord(ch)
        if c < 0x20 or 0x7F <= c <= 0x9F or 0xD800 <= c <= 0xDFFF or 0xFDD0 <= c <= 0xFDEF:
            return True
        if c & 0xFFFF in (0xFFFE, 0xFFFF):
            return True
    return False


class LiveFuzzer:
    """Junk through a real broker into a running cluster of ``nsync node`` processes
    (``nsync_lab.testing.NodeCluster``), then the same checks as :class:`SimFuzzer`, read from
    outside: the status reply, every node's retained state, state files and song store.

    ``raw`` must be a ``RawClient`` subscribed to ``reply/#`` and ``internal/#`` for a while
    already (what it heard of the cluster's real traffic is replayed); ``watcher`` a
    ``Watcher`` of the cluster. The cluster must sign: without a key, well-formed chunks on
    ``chunk/all`` are a client's upload, which may change the song store. With
    ``strict_topics`` (a Mosquitto broker) inputs on topics the broker refuses are skipped:
    Mosquitto would drop the fuzzing client, and with it the replies it waits for."""

    def __init__(self, cluster: Any, raw: Any, watcher: Any, strict_topics: bool = False) -> None:
        if cluster.key_file is None:
            raise ValueError("LiveFuzzer needs a signing cluster (NodeCluster(signed=True))")
        self.cluster = cluster
        self.raw = raw
        self.watcher = watcher
        self.base = f"nsync/{cluster.cluster}"
        self.signed = cluster.key_file is not None
        self.strict_topics = strict_topics
        self.tally = Tally()
        self._n = 0
        self._expected: list[tuple[str, Junk]] = []
        self._retained: set[str] = set()
        self._mark = raw.mark()
        self.before = self.snapshot()
        self.rejected_before = self.rejected()
        state = self.before["status"]
        internal = f"{self.base}/internal/"
        captured = [
            (m.topic[len(self.base) + 1 :], m.payload)
            for m in raw.since(0)
            if m.topic.startswith(internal) and not m.retain and "/xfer/" not in m.topic
        ]
        self.ctx = Context(
            peers=list(cluster.specs),
            master=state["master"],
            term=state["term"],
            songs=list(dict.fromkeys(state["playlist"])),
            playlist_len=len(state["playlist"]),
            signed=self.signed,
            cluster=cluster.cluster,
            library=sorted({s for n in self.before["store"].values() for s in n}),
            captured=captured[-2000:],
            live=True,
        )

    def _check_heartbeats(self, problem: Callable[[str, str], None]) -> None:
        """The master went on heartbeating in the same term, and nobody else did: the
        heartbeats that check out under the cluster key (junk went out on that topic too)."""
        from nsync_mqtt.seal import Opener, read_key

        opener = Opener(read_key(self.cluster.key_file), self.ctx.cluster, "", set(self.ctx.peers))
        topic = f"{self.base}/internal/hb"
        seen = 0
        for m in self.raw.since(self._mark):
            if m.topic != topic:
                continue
            opened = opener.open(0.0, topic, m.payload)
            if opened is None:
                continue
            doc = json.loads(opened.payload)
            seen += 1
            if (opened.sender, doc.get("term")) != (self.ctx.master, self.ctx.term):
                problem("state change", f"a heartbeat from {opened.sender} of term {doc['term']}")
                return
        if seen == 0:
            problem("state change", "no heartbeat from the master while the junk went in")

    def node_states(self) -> dict[str, dict[str, Any]]:
        """Each node's retained state (junk retained on those topics reads as none)."""
        out = {}
        for node in self.cluster.specs:
            raw = self.watcher.get(f"node/{node}/state")
            try:
                doc = json.loads(raw) if raw else None
            except (ValueError, RecursionError):
                continue
            if isinstance(doc, dict):
                out[node] = doc
        return out

    def clear_retained(self) -> None:
        """Clear what junk was left retained on topics no node republishes."""
        for topic in sorted(self._retained):
            self.raw.publish(topic, b"", retain=True)
        self._retained.clear()

    def rejected(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for doc in self.node_states().values():
            counts = doc.get("rejected")
            if isinstance(counts, dict):
                for k, v in counts.items():
                    if isinstance(v, int):
                        out[k] = out.get(k, 0) + v
        return out

    def snapshot(self) -> dict[str, Any]:
        from nsync_mqtt.persist import StateFile

        reply = self.raw.request("status", timeout_s=10.0)
        if reply.get("success") is not True:
            raise AssertionError(f"status failed: {reply}")
        status = {k: v for k, v in reply["state"].items() if k not in MOVING}
        durable: dict[str, Any] = {}
        store: dict[str, list[str]] = {}
        for node in self.cluster.specs:
            d = StateFile(self.cluster.workdir / node / "state.json").read()
            durable[node] = (d.term, d.voted_for, d.last_log, d.state.hash, d.state.volume)
            root = self.cluster.workdir / node / "store"
            store[node] = sorted(
                str(p.relative_to(root))
                for sub in ("songs", "partial")
                if (root / sub).exists()
                for p in (root / sub).iterdir()
            )
        return {"status": status, "durable": durable, "store": store}

    def feed(self, inputs: Iterable[Junk]) -> None:
        for j in flatten(inputs):
            if forgery(j, self.ctx):
                self.tally.skipped += 1
                continue
            payload = j.payload
            if j.expect_reply:
                self._n += 1
                rid = f"fz{self._n}"
                payload = payload.replace(REPLY_SLOT.encode(), rid.encode())
            topic = j.topic[1:] if j.topic.startswith("/") else f"{self.base}/{j.topic}"
            if self.strict_topics and mosquitto_refuses_topic(topic):
                self.tally.skipped += 1
                continue
            try:
                self.raw.publish(topic, payload, retain=j.retain)
            except ValueError:  # a topic the MQTT client refuses to send
                self.tally.skipped += 1
                continue
            except RuntimeError as err:  # the broker dropped the fuzzing client
                raise RuntimeError(f"{err} (after or during {j.describe()[:300]})") from err
            if j.expect_reply:
                self._expected.append((rid, j))
            node = j.topic.split("/")[1] if j.topic.startswith("node/") else None
            if j.retain and node not in self.ctx.peers:
                self._retained.add(topic)
            self.tally.count(j)

    def _replies(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        prefix = f"{self.base}/reply/"
        for m in self.raw.since(self._mark):
            if m.topic.startswith(prefix):
                try:
                    doc = json.loads(m.payload)
                except ValueError:
                    doc = m.payload
                out.setdefault(m.topic[len(prefix) :], []).append(doc)
        return out

    def finish(self, timeout_s: float = 30.0) -> list[Problem]:
        """Wait for the answers and the decoders, then check everything; the problems found
        (also in ``tally``)."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            replies = self._replies()
            if all(rid in replies for rid, _ in self._expected):
                break
            time.sleep(0.1)
        problems: list[Problem] = []

        def problem(what: str, detail: str, j: Junk | None = None) -> None:
            problems.append(Problem(what, detail, [j.describe()] if j else []))

        replies = self._replies()
        for rid, j in self._expected:
            self.tally.replies_checked += 1
            got = replies.get(rid, [])
            if not got:
                problem("reply", f"no reply to {j.kind} on reply/{rid}", j)
            for doc in got:
                why = check_reply(doc)
                if why:
                    problem("reply", why, j)
        for doc in replies.get("upload", []):
            why = check_reply(doc)
            if why:
                problem("reply", f"upload: {why}")
        alive = sorted(self.cluster.alive())
        if alive != sorted(self.cluster.specs):
            problem("crash", f"nodes alive: {alive} of {sorted(self.cluster.specs)}")
            self.tally.problems.extend(problems)
            return problems
        # the song store: junk uploads are stored, refused by the decoder and removed
        while True:
            after = self.snapshot()
            if after == self.before or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for part in ("status", "durable", "store"):
            if after[part] != self.before[part]:
                problem("state change", f"{part}: {_dict_diff(self.before[part], after[part])}")
        # the master went on heartbeating in the same term, and nobody else did
        if self.signed:
            self._check_heartbeats(problem)
        # each node republished its state since: what it refused and what it survived
        time.sleep(1.5)
        known = known_error_types()
        states = self.node_states()
        for node in self.cluster.specs:
            doc = states.get(node)
            if doc is None:
                problem("crash", f"{node} published no state")
                continue
            if (doc.get("role") == "master") != (node == self.ctx.master):
                problem("state change", f"{node} is {doc.get('role')}")
            if doc.get("term") != self.ctx.term:
                problem("state change", f"{node} is in term {doc.get('term')}")
            for kind, n in (doc.get("faults") or {}).items():
                if kind.rsplit("/", 1)[-1] not in known:
                    problem("crash", f"{node} survived {n} x {kind}")
        self.tally.problems.extend(problems)
        self.clear_retained()
        self._expected = []  # checked: the next finish looks at what comes after
        self._mark = self.raw.mark()
        return problems


def _dict_diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return "; ".join(
            f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)
        )[:1000]
    return f"{a!r} -> {b!r}"[:1000]


@contextlib.contextmanager
def live_fuzzer(
    cluster: Any, workdir: Path, strict_topics: bool = False
) -> Iterator[tuple[LiveFuzzer, Any, Any]]:
    """A :class:`LiveFuzzer` on a ready cluster with two songs enqueued, the volume at 37 and a
    second of real traffic captured for the replays; with the client and raw client it used.
    ``strict_topics``: the broker is Mosquitto (see :class:`LiveFuzzer`)."""
    from nsync_lab.testing import RawClient, load_and_enqueue, ok, tone_file
    from nsync_mqtt.messages import Topics

    topics = Topics(cluster.cluster)
    subscriptions = [f"{topics.base}/reply/#", topics.internal("#")]
    with (
        contextlib.closing(cluster.client(timeout=10.0)) as client,
        cluster.watch() as watcher,
        RawClient(cluster.broker_url, cluster.cluster, subscriptions) as raw,
    ):
        for i in range(2):
            load_and_enqueue(client, tone_file(workdir, f"fuzz-{i}", 2.0, 440.0 + 110 * i))
        ok(client.volume(37))
        time.sleep(1.0)  # real traffic for the replays
        yield LiveFuzzer(cluster, raw, watcher, strict_topics), client, raw
