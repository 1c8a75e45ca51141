"""A speaker whose broker link is cut stops playing once no election can include it, keeps the
others playing, and rejoins the current song in sync when its link comes back."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsync_lab.faultproxy import FaultProxy
from nsync_lab.testing import (
    BrokerProcess,
    NodeCluster,
    NodeSpec,
    RawClient,
    ok,
    ready_cluster,
    tone_file,
    unique_cluster_name,
    unsealed,
    wait_for,
)
from nsync_mqtt import sinklog
from nsync_mqtt.playlist import RATE
from nsync_mqtt.replication import sha224_file
from nsync_mqtt.speaker import BROKER_FAILOVER_GRACE_S
from nsync_mqtt.timing import Timing

pytestmark = pytest.mark.integration


@pytest.fixture
def proxied(
    cluster_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[NodeCluster, FaultProxy]]:
    broker: BrokerProcess = request.getfixturevalue(f"{cluster_kind}_broker")
    with FaultProxy("127.0.0.1", broker.port) as proxy:
        specs = [
            NodeSpec("n1"),
            NodeSpec("n2", clock_offset=900.0, clock_drift_ppm=20.0),
            NodeSpec("n3", clock_offset=-77.0, broker_url=f"mqtt://127.0.0.1:{proxy.port}"),
        ]
        nodes = NodeCluster(broker.url, tmp_path / "c", specs, cluster=unique_cluster_name())
        with ready_cluster(nodes) as c:
            yield c, proxy


def test_cut_off_speaker_stops_then_rejoins_in_sync(
    proxied: tuple[NodeCluster, FaultProxy], tmp_path: Path
) -> None:
    cluster, proxy = proxied
    with cluster.watch() as w:
        master = next(n for n, s in cluster.wait_ready().items() if s.get("role") == "master")
        if master == "n3":  # the cut-off node must be a speaker: hand mastership over
            cluster.stop_node("n3")
            cluster.wait_ready()
            cluster.start_node("n3")
            cluster.wait_ready()
        client = cluster.client(timeout=5.0)
        song = tone_file(tmp_path, "Through a cut", 12.0, 440.0)
        ok(client.enqueue_song(song))
        ok(client.play())
        time.sleep(1.5)
        proxy.cut()
        t_cut = time.monotonic_ns()
        # n3 hears nobody: no election can include it, so it stops playing
        # no master after an election timeout, then the broker's turn, then it gives up
        give_up_s = 2 * Timing().election_timeout_max_s + BROKER_FAILOVER_GRACE_S
        cut_window = give_up_s + 1.5
        time.sleep(cut_window)
        ok(client.status())  # the other two still form a cluster
        proxy.heal()
        t_heal = time.monotonic_ns()

        def rejoined() -> bool:
            s = w.node_states(live_only=True).get("n3") or {}
            return bool(s.get("master")) and not s.get("recovering")

        wait_for(rejoined, 20, "n3 to rejoin")
        time.sleep(1.5)
        client.close()
    h = sha224_file(song)
    logs = {n: sinklog.read_log(cluster.sink_log(n)) for n in cluster.specs}
    n3 = [b for b in logs["n3"] if b.song == h]
    during = [b for b in n3 if t_cut + (give_up_s + 0.3) * 1e9 < b.t_ns < t_heal]
    assert not during, "n3 kept playing while cut off from every other node"
    after = [b for b in n3 if b.t_ns > t_heal]
    assert after, "n3 never played again after its link came back"
    for n in ("n1", "n2"):
        blocks = [b for b in logs[n] if b.song == h]
        assert sinklog.gaps_ns(blocks) == [], f"{n} had a gap though it was never cut off"
    frames = [after[0].frame + RATE // 2, after[0].frame + RATE]
    skew = sinklog.max_skew(logs, h, frames)
    assert skew is not None and skew < 5_000_000, f"n3 rejoined {skew} ns off"


def test_a_speaker_restarted_with_an_empty_data_dir_is_sent_its_songs_and_rejoins(
    proxied: tuple[NodeCluster, FaultProxy], tmp_path: Path
) -> None:
    """The restarted speaker tells the master which songs it holds (none); the master sends it
    the playlist's songs unasked, and the speaker plays the current one in sync."""

    cluster, _ = proxied
    states = cluster.wait_ready()
    speaker = next(n for n, s in states.items() if s.get("role") != "master" and n != "n3")
    playing = tone_file(tmp_path, "Playing", 12.0, 440.0)
    queued = tone_file(tmp_path, "Queued", 4.0, 660.0)
    songs = {sha224_file(playing), sha224_file(queued)}
    client = cluster.client(timeout=5.0)
    ok(client.enqueue_song(playing))
    ok(client.enqueue_song(queued))
    ok(client.play())
    time.sleep(1.0)
    cluster.stop_node(speaker, signal.SIGKILL)
    shutil.rmtree(cluster.workdir / speaker)
    wants = RawClient(
        cluster.broker_url, cluster.cluster, [f"nsync/{cluster.cluster}/internal/want"]
    )
    try:
        with cluster.watch() as w:
            t_restart = time.monotonic_ns()
            cluster.start_node(speaker)

            def recovered() -> dict[str, object] | None:
                s = w.node_states(live_only=True).get(speaker) or {}
                rec = s.get("recovery")
                held = set(s.get("songs") or [])
                return s if isinstance(rec, dict) and "songs_ms" in rec and songs <= held else None

            wait_for(recovered, 20, f"{speaker} to hold both songs again")
        asked = [json.loads(unsealed(m.payload)) for m in wants.since(0)]
        assert not [m for m in asked if m.get("src") == speaker], "the songs came unasked"
    finally:
        wants.close()
    time.sleep(1.5)
    client.close()
    h = sha224_file(playing)
    logs = {n: sinklog.read_log(cluster.sink_log(n)) for n in cluster.specs}
    after = [b for b in logs[speaker] if b.song == h and b.t_ns > t_restart]
    assert after, f"{speaker} never played again after its restart"
    frames = [after[0].frame + RATE // 2, after[0].frame + RATE]
    skew = sinklog.max_skew(logs, h, frames)
    assert skew is not None and skew < 5_000_000, f"{speaker} rejoined {skew} ns off"


def test_a_song_whose_sender_died_mid_transfer_is_asked_for_again(
    proxied: tuple[NodeCluster, FaultProxy], tmp_path: Path
) -> None:
    """The master pushing songs to a recovered speaker is killed right after its answer. The
    speaker, now in step with the next master (or the next master itself: its state is as
    recent as the other survivor's), notices that playlist songs it lacks make no progress
    and asks a node that holds them for the chunks it still misses."""

    cluster, _ = proxied
    states = cluster.wait_ready()
    master = next(n for n, s in states.items() if s.get("role") == "master")
    speaker = next(n for n in cluster.specs if n != master)
    playing = tone_file(tmp_path, "Now", 50.0, 440.0)  # ~8.8 MB each: 34 chunks
    queued = tone_file(tmp_path, "Next", 50.0, 660.0)
    client = cluster.client(timeout=10.0)
    ok(client.enqueue_song(playing))
    ok(client.enqueue_song(queued))
    ok(client.play())
    client.close()
    time.sleep(0.5)
    cluster.stop_node(speaker, signal.SIGKILL)
    shutil.rmtree(cluster.workdir / speaker)
    answers = RawClient(
        cluster.broker_url, cluster.cluster, [f"nsync/{cluster.cluster}/internal/to/{speaker}"]
    )
    try:
        cluster.start_node(speaker)
        answers.wait(lambda m: b'"t":"sync"' in m.payload, "the master's sync", timeout_s=15)
        cluster.stop_node(master, signal.SIGKILL)  # mid-push: most chunks never leave it
    finally:
        answers.close()
    next_song = sha224_file(queued)
    with cluster.watch() as w:

        def holds_both() -> bool:
            s = w.node_states(live_only=True).get(speaker) or {}
            return {sha224_file(playing), next_song} <= set(s.get("songs") or [])

        wait_for(holds_both, 30, f"{speaker} to hold both songs")
    log_text = cluster.node_log(speaker).read_text(errors="replace")
    assert f"no progress on {next_song[:12]}… for" in log_text


def test_a_damaged_song_file_found_at_start_is_fetched_again_not_played_short(
    proxied: tuple[NodeCluster, FaultProxy], tmp_path: Path
) -> None:
    """A power cut left a speaker's song file with the right size and the wrong bytes, and its
    decoded audio gone: the restarted speaker notices before decoding, drops the file, fetches
    the song again and plays it whole."""
    cluster, _ = proxied
    states = cluster.wait_ready()
    speaker = next(n for n, s in states.items() if s.get("role") != "master" and n != "n3")
    path = tone_file(tmp_path, "Damaged", 8.0, 440.0)
    song = sha224_file(path)
    client = cluster.client(timeout=5.0)
    ok(client.enqueue_song(path))
    time.sleep(1.0)
    cluster.stop_node(speaker)
    stored = cluster.workdir / speaker / "store" / "songs" / song
    size = stored.stat().st_size
    stored.write_bytes(b"\0" * size)  # the size a preallocated transfer has, and no audio
    shutil.rmtree(cluster.workdir / speaker / "pcm")
    with cluster.watch() as w:
        cluster.start_node(speaker)

        def whole_again() -> dict[str, object] | None:
            s = w.node_states(live_only=True).get(speaker) or {}
            faults = s.get("faults") or {}
            held = set(s.get("songs") or [])
            back = song in held and stored.is_file() and sha224_file(stored) == song
            return s if back and any("damaged song file" in k for k in faults) else None

        wait_for(whole_again, 30, f"{speaker} to fetch the damaged song again")
    ok(client.play())
    time.sleep(1.5)
    client.close()
    blocks = [b for b in sinklog.read_log(cluster.sink_log(speaker)) if b.song == song]
    assert blocks, f"{speaker} did not play the song fetched again"
