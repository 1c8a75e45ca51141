"""Playlist editing on a real 3-node cluster, on amqtt and Mosquitto, from each door a user
has: the Python API, the ``nsync`` command and plain ``mosquitto_pub`` payloads. Every node
ends with the master's playlist (the hash each one publishes), and the retained state follows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nsync_lab.testing import NodeCluster, Watcher, ok, refused, tone_file, wait_for
from nsync_mqtt.bus import parse_broker_url
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.playlist import playlist_hash

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def songs(client: NSyncClient, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Four 8 s tones loaded on the cluster (not enqueued): long enough that none ends while
    a test edits around it."""
    folder = tmp_path_factory.mktemp("edit-songs")
    out = []
    for i, name in enumerate(("Edit One", "Edit Two", "Edit Three", "Edit Four")):
        path = tone_file(folder, name, 8.0, 330.0 + 110 * i)
        out.append(str(ok(client.load_song(path))["params"]["song"]))
    return out


@pytest.fixture
def fresh(client: NSyncClient) -> Iterator[None]:
    """Each test starts from an empty, stopped playlist."""
    client.request("clear")
    yield


def playlist(watcher: Watcher) -> list[str]:
    return list(json.loads(watcher.get("state/playlist") or b"[]"))


def settle(cluster: NodeCluster, watcher: Watcher, want: list[str]) -> None:
    """The retained playlist is ``want`` and every node holds that very playlist."""
    wait_for(lambda: playlist(watcher) == want, 5, f"state/playlist == {want}")
    h = playlist_hash(want)
    nodes = list(cluster.specs)

    def agreed() -> bool:
        states = watcher.node_states()
        return all(states.get(n, {}).get("playlist_hash") == h for n in nodes)

    wait_for(agreed, 5, "every node's playlist hash")
    doc = watcher.json("state")
    assert doc["playlist_length"] == len(want)
    assert doc["queue"] == want[doc["slot"] + 1 :]


def test_api_edits(
    cluster: NodeCluster, client: NSyncClient, watcher: Watcher, songs: list[str], fresh: None
) -> None:
    a, b, c, d = songs
    for s in (a, b, c):
        ok(client.enqueue_song(s))
    settle(cluster, watcher, [a, b, c])
    ok(client.enqueue_song(d, next=True))
    settle(cluster, watcher, [a, d, b, c])
    ok(client.move(3, 0))
    settle(cluster, watcher, [c, a, d, b])
    assert watcher.json("state")["song"] == a  # the current song stayed current
    ok(client.remove(0))
    settle(cluster, watcher, [a, d, b])
    ok(client.play())
    ok(client.remove(0))  # the playing song: the next one plays
    settle(cluster, watcher, [d, b])
    wait_for(lambda: watcher.json("state")["song"] == d, 5, "the next song current")
    assert watcher.json("state")["playback"] == "playing"
    ok(client.enqueue_song(c, play=True))
    settle(cluster, watcher, [d, c, b])
    wait_for(lambda: watcher.json("state")["song"] == c, 5, "the new song playing")
    ok(client.replace(a))
    settle(cluster, watcher, [a])
    ok(client.clear())
    settle(cluster, watcher, [])
    wait_for(lambda: watcher.json("state")["playback"] == "idle", 5, "idle after clear")


def test_bad_edits_get_clear_replies(
    client: NSyncClient, watcher: Watcher, songs: list[str], fresh: None
) -> None:
    ok(client.enqueue_song(songs[0]))
    refused(client.remove(4), "remove", "out of range")
    refused(client.move(0, 9), "move", "out of range")
    refused(client.request("remove", {"index": "x"}), "remove", "playlist position")
    refused(client.request("move", {"arg": "1"}), "move", "two playlist positions")
    refused(client.replace("No Such Title"), "replace", "no loaded song")
    refused(client.request("enqueue", {"song": songs[1], "next": 1}), "enqueue", "true or false")
    status = ok(client.request("status"))
    assert status["state"]["playlist"] == [songs[0]]  # the refused edits changed nothing
    wait_for(lambda: playlist(watcher) == [songs[0]], 5, "the retained playlist")


def nsync(cluster: NodeCluster, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nsync_mqtt", "--broker", cluster.broker_url]
    cmd += ["--cluster", cluster.cluster, "--timeout", "5", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_cli_edits(
    cluster: NodeCluster,
    watcher: Watcher,
    songs: list[str],
    fresh: None,
    tmp_path: Path,
) -> None:
    a, b, c, _ = songs
    for s in (a, b):
        assert nsync(cluster, "enqueue", s).returncode == 0
    path = tone_file(tmp_path, "Edit From File", 1.0, 990.0)
    done = nsync(cluster, "enqueue", "--next", str(path))  # a file: loaded, then inserted
    assert done.returncode == 0, done.stderr
    wait_for(lambda: len(playlist(watcher)) == 3, 5, "three songs")
    new = playlist(watcher)[1]
    settle(cluster, watcher, [a, new, b])
    assert nsync(cluster, "move", "0", "2").returncode == 0
    settle(cluster, watcher, [new, b, a])
    assert nsync(cluster, "remove", "1").returncode == 0
    settle(cluster, watcher, [new, a])
    bad = nsync(cluster, "remove", "7")
    assert bad.returncode == 1 and "remove failed" in bad.stderr and "out of range" in bad.stderr
    assert nsync(cluster, "move", "x", "1").returncode == 2  # usage error
    assert nsync(cluster, "replace", c).returncode == 0
    settle(cluster, watcher, [c])
    assert nsync(cluster, "clear").returncode == 0
    settle(cluster, watcher, [])


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto_pub not installed")
def test_mosquitto_pub_edits(
    cluster: NodeCluster, watcher: Watcher, songs: list[str], fresh: None
) -> None:
    """The payloads docs/protocol.md gives for scripts and dashboards, sent by mosquitto_pub."""
    url = parse_broker_url(cluster.broker_url)
    base = f"nsync/{cluster.cluster}/cmd"

    def pub(verb: str, *payload: str) -> None:
        cmd = ["mosquitto_pub", "-h", url.host, "-p", str(url.port), "-q", "1", "-t"]
        cmd += [f"{base}/{verb}", *(("-m", payload[0]) if payload else ("-n",))]
        subprocess.run(cmd, check=True, timeout=10)

    a, b, c, d = songs
    for s in (a, b, c):
        pub("enqueue", s)
        wait_for(lambda s=s: playlist(watcher)[-1:] == [s], 5, "the enqueue")
    pub("move", "2 0")
    settle(cluster, watcher, [c, a, b])
    pub("remove", "1")  # a, the current song: b takes its place
    settle(cluster, watcher, [c, b])
    pub("enqueue", json.dumps({"song": d, "next": True}))
    settle(cluster, watcher, [c, b, d])
    pub("move", json.dumps({"from": 0, "to": 2}))
    settle(cluster, watcher, [b, d, c])
    pub("replace", a)
    settle(cluster, watcher, [a])
    pub("clear")
    settle(cluster, watcher, [])


def test_an_untagged_song_is_titled_by_its_file_name(
    client: NSyncClient, watcher: Watcher, tmp_path: Path, fresh: None
) -> None:
    """Never its hash: the name it was loaded under, in the library and the state, and
    ``enqueue`` finds it by that name."""
    path = tmp_path / "Morning Birds.wav"
    with wave.open(str(path), "wb") as w:  # no INFO tags at all
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(bytes(4 * 44100))
    song = ok(client.load_song(path))["params"]["song"]

    def listed() -> dict[str, Any] | None:
        return next((e for e in watcher.json("library") or [] if e["hash"] == song), None)

    wait_for(lambda: (listed() or {}).get("title") == "Morning Birds", 5, "the title")
    ok(client.enqueue_song("Morning Birds"))
    wait_for(lambda: watcher.json("state")["title"] == "Morning Birds", 5, "the state's title")


def test_announce_interrupts_then_resumes_on_every_node(
    cluster: NodeCluster,
    client: NSyncClient,
    watcher: Watcher,
    songs: list[str],
    tmp_path: Path,
    fresh: None,
) -> None:
    a, b, _, _ = songs
    for s in (a, b):
        ok(client.enqueue_song(s))
    ok(client.play())
    wait_for(lambda: watcher.json("state")["playback"] == "playing", 5, "playing")
    chime = tone_file(tmp_path, "Doorbell", 1.0, 1200.0)
    ok(client.announce(chime))
    doc = wait_for(lambda: (d := watcher.json("state"))["title"] == "Doorbell" and d, 5, "on")
    chime_song = doc["song"]
    assert doc["playback"] == "playing"
    wait_for(lambda: playlist(watcher) == [chime_song, a, b], 5, "the announcement in place")
    # it ends by itself: the announcement leaves, and the first song plays on from where it was
    settle(cluster, watcher, [a, b])
    doc = watcher.json("state")
    assert doc["song"] == a and doc["playback"] == "playing"
    assert 0.0 < doc["position"] < 4.0  # not from the start of the announcement's length
    refused(client.request("announce", {"song": "No Such Title"}), "announce", "no loaded song")
