"""The plain-MQTT contract (design §2.2) that Home Assistant and ``mosquitto_pub`` users rely on,
exercised with a raw paho client against a real 3-node cluster on amqtt and Mosquitto: plain
payloads, retained state topics, whole-file uploads, liveness topics and the reply object."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from nsync_lab.testing import (
    REPLY_KEYS,
    NodeCluster,
    RawClient,
    Watcher,
    load_and_enqueue,
    ok,
    refused,
    tone_file,
    wait_for,
)
from nsync_mqtt.bus import new_paho_client, parse_broker_url
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.tones import make_tone_wav

pytestmark = pytest.mark.integration


@pytest.fixture
def raw(cluster: NodeCluster) -> Iterator[RawClient]:
    base = f"nsync/{cluster.cluster}"
    subscriptions = [f"{base}/reply/#", f"{base}/node/+/status"]
    with RawClient(cluster.broker_url, cluster.cluster, subscriptions) as r:
        yield r


@pytest.fixture(scope="module")
def song(
    cluster: NodeCluster, client: NSyncClient, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A 3 s tone, loaded on the cluster and slotted as the current song."""
    path = tone_file(tmp_path_factory.mktemp("songs"), "Surface Tone", 3.0, 440.0)
    return load_and_enqueue(client, path)


def master_of(watcher: Watcher) -> str:
    states = watcher.node_states()
    masters = [n for n, s in states.items() if s.get("role") == "master"]
    assert len(masters) == 1, states
    return masters[0]


def retained_value(watcher: Watcher, field: str, want: bytes) -> bool:
    return watcher.get(f"state/{field}") == want


def test_status_and_node_topics_describe_the_cluster(
    cluster: NodeCluster, watcher: Watcher
) -> None:
    wait_for(lambda: watcher.get("status") == b"online", 5, "status online")
    online = [f"node/{n}/status" for n in cluster.specs]
    wait_for(lambda: all(watcher.get(t) == b"online" for t in online), 5, "every node online")
    wait_for(lambda: len(watcher.node_states()) == len(cluster.specs), 5, "every node's state")
    states = watcher.node_states()
    for node, st in states.items():
        assert {"role", "term", "clock", "songs"} <= set(st), (node, st)
        assert st["role"] in {"master", "follower"}, (node, st)
        assert isinstance(st["term"], int) and st["term"] >= 1
        assert isinstance(st["clock"], dict) and isinstance(st["songs"], list)
    master = master_of(watcher)
    assert len({st["term"] for st in states.values()}) == 1, states
    assert watcher.json("state")["master"] == master
    assert watcher.get("state/master") == master.encode()


def test_plain_volume_payloads_update_retained_state(
    client: NSyncClient, raw: RawClient, watcher: Watcher
) -> None:
    ok(client.volume(40))
    wait_for(lambda: retained_value(watcher, "volume", b"40"), 5, "volume 40")
    for payload, want in ((b"75", 75), (b"+5", 80), (b"-10", 70)):
        raw.publish(raw.topics.cmd("volume"), payload)  # no reply_to: the state is the answer

        def applied(want: int = want) -> bool:
            return (
                retained_value(watcher, "volume", str(want).encode())
                and watcher.json("state")["volume"] == want
            )

        wait_for(applied, 5, f"retained volume {want} after {payload!r}")


def test_empty_payload_play_and_pause(
    song: str, client: NSyncClient, raw: RawClient, watcher: Watcher
) -> None:
    wait_for(lambda: retained_value(watcher, "song", song.encode()), 5, "the slotted song")
    try:
        raw.publish(raw.topics.cmd("play"), b"")
        wait_for(lambda: retained_value(watcher, "playback", b"playing"), 5, "playing")
        state = watcher.json("state")
        assert (state["playback"], state["song"], state["title"]) == (
            "playing",
            song,
            "Surface Tone",
        )
        raw.publish(raw.topics.cmd("pause"), b"")
        wait_for(lambda: retained_value(watcher, "playback", b"paused"), 5, "paused")
        assert watcher.json("state")["playback"] == "paused"
    finally:
        client.stop()
    wait_for(lambda: retained_value(watcher, "playback", b"idle"), 5, "idle after stop")


def retained_command_is_held(cluster: NodeCluster, verb: str, payload: bytes) -> None:
    """A newly connecting subscriber is handed ``payload`` as a retained command."""
    topic = f"nsync/{cluster.cluster}/cmd/{verb}"
    with RawClient(cluster.broker_url, cluster.cluster, [topic]) as probe:
        got = probe.wait(lambda m: m.topic.endswith(f"/cmd/{verb}"), "the retained command")
        assert (got.payload, got.retain) == (payload, True)


def test_retained_command_does_not_replay_to_a_connecting_node(
    cluster_kind: str,
    cluster: NodeCluster,
    client: NSyncClient,
    raw: RawClient,
    watcher: Watcher,
) -> None:
    ok(client.volume(20))
    topic = raw.topics.cmd("volume")
    raw.publish(topic, b"+7", retain=True)
    try:
        retained_command_is_held(cluster, "volume", b"+7")
        before = ok(raw.request("status"))["state"]["volume"]
        # a restarted node subscribes afresh and is handed the retained command
        speaker = next(n for n in cluster.specs if n != master_of(watcher))
        since = raw.mark()
        assert cluster.stop_node(speaker) == 0
        cluster.start_node(speaker)
        raw.wait(
            lambda m: m.topic.endswith(f"/node/{speaker}/status") and m.payload == b"online",
            f"{speaker} back online",
            since,
            15,
        )
        cluster.wait_ready()
        if cluster_kind == "mosquitto":
            # a second connection with the master's client id makes Mosquitto drop the master;
            # it reconnects and re-subscribes, still master, and is handed the retained command
            master = master_of(watcher)
            since = raw.mark()
            imposter = new_paho_client(f"nsync-{cluster.cluster}-{master}", raw.url)
            imposter.connect(raw.url.host, raw.url.port)
            imposter.disconnect()
            raw.wait(
                lambda m: m.topic.endswith(f"/node/{master}/status") and m.payload == b"online",
                f"{master} reconnected",
                since,
            )
        after = ok(raw.request("status"))["state"]
        assert after["volume"] == before
        assert watcher.json("state")["volume"] == before
    finally:
        raw.publish(topic, b"", retain=True)  # clear the retained command


def test_whole_file_upload_then_enqueue_by_title(
    cluster: NodeCluster, raw: RawClient, watcher: Watcher
) -> None:
    title = f"Upload {uuid.uuid4().hex[:6]}"
    data = make_tone_wav(1.5, 587.0, title, "Surface Artist")
    since = raw.mark()
    raw.publish(raw.topics.upload, data)
    msg = raw.wait(lambda m: m.topic == raw.topics.reply("upload"), "the upload reply", since, 10)
    reply = json.loads(msg.payload)
    assert set(reply) == REPLY_KEYS, reply
    assert reply["success"] is True and reply["command"] == "upload", reply
    assert title in reply["msg"]
    song = reply["params"]["song"]
    assert reply["params"] == {"song": song, "size": len(data)}

    def listed() -> dict[str, Any] | None:
        return next((e for e in watcher.json("library") or [] if e["hash"] == song), None)

    entry = wait_for(listed, 5, "the song in the retained library")
    assert (entry["title"], entry["artist"], entry["size"]) == (title, "Surface Artist", len(data))
    assert entry["duration"] == pytest.approx(1.5, abs=0.01)

    def playlist() -> list[str]:
        return list(json.loads(watcher.get("state/playlist") or b"[]"))

    already = playlist().count(song)
    raw.publish(raw.topics.cmd("enqueue"), title.encode())  # a plain title, as mosquitto_pub -m
    wait_for(lambda: playlist().count(song) == already + 1, 5, "the title in the playlist")
    reply = ok(raw.request("enqueue", {"song": title}))
    assert reply["params"] == {"song": title}
    # the watcher is another connection: the broker may hand it the state a moment after the
    # reply reached the requester, so wait (briefly) rather than assume an order across clients
    wait_for(lambda: playlist().count(song) == already + 2, 5, "the second entry")

    # the state document shows the upcoming songs (up to 50) and the playlist's length; the
    # whole playlist is on state/playlist alone, republished only when it changes
    def agree() -> bool:
        doc, songs = watcher.json("state"), playlist()
        return doc["playlist_length"] == len(songs) and doc["queue"] == songs[doc["slot"] + 1 :]

    wait_for(agree, 5, "the state document")


def test_reply_objects_have_exactly_the_documented_keys(raw: RawClient) -> None:
    status = ok(raw.request("status"))
    assert set(status) == REPLY_KEYS | {"state"}
    assert status["command"] == "status" and isinstance(status["msg"], str)
    assert status["client_req_id"].startswith(raw.reply_to)
    assert isinstance(status["state"], dict)

    failed = raw.request("volume", {"volume": 900})
    assert set(failed) == REPLY_KEYS
    assert failed["success"] is False and failed["command"] == "volume"
    assert failed["params"] == {"volume": 900}

    unknown = raw.request("dance", {"arg": "now"})
    assert set(unknown) == REPLY_KEYS
    assert unknown["success"] is False and unknown["command"] == "dance"

    since = raw.mark()
    bad = {"client_req_id": {"n": 1}, "reply_to": raw.reply_to}
    raw.publish(raw.topics.cmd("play"), json.dumps(bad))
    msg = raw.wait(lambda m: m.topic == raw.topics.reply(raw.reply_to), "the bad reply", since)
    refused = json.loads(msg.payload)
    assert set(refused) == REPLY_KEYS
    assert refused["success"] is False and refused["command"] == "play"
    assert "client_req_id" in refused["msg"]


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto_sub missing")
def test_mosquitto_sub_reads_the_master_from_the_retained_state(
    cluster: NodeCluster, watcher: Watcher
) -> None:
    """The first (retained) message a fresh plain client gets on state/master is the master's
    id: no node state or other topic the nodes subscribed to comes first."""
    master = master_of(watcher)
    port = str(parse_broker_url(cluster.broker_url).port)
    topic = f"nsync/{cluster.cluster}/state/master"
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-v", "-C", "1", "-W", "5", "-t", topic],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.stdout.splitlines() == [f"{topic} {master}"], out


def test_a_command_that_changes_nothing_succeeds_and_says_so(
    song: str, client: NSyncClient, raw: RawClient, watcher: Watcher
) -> None:
    """The paper's no-op: a retry from a script or Home Assistant never sees a failure."""
    wait_for(lambda: retained_value(watcher, "song", song.encode()), 5, "the slotted song")
    master = master_of(watcher)

    def index() -> int:
        return int(watcher.node_states()[master]["index"])

    try:
        for verb, body in (("play", {}), ("pause", {}), ("stop", {}), ("volume", {"volume": 33})):
            first = raw.request(verb, body)
            assert first["success"] and "nothing changed" not in first["msg"], first
            if verb != "play":  # (not while the 3 s song plays on: its end is an operation)
                time.sleep(1.2)  # the master publishes its node state (its index) every second
            before = index()
            again = raw.request(verb, body)
            assert again["success"] is True, again
            assert again["msg"].endswith("nothing changed"), again
            assert again["command"] == verb and again["params"] == body, again
            if verb != "play":
                time.sleep(1.2)
                assert index() == before, f"{verb} again made an operation"
        paused_twice = raw.request("pause", {})  # stopped: nothing to pause either
        assert paused_twice["success"] and "already stopped" in paused_twice["msg"], paused_twice
        # a command with a bad argument still fails
        refused(raw.request("volume", {"volume": "loud"}), "volume", "volume must be")
    finally:
        client.stop()


def test_node_status_goes_offline_when_its_node_stops(
    cluster: NodeCluster, raw: RawClient, watcher: Watcher
) -> None:
    """Runs last: it stops two of the three nodes."""
    master = master_of(watcher)
    speaker = next(n for n in cluster.specs if n != master)
    others = [n for n in cluster.specs if n != speaker]
    assert cluster.stop_node(speaker) == 0
    wait_for(lambda: watcher.get(f"node/{speaker}/status") == b"offline", 5, f"{speaker} offline")
    assert all(watcher.get(f"node/{n}/status") == b"online" for n in others)
    assert ok(raw.request("status"))["state"]["master"] == master  # the quorum still serves
    assert cluster.stop_node(master) == 0
    wait_for(lambda: watcher.get(f"node/{master}/status") == b"offline", 5, f"{master} offline")
    wait_for(lambda: watcher.get("status") == b"offline", 5, "cluster status offline")
