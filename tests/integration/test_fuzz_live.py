"""Property-based fuzzing (nsync_lab.fuzz, hypothesis) of every topic a real node subscribes
to, against a signed 3-node cluster on the embedded amqtt broker and on Mosquitto (which drops
a client publishing to a topic with control characters: those inputs are skipped there): a
few hundred inputs of
every kind (internal topics, chunk frames, uploads, commands, node states, Home Assistant's
status; raw bytes, wrong types, huge numbers, deep nesting, unicode, path-like names, messages
forged with a wrong key, replays of real ones). Afterwards the same master in the same term,
state files, playlist and song store as before, every command with a reply_to refused with a
message, the nodes alive, nothing but refused input in their fault counts, what they refused
counted by reason; and a real command still succeeds. The long profile (>= 10,000 inputs) is
bench/bench_fuzz.py; tests/integration/test_junk.py holds the hand-written cases."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsync_lab.fuzz import batches, flatten, live_fuzzer, sample
from nsync_lab.testing import (
    BrokerProcess,
    NodeCluster,
    ok,
    ready_cluster,
    unique_cluster_name,
)

pytestmark = pytest.mark.integration

BATCHES = 20  # of 15-30 inputs: about 500 in all
SEED = 11


@pytest.fixture(scope="module")
def cluster(
    cluster_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeCluster]:
    broker: BrokerProcess = request.getfixturevalue(f"{cluster_kind}_broker")
    nodes = NodeCluster.of(
        broker.url,
        tmp_path_factory.mktemp("fuzz"),
        3,
        cluster=unique_cluster_name(),
        signed=True,
        settings={"max_song_mb": 2, "max_song_minutes": 1},
    )
    with ready_cluster(nodes) as c:
        yield c


def test_fuzzed_junk_on_every_subscribed_topic_changes_nothing(
    cluster: NodeCluster, cluster_kind: str, tmp_path: Path
) -> None:
    with live_fuzzer(cluster, tmp_path, cluster_kind == "mosquitto") as (fz, client, raw):
        assert len(fz.ctx.captured) > 20 and fz.ctx.playlist_len == 2
        inputs = flatten(x for b in sample(batches(fz.ctx, 30), BATCHES, SEED) for x in b)
        fz.feed(inputs)
        problems = fz.finish()
        t = fz.tally
        print(json.dumps({k: v for k, v in t.as_dict().items() if k != "problems"}))
        assert problems == [], "\n".join(map(str, problems))

        # the junk went everywhere a node listens, and was refused for what it was
        assert t.inputs >= 150
        assert t.replies_checked >= 10
        kinds = {k.split()[0] for k in t.by_kind}
        assert {"internal", "replay", "node", "chunk", "unknown", "bad"} <= kinds, t.by_kind
        rejected = fz.rejected()
        for reason in ("unsigned", "bad signature", "not a peer", "replayed"):
            assert rejected.get(reason, 0) > fz.rejected_before.get(reason, 0), rejected

        # and a real command still succeeds
        ok(client.volume(38))
        assert raw.request("status")["state"]["volume"] == 38
        ok(client.volume(37))
