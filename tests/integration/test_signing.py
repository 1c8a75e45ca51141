"""A signing cluster on a shared broker (amqtt and Mosquitto): messages forged without the key,
or replayed from the bus, change nothing on any node, and are counted in the node states; a
client's chunks go only into an upload the master announced; the key file is checked."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsync_lab.testing import (
    NodeCluster,
    RawClient,
    Watcher,
    ok,
    player_state,
    tone_file,
    unsealed,
    wait_for,
)
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.messages import Topics, encode, encode_chunk
from nsync_mqtt.persist import StateFile
from nsync_mqtt.replication import Manifest, chunk_header, sha224_file
from nsync_mqtt.seal import Boot, Sealer

pytestmark = pytest.mark.integration


@pytest.fixture
def raw(cluster: NodeCluster) -> Iterator[RawClient]:
    """A client with broker access but no key: it hears every internal message."""
    topics = Topics(cluster.cluster)
    subscriptions = [topics.internal("#"), f"{topics.base}/reply/#"]
    with RawClient(cluster.broker_url, cluster.cluster, subscriptions) as r:
        yield r


def durable_terms(cluster: NodeCluster) -> dict[str, int]:
    return {n: StateFile(cluster.workdir / n / "state.json").read().term for n in cluster.specs}


def rejected(watcher: Watcher, cluster: NodeCluster) -> dict[str, dict[str, int]]:
    states = watcher.node_states(live_only=True)
    return {n: dict(states[n].get("rejected", {})) for n in cluster.specs if n in states}


def test_messages_forged_without_the_key_change_nothing(
    cluster: NodeCluster, client: NSyncClient, raw: RawClient, watcher: Watcher
) -> None:
    ok(client.volume(41))
    before = player_state(raw)
    master, term = before["master"], before["term"]
    terms = durable_terms(cluster)
    t = raw.topics
    wrong_key = bytes(32)
    forged = 0
    for src in cluster.specs:
        sealer = Sealer(wrong_key, cluster.cluster, src, Boot(10**6, "00000000"))
        big = term + 1000
        msgs = [
            ("hb", encode("hb", src, big, index=999, log_term=big, plist="0" * 56, lead=0)),
            ("vote_req", encode("vote_req", src, big, last_log=[big, 999])),
            ("op", encode("op", src, term, op={"op": "volume", "volume": 99, "index": 999})),
            (f"to/{master}", encode("ack", src, term, index=999, log_term=term, ok=True)),
        ]
        for node in cluster.specs:
            msgs.append((f"to/{node}", encode("pong", src, term, t1=1.0, t2=2.0, t3=3.0)))
        for name, payload in msgs:
            topic = t.internal(name)
            raw.publish(topic, sealer.seal(topic, payload))
            # the same, unsigned, and with a seal header copied but the body changed
            raw.publish(topic, payload)
            forged += 1
    time.sleep(1.0)
    assert player_state(raw) == before
    assert durable_terms(cluster) == terms
    ok(client.volume(42))
    assert player_state(raw)["volume"] == 42

    def counted() -> dict[str, dict[str, int]] | None:
        r = rejected(watcher, cluster)
        full = all(r.get(n, {}).get("bad signature", 0) >= 1 for n in cluster.specs)
        return r if full and len(r) == len(cluster.specs) else None

    r = wait_for(counted, 5.0, "the refusals in every node state")
    assert all(v.get("unsigned", 0) >= 1 for v in r.values()), r


def test_replayed_messages_change_nothing(
    cluster: NodeCluster, client: NSyncClient, raw: RawClient, watcher: Watcher
) -> None:
    """Everything the nodes sent while the volume went to 20 and back, sent again: the op that
    set 20 is refused as a replay; the volume stays, the term stays."""
    mark = raw.mark()
    ok(client.volume(20))
    ok(client.volume(43))
    time.sleep(0.3)
    captured = [m for m in raw.since(mark) if m.payload.startswith(b"NSS1 ")]
    ops = [m for m in captured if m.topic.endswith("/op")]
    assert any(b'"volume":20' in unsealed(m.payload) for m in ops), "no op captured"
    before = player_state(raw)
    for m in captured:
        raw.publish(m.topic, m.payload)
    time.sleep(1.0)
    assert player_state(raw) == before
    assert before["volume"] == 43

    def counted() -> dict[str, dict[str, int]] | None:
        r = rejected(watcher, cluster)
        replays = sum(v.get("replayed", 0) for v in r.values())
        return r if replays >= len(ops) else None

    wait_for(counted, 5.0, "the replays counted")


def test_client_chunks_go_only_into_an_announced_upload(
    cluster: NodeCluster, client: NSyncClient, raw: RawClient, watcher: Watcher, tmp_path: Path
) -> None:
    """Chunks on chunk/all for a song no load announced reserve nothing; a real load works."""
    path = tone_file(tmp_path, "Stray", 1.0, 330.0)
    data = path.read_bytes()
    song = sha224_file(path)
    manifest = Manifest(song, len(data), 64 * 1024)
    for i in range(manifest.n_chunks):
        start, length = manifest.chunk_span(i)
        frame = encode_chunk(chunk_header(manifest, i), data[start : start + length])
        raw.publish(raw.topics.internal("chunk/all"), frame)
    time.sleep(0.5)
    for node in cluster.specs:
        assert not list((cluster.workdir / node / "store").rglob(f"{song}*")), node
    r = wait_for(
        lambda: (
            (x := rejected(watcher, cluster))
            and all(v.get("chunk of no upload in progress", 0) > 0 for v in x.values())
            and x
        ),
        5.0,
        "the stray chunks counted",
    )
    assert len(r) == len(cluster.specs)
    ok(client.load_song(path))  # the chunked load, announced by the master, still works
    states = wait_for(
        lambda: (
            (s := watcher.node_states(live_only=True))
            and all(song in s.get(n, {}).get("songs", []) for n in cluster.specs)
            and s
        ),
        10.0,
        "every node to hold the song",
    )
    assert all(states[n]["signed"] for n in cluster.specs)


def nsync(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nsync_mqtt", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def test_keygen_and_a_key_file_open_to_others(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    done = nsync("keygen", str(key), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = nsync("keygen", str(key), cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    key.chmod(0o644)
    node = nsync(
        "node", "--id", "a", "--peers", "a", "--key-file", str(key), "--sink", "none",
        "--data-dir", str(tmp_path / "a"), "--broker", "mqtt://127.0.0.1:9",
        cwd=tmp_path,
    )  # fmt: skip
    assert node.returncode == 1
    assert f"chmod 600 {key}" in node.stderr
