"""A real cluster: a real broker (amqtt and Mosquitto), three real `nsync node` processes with
virtual sinks and clocks set hours apart with ±50 ppm drift. The sink logs are the ground truth
of what each node played and when."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsync_lab.testing import (
    NodeCluster,
    NodeSpec,
    ok,
    ready_cluster,
    tone_file,
    unique_cluster_name,
    wait_for,
)
from nsync_mqtt import sinklog
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.playlist import RATE
from nsync_mqtt.replication import sha224_file
from nsync_mqtt.tones import ffmpeg_available, make_tone_mp3

pytestmark = pytest.mark.integration

SKEW_TOLERANCE_NS = 5_000_000  # "within a few ms" on a loaded 2-core machine
SPECS = [
    NodeSpec("n1", clock_offset=0.0, clock_drift_ppm=0.0),
    NodeSpec("n2", clock_offset=7200.25, clock_drift_ppm=50.0),
    NodeSpec("n3", clock_offset=-3600.5, clock_drift_ppm=-50.0),
]


@pytest.fixture
def cluster(
    cluster_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[NodeCluster]:
    """A fresh cluster for every test, with a 1 MB song store."""
    broker = request.getfixturevalue(f"{cluster_kind}_broker")
    nodes = NodeCluster(
        broker.url,
        tmp_path / "cluster",
        SPECS,
        cluster=unique_cluster_name(),
        timing={"upload_idle_timeout_s": 1.0},
        settings={"max_song_mb": 2, "store_cap_mb": 1},
    )
    with ready_cluster(nodes) as c:
        yield c


@pytest.fixture
def client(cluster: NodeCluster) -> Iterator[NSyncClient]:
    with contextlib.closing(cluster.client(timeout=5.0)) as c:
        yield c


def logs(cluster: NodeCluster) -> dict[str, list[sinklog.Block]]:
    return {n: sinklog.read_log(cluster.sink_log(n)) for n in cluster.specs}


def ranges(cluster: NodeCluster, song: str) -> dict[str, list[tuple[int, int, int]]]:
    return {n: sinklog.played_ranges(b, song) for n, b in logs(cluster).items()}


def assert_in_sync(cluster: NodeCluster, song: str) -> list[tuple[int, int, int]]:
    """Every node played the same frame ranges of `song`, starting together."""
    per_node = ranges(cluster, song)
    ref = per_node["n1"]
    assert ref, f"n1 never played {song[:8]}"
    for node, rs in per_node.items():
        assert len(rs) == len(ref), f"{node} played {rs}, n1 played {ref}"
        for (f0, f1, t0), (g0, g1, u0) in zip(ref, rs, strict=True):
            assert f0 == g0, f"{node} started a range at frame {g0}, n1 at {f0}"
            assert abs(f1 - g1) <= RATE * SKEW_TOLERANCE_NS / 1e9, (node, f1, g1)
            assert abs(t0 - u0) <= SKEW_TOLERANCE_NS, f"{node} skew {(u0 - t0) / 1e6:.3f} ms"
    blocks = logs(cluster)
    frames = [r[0] + 4410 for r in ref if r[1] - r[0] > 8820]
    skew = sinklog.max_skew(blocks, song, frames)
    assert skew is None or skew <= SKEW_TOLERANCE_NS, f"skew {skew / 1e6:.3f} ms"
    return ref


def test_commands_play_in_sync(cluster: NodeCluster, client: NSyncClient, tmp_path: Path) -> None:
    a = tone_file(tmp_path, "Song A", 4.0, 440.0)
    b = tone_file(tmp_path, "Song B", 4.0, 660.0)
    ha, hb = sha224_file(a), sha224_file(b)

    loaded = ok(client.load_song(a))
    assert loaded["params"]["song"] == ha
    ok(client.enqueue_song(a))
    ok(client.enqueue_song(b))  # a file not yet loaded: loaded, then enqueued
    with cluster.watch() as w:
        wait_for(
            lambda: (
                all(
                    ha in s.get("songs", []) and hb in s.get("songs", [])
                    for s in w.node_states().values()
                )
                and len(w.node_states()) == 3
            ),
            10,
            "all nodes to hold both songs",
        )
    status = ok(client.status())
    assert status["state"]["playlist"] == [ha, hb]
    assert status["state"]["playback"] == "idle"

    ok(client.play())
    time.sleep(0.8)
    ok(client.pause())
    st = ok(client.status())["state"]
    assert st["playback"] == "paused"
    paused_at = st["position"]
    time.sleep(0.3)
    ok(client.play())  # resume
    time.sleep(0.5)
    ok(client.seek(2.5))
    time.sleep(0.5)
    ok(client.forward())
    time.sleep(0.6)
    assert ok(client.status())["state"]["song"] == hb
    ok(client.backward())  # early in B: back to A from its start
    time.sleep(0.6)
    assert ok(client.status())["state"]["song"] == ha
    ok(client.volume(30))
    assert ok(client.status())["state"]["volume"] == 30
    ok(client.volume("+5"))
    ok(client.stop())
    st = ok(client.status())["state"]
    assert (st["playback"], st["volume"], st["position"]) == ("idle", 35, 0.0)
    time.sleep(0.3)  # the stop instant lies a lead time ahead

    ra = assert_in_sync(cluster, ha)
    rb = assert_in_sync(cluster, hb)
    # A: play from 0, paused, resumed where it paused, then a seek to 2.5 s, later A again from 0
    tolerance = RATE * SKEW_TOLERANCE_NS // 1_000_000_000
    assert ra[0][0] == 0 and abs(ra[1][0] - ra[0][1]) <= tolerance, ra  # resumed where it paused
    assert abs(ra[0][1] / RATE - paused_at) < 0.05
    assert ra[2][0] == int(2.5 * RATE)
    assert ra[-1][0] == 0 and len(ra) == 4
    assert rb[0][0] == 0 and len(rb) == 1
    # nothing plays after the stop
    for blocks in logs(cluster).values():
        assert blocks[-1].t_ns < time.monotonic_ns()


@pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg not installed")
def test_an_mp3_is_decoded_by_every_node_and_plays_in_sync(
    cluster: NodeCluster, client: NSyncClient, tmp_path: Path
) -> None:
    """The path most songs take: ffmpeg decoding streamed to each node's PCM cache."""
    path = tmp_path / "Tone.mp3"
    path.write_bytes(make_tone_mp3(2.0, 523.25, "Mp3 Tone", "Tester"))
    song = ok(client.load_song(path))["params"]["song"]
    ok(client.enqueue_song(song))
    frames = {}
    for node in cluster.specs:
        cache = cluster.workdir / node / "pcm"
        found = wait_for(lambda c=cache: list(c.glob(f"{song}.*.pcm")), 10, f"{node}'s PCM")
        frames[node] = int(found[0].name.split(".")[1])
    assert len(set(frames.values())) == 1, frames  # the same frames everywhere
    assert abs(frames["n1"] - 2 * RATE) < 2048  # encoder padding
    st = ok(client.status())["state"]
    assert (st["title"], st["artist"]) == ("Mp3 Tone", "Tester")
    ok(client.play())
    time.sleep(1.0)
    ok(client.stop())
    time.sleep(0.3)  # the stop instant lies a lead time ahead
    (played,) = assert_in_sync(cluster, song)
    assert played[0] == 0 and played[1] > RATE // 2


def test_song_end_advances_to_next(
    cluster: NodeCluster, client: NSyncClient, tmp_path: Path
) -> None:
    short = tone_file(tmp_path, "Short", 1.2, 500.0)
    nxt = tone_file(tmp_path, "Next", 2.0, 700.0)
    ok(client.enqueue_song(short))
    ok(client.enqueue_song(nxt))
    ok(client.play())
    hn = sha224_file(nxt)
    wait_for(lambda: client.status()["state"]["song"] == hn, 10, "the next song to start")
    time.sleep(2.5)
    st = ok(client.status())["state"]
    assert st["playback"] == "idle" and st["song"] is None  # the playlist ended
    hs = sha224_file(short)
    rs = assert_in_sync(cluster, hs)
    assert rs[0][:2] == (0, int(1.2 * RATE))  # every frame of the short song was played
    rn = assert_in_sync(cluster, hn)
    assert rn[0][:2] == (0, int(2.0 * RATE))
    # and after the end: play starts the playlist again from the top
    ok(client.play())
    assert ok(client.status())["state"]["song"] == hs
    ok(client.stop())


def test_speaker_that_missed_commands_resyncs(
    cluster: NodeCluster, client: NSyncClient, tmp_path: Path
) -> None:
    with cluster.watch() as w:
        states = cluster.wait_ready()
        master = next(n for n, s in states.items() if s.get("role") == "master")
        speaker = next(n for n in cluster.specs if n != master)
        songs = [tone_file(tmp_path, f"S{i}", 1.0, 300.0 + 50 * i) for i in range(3)]
        ok(client.load_song(songs[0]))
        assert cluster.stop_node(speaker) == 0
        for s in songs:
            ok(client.enqueue_song(s))  # the two others are a quorum
        cluster.start_node(speaker)  # back with none of the enqueues applied

        def caught_up() -> bool:
            states = w.node_states()
            return (
                states.get(speaker, {}).get("playlist_hash") == states[master]["playlist_hash"]
                and states[speaker].get("index") == states[master]["index"]
                and not states[speaker].get("recovering")
                and (states[speaker].get("clock") or {}).get("calibrated")
            )

        wait_for(caught_up, 15, f"{speaker} to pull the master's playlist")
        assert "pulling the master's state" in cluster.node_log(speaker).read_text()
        ok(client.play())  # and the resynced speaker takes part
        time.sleep(1.5)
        assert_in_sync(cluster, sha224_file(songs[0]))


def test_store_evicts_least_recently_used_but_never_the_playlist(
    cluster: NodeCluster, client: NSyncClient, tmp_path: Path
) -> None:
    a, b, c = (
        tone_file(tmp_path, name, 3.5, f) for name, f in (("EA", 400), ("EB", 500), ("EC", 600))
    )
    ok(client.enqueue_song(a))  # in the playlist: protected
    ok(client.load_song(b))  # 1.2 MB held: over the 1 MB cap, but b just arrived
    ok(client.load_song(c))  # 1.8 MB: b, used least recently and not in the playlist, goes
    ha, hb, hc = map(sha224_file, (a, b, c))
    with cluster.watch() as w:

        def evicted() -> bool:
            states = w.node_states()
            return len(states) == 3 and all(
                {ha, hc} <= set(s["songs"]) and hb not in s["songs"] for s in states.values()
            )

        wait_for(evicted, 10, "every node to evict the unprotected song")
    refused = client.enqueue_song(hb)
    assert not refused["success"] and "not loaded" in refused["msg"], refused
    # a file that turns out not to play evicts nothing: c (least recently used now) stays
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(random.Random(5).randbytes(700_000))
    hj = sha224_file(junk)
    refused = client.load_song(junk)
    assert not refused["success"], refused
    with cluster.watch() as w:

        def junk_gone() -> bool:
            states = w.node_states()
            return len(states) == 3 and all(hj not in s["songs"] for s in states.values())

        wait_for(junk_gone, 10, "every node to drop the unplayable file")
        assert all({ha, hc} <= set(s["songs"]) for s in w.node_states().values())


def test_a_restarted_cluster_remembers_its_playlist_and_terms(
    cluster: NodeCluster, client: NSyncClient, tmp_path: Path
) -> None:
    a = tone_file(tmp_path, "Kept A", 3.0, 440.0)
    b = tone_file(tmp_path, "Kept B", 3.0, 550.0)
    t0 = time.time()
    ok(client.enqueue_song(a))
    ok(client.enqueue_song(b))
    ok(client.play())
    time.sleep(0.5)
    before = ok(client.status())["state"]
    client.close()
    terms = {n: json_state(cluster, n)["term"] for n in cluster.specs}
    for node in list(cluster.specs):
        assert cluster.stop_node(node) == 0
    for node in cluster.specs:
        doc = json_state(cluster, node)
        assert doc["term"] == terms[node]  # on disk as it was
        state = doc["state"]
        assert isinstance(state, dict) and state["index"] >= 3  # two enqueues and a play
        last_term, last_index = doc["last_log"]  # type: ignore[misc]
        assert 1 <= last_term <= terms[node] and last_index == state["index"]
        assert isinstance(doc["last_log_at"], float) and t0 <= doc["last_log_at"] <= time.time()
    cluster.start()
    cluster.wait_ready()
    with contextlib.closing(cluster.client(timeout=5.0)) as again:
        after = ok(again.status())["state"]
        assert after["playlist"] == before["playlist"]
        assert (after["playback"], after["song"]) == ("paused", before["song"])
        assert after["term"] > max(terms.values())  # a new election, in a later term
        ok(again.play())  # and it plays on from where it was
        time.sleep(0.5)
        assert ok(again.status())["state"]["playback"] == "playing"


def json_state(cluster: NodeCluster, node: str) -> dict[str, object]:
    """The durable state ``node`` keeps on disk (snapshot and log), as a document."""
    from nsync_mqtt.persist import StateFile

    return StateFile(cluster.workdir / node / "state.json").read().to_dict()
