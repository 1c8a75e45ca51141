"""Bad input against a real 3-node cluster (amqtt and Mosquitto): every bad command or upload is
refused with a reply that says what was wrong, the player state stays as it was, and no node
goes down."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nsync_lab.testing import (
    NodeCluster,
    RawClient,
    Watcher,
    load_and_enqueue,
    ok,
    refused,
    tone_file,
    wait_for,
)
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.messages import Topics, encode_chunk
from nsync_mqtt.replication import Manifest, chunk_header, sha224_file
from nsync_mqtt.tones import ffmpeg_available, make_tone_wav

pytestmark = pytest.mark.integration

MAX_SONG_BYTES = 2 * 1024 * 1024
CHUNK = 16 * 1024
UNLOADED_HASH = hashlib.sha224(b"a song nobody loaded").hexdigest()


@pytest.fixture(scope="module")
def slotted(
    cluster: NodeCluster, client: NSyncClient, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A 2 s song, loaded and slotted as the current song (so seek has something to seek in)."""
    path = tone_file(tmp_path_factory.mktemp("songs"), "Slotted", 2.0, 440.0)
    song = load_and_enqueue(client, path)
    # The tags and duration reach the state once the master has read the file: wait for them,
    # so that the before/after snapshots of the tests below do not see them arrive.
    wait_for(
        lambda: ok(client.status())["state"].get("duration") is not None,
        timeout_s=20.0,
        what="the slotted song's duration in the master's state",
    )
    return song


@pytest.fixture
def raw(cluster: NodeCluster, slotted: str) -> Iterator[RawClient]:
    """A plain client hearing the replies and the transfer requests."""
    topics = Topics(cluster.cluster)
    subscriptions = [f"{topics.base}/reply/#", topics.internal("xfer/#")]
    with RawClient(cluster.broker_url, cluster.cluster, subscriptions) as r:
        yield r


def send_chunks(raw: RawClient, data: bytes, manifest: Manifest, indices: list[int]) -> None:
    for i in indices:
        offset, length = manifest.chunk_span(i)
        frame = encode_chunk(chunk_header(manifest, i), data[offset : offset + length])
        raw.publish(raw.topics.internal("chunk/all"), frame)


def snapshot(raw: RawClient) -> dict[str, Any]:
    """The master's state document, without the fields that move with time."""
    state = dict(ok(raw.request("status"))["state"])
    state.pop("position")
    state.pop("position_at")
    return state


def assert_healthy(cluster: NodeCluster, raw: RawClient) -> None:
    assert sorted(cluster.alive()) == sorted(cluster.specs), cluster.logs_tail()
    assert ok(raw.request("status"))["state"]["master"] in cluster.specs


def held_anywhere(watcher: Watcher, song: str) -> list[str]:
    """Nodes that list ``song`` in their retained node state, plus "library" if it is listed."""
    where = [n for n, s in watcher.node_states().items() if song in s.get("songs", [])]
    if any(e.get("hash") == song for e in watcher.json("library") or []):
        where.append("library")
    return where


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


BAD_COMMANDS = [
    pytest.param(
        "seek", {"seconds": "abc"}, ["seek needs a number of seconds", "'abc'"], id="seek-abc"
    ),
    pytest.param("seek", {"seconds": 999}, ["past the end of the song"], id="seek-past-end"),
    pytest.param("seek", {"seconds": -1}, ["non-negative number of seconds"], id="seek-negative"),
    pytest.param(
        "volume", {"volume": [1]}, ["volume must be 0-100 or +N/-N", "[1]"], id="volume-list"
    ),
    pytest.param("volume", {"volume": 900}, ["between 0 and 100", "900"], id="volume-900"),
    pytest.param("volume", {}, ["volume must be 0-100"], id="volume-missing"),
    pytest.param("dance", {}, ["unknown command 'dance'", "play"], id="unknown-verb"),
    pytest.param(
        "enqueue",
        {"song": UNLOADED_HASH},
        ["is not loaded", UNLOADED_HASH[:12]],
        id="enqueue-unknown-hash",
    ),
    pytest.param(
        "enqueue",
        {"song": "0123abcd" * 3},
        ["no loaded song has the title"],
        id="enqueue-short-hash",
    ),
    pytest.param(
        "enqueue",
        {"song": UNLOADED_HASH.upper()},
        ["no loaded song has the title"],
        id="enqueue-upper-hash",
    ),
    pytest.param(
        "enqueue",
        {"song": "No Such Song"},
        ["no loaded song has the title 'No Such Song'"],
        id="enqueue-unknown-title",
    ),
    pytest.param(
        "enqueue", {"song": 5}, ["needs a song hash or an exact title"], id="enqueue-number"
    ),
    pytest.param("enqueue", {}, ["needs a song hash or an exact title"], id="enqueue-nothing"),
    pytest.param(
        "load",
        {"song": "xyz", "size": 10, "chunk_size": CHUNK},
        ["bad load manifest", "'song'"],
        id="load-bad-hash",
    ),
    pytest.param(
        "load",
        {"song": UNLOADED_HASH, "size": "10"},
        ["bad load manifest", "'size'"],
        id="load-size-text",
    ),
    pytest.param(
        "load",
        {"song": UNLOADED_HASH, "size": 10, "chunk_size": 1},
        ["bad load manifest", "'chunk_size'"],
        id="load-tiny-chunks",
    ),
]


@pytest.mark.parametrize(("verb", "body", "words"), BAD_COMMANDS)
def test_bad_command_is_refused(
    cluster: NodeCluster, raw: RawClient, verb: str, body: dict[str, Any], words: list[str]
) -> None:
    before = snapshot(raw)
    reply = raw.request(verb, body)
    refused(reply, verb, *words)
    assert reply["params"] == body
    assert snapshot(raw) == before
    assert_healthy(cluster, raw)


def test_bad_client_req_id_is_answered_when_reply_to_is_readable(
    cluster: NodeCluster, raw: RawClient
) -> None:
    before = snapshot(raw)
    for bad_id in ([1], {"n": 1}, True, 1.5):
        since = raw.mark()
        raw.publish(
            raw.topics.cmd("volume"),
            json.dumps({"volume": 10, "client_req_id": bad_id, "reply_to": raw.reply_to}),
        )
        reply = raw.wait_json(raw.topics.reply(raw.reply_to), "the refusal", since)
        msg = refused(
            reply, "volume", "bad command", "client_req_id must be an integer or a string"
        )
        assert (reply["params"], reply["client_req_id"]) == (None, None), msg
    assert snapshot(raw) == before  # the volume in the refused commands was not applied
    assert_healthy(cluster, raw)


UNANSWERABLE = [
    pytest.param(b'{"reply_to": "PROBE", "volume": 10', id="truncated-json"),
    pytest.param(b'{"reply_to": "PROBE", "volume": 10,}', id="trailing-comma"),
    pytest.param(b'{"reply_to": "PROBE", "volume": "1\xff"}', id="not-utf8"),
    pytest.param(b'{"reply_to": "no/such/topic", "volume": 10}', id="reply-to-not-an-id"),
    pytest.param(b'{"reply_to": "Upper", "volume": 10}', id="reply-to-uppercase"),
    pytest.param(b'["reply_to", "PROBE", 10]', id="json-array-is-a-plain-value"),
    pytest.param(b'"10"', id="json-string-is-a-plain-value"),
    pytest.param(b"ten", id="plain-word"),
]


@pytest.mark.parametrize("payload", UNANSWERABLE)
def test_unreadable_command_changes_nothing(
    cluster: NodeCluster, raw: RawClient, payload: bytes
) -> None:
    """Without a readable reply_to no reply is possible: the state is the only answer. The next
    command is served in order, so its reply being the first one proves nothing was sent."""
    before = snapshot(raw)
    since = raw.mark()
    raw.publish(raw.topics.cmd("volume"), payload.replace(b"PROBE", raw.reply_to.encode()))
    after = snapshot(raw)
    replies = [m for m in raw.since(since) if "/reply/" in m.topic]
    assert len(replies) == 1, replies  # only the status reply
    assert json.loads(replies[0].payload)["command"] == "status"
    assert after == before
    assert_healthy(cluster, raw)


def truncated_upload(
    raw: RawClient, data: bytes, manifest: Manifest, send: list[int]
) -> dict[str, Any]:
    """Announce ``manifest`` as a raw client, send only the chunks ``send``, return the reply."""
    since = raw.mark()
    req_id = f"{raw.reply_to}-load"
    body = {**manifest.to_dict(), "client_req_id": req_id, "reply_to": raw.reply_to}
    raw.publish(raw.topics.cmd("load"), json.dumps(body))
    ask = raw.wait_json(raw.topics.internal(f"xfer/{raw.reply_to}"), "the chunk request", since)
    assert ask == {"song": manifest.song, "missing": list(range(manifest.n_chunks))}
    send_chunks(raw, data, manifest, send)
    reply = raw.wait_json(raw.topics.reply(raw.reply_to), "the load reply", since, 10)
    assert reply["client_req_id"] == req_id
    return reply


def test_truncated_upload_fails_then_resumes(
    cluster: NodeCluster, raw: RawClient, client: NSyncClient, watcher: Watcher, tmp_path: Path
) -> None:
    path = tmp_path / "resumed.wav"
    path.write_bytes(make_tone_wav(1.0, 523.0, f"Resumed {uuid.uuid4().hex[:6]}"))
    data = path.read_bytes()
    manifest = Manifest(sha224_file(path), len(data), CHUNK)
    assert manifest.n_chunks >= 4
    before = snapshot(raw)

    started = time.monotonic()
    reply = truncated_upload(raw, data, manifest, [0])
    waited = time.monotonic() - started
    refused(reply, "load", f"upload incomplete: received 1 of {manifest.n_chunks} chunks")
    assert 0.9 <= waited <= 6.0, f"the idle timeout is 1 s, the reply came after {waited:.2f} s"
    assert held_anywhere(watcher, manifest.song) == []
    assert snapshot(raw) == before

    since = raw.mark()
    reply = ok(client.load_song(path, chunk_size=CHUNK))  # resumes: only the missing chunks
    assert reply["params"]["song"] == manifest.song
    asks = [
        json.loads(m.payload)
        for m in raw.since(since)
        if m.topic.startswith(raw.topics.internal("xfer/"))
    ]
    assert asks == [{"song": manifest.song, "missing": list(range(1, manifest.n_chunks))}]
    wait_for(lambda: "library" in held_anywhere(watcher, manifest.song), 5, "the library entry")
    assert_healthy(cluster, raw)


def wrong_hash_upload(raw: RawClient, seed: int) -> tuple[dict[str, Any], str, str]:
    data = random_bytes(seed, 40_000)
    claimed = hashlib.sha224(b"not these bytes" + bytes([seed])).hexdigest()
    actual = hashlib.sha224(data).hexdigest()
    reply = truncated_upload(raw, data, Manifest(claimed, len(data), CHUNK), [0, 1, 2])
    return reply, claimed, actual


def test_wrong_hash_load_fails_and_stores_nothing(
    cluster: NodeCluster, raw: RawClient, watcher: Watcher
) -> None:
    before = snapshot(raw)
    reply, claimed, actual = wrong_hash_upload(raw, 1)
    refused(reply, "load")
    assert snapshot(raw) == before
    assert held_anywhere(watcher, claimed) == []
    assert held_anywhere(watcher, actual) == []
    for node in cluster.specs:
        store = cluster.workdir / node / "store"
        names = {p.name for p in store.rglob("*")}
        assert not any(claimed in n or actual in n for n in names), (node, names)
    assert_healthy(cluster, raw)


def test_wrong_hash_load_says_the_bytes_do_not_match(cluster: NodeCluster, raw: RawClient) -> None:
    reply, _, _ = wrong_hash_upload(raw, 2)
    refused(reply, "load", "hash")
    assert "resume" not in reply["msg"]


def test_oversized_load_names_the_limit(
    cluster: NodeCluster, raw: RawClient, watcher: Watcher
) -> None:
    before = snapshot(raw)
    song = hashlib.sha224(b"too big").hexdigest()
    size = MAX_SONG_BYTES + 1
    since = raw.mark()
    body = {"song": song, "size": size, "chunk_size": 256 * 1024}
    reply = raw.request("load", body)
    refused(
        reply, "load", "bad load manifest", str(size), f"over the limit of {MAX_SONG_BYTES} bytes"
    )
    assert reply["params"] == body
    assert not [m for m in raw.since(since) if "/xfer/" in m.topic]  # no chunk was asked for
    assert snapshot(raw) == before
    assert held_anywhere(watcher, song) == []
    assert_healthy(cluster, raw)


def test_load_with_a_non_boolean_bg_is_refused(cluster: NodeCluster, raw: RawClient) -> None:
    song = hashlib.sha224(b"bg as text").hexdigest()
    since = raw.mark()
    body = {"song": song, "size": 1000, "chunk_size": 64 * 1024, "bg": "no"}
    refused(raw.request("load", body), "load", "bg must be true or false")
    assert not [m for m in raw.since(since) if "/xfer/" in m.topic]  # no chunk was asked for
    assert_healthy(cluster, raw)


def upload_reply(raw: RawClient, data: bytes) -> dict[str, Any]:
    since = raw.mark()
    raw.publish(raw.topics.upload, data)
    reply: dict[str, Any] = raw.wait_json(raw.topics.reply("upload"), "the upload reply", since, 10)
    return reply


def test_oversized_whole_file_upload_names_the_limit(
    cluster: NodeCluster, raw: RawClient, watcher: Watcher
) -> None:
    before = snapshot(raw)
    data = random_bytes(3, MAX_SONG_BYTES + 1)
    reply = upload_reply(raw, data)
    refused(reply, "upload", str(len(data)), f"over the limit of {MAX_SONG_BYTES} bytes")
    assert reply["params"] == {"size": len(data)}
    assert snapshot(raw) == before
    assert held_anywhere(watcher, hashlib.sha224(data).hexdigest()) == []
    assert_healthy(cluster, raw)


def test_non_audio_load_is_not_a_playable_song(
    cluster: NodeCluster, raw: RawClient, client: NSyncClient, watcher: Watcher, tmp_path: Path
) -> None:
    before = snapshot(raw)
    path = tmp_path / "noise.mp3"
    path.write_bytes(random_bytes(4, 50_000))
    song = sha224_file(path)
    reply = client.load_song(path, chunk_size=CHUNK)
    refused(reply, "load", "not a playable song")
    assert snapshot(raw) == before
    # every node received the chunks; each drops the song once it fails to decode
    wait_for(lambda: held_anywhere(watcher, song) == [], 5, "the song to be dropped everywhere")
    refused(raw.request("enqueue", {"song": song}), "enqueue", "is not loaded")
    assert_healthy(cluster, raw)


def test_non_audio_whole_file_upload_is_not_a_playable_song(
    cluster: NodeCluster, raw: RawClient, watcher: Watcher
) -> None:
    before = snapshot(raw)
    data = random_bytes(5, 30_000)
    reply = upload_reply(raw, data)
    refused(reply, "upload", "not a playable song")
    song = hashlib.sha224(data).hexdigest()
    assert reply["params"]["song"] == song
    assert snapshot(raw) == before
    wait_for(lambda: held_anywhere(watcher, song) == [], 5, "the song to be dropped everywhere")
    assert_healthy(cluster, raw)


@pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg not installed")
def test_a_small_file_that_decodes_too_long_is_refused_everywhere(
    cluster: NodeCluster, raw: RawClient, watcher: Watcher, tmp_path: Path
) -> None:
    """90 s of silent FLAC is a few tens of KB but 15 MB of PCM: over the cluster's
    max_song_minutes (1 here), every node refuses it before decoding more than a minute."""
    path = tmp_path / "long silence.flac"
    cmd = ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo"]
    subprocess.run([*cmd, "-t", "90", "-c:a", "flac", str(path)], check=True, timeout=60)
    data = path.read_bytes()
    before = snapshot(raw)
    reply = upload_reply(raw, data)
    refused(reply, "upload", "not a playable song", "longer than the limit of 1 minute")
    song = hashlib.sha224(data).hexdigest()
    assert snapshot(raw) == before
    wait_for(lambda: held_anywhere(watcher, song) == [], 5, "the song to be dropped everywhere")
    assert_healthy(cluster, raw)
