"""Junk on every topic a node subscribes to, against a real 3-node cluster (amqtt and Mosquitto):
the master keeps heartbeating and keeps its term, commands still succeed, the player state is
what it was, and the nodes count what they refused instead of dying or logging every message.
Run on a signing cluster (the recommended set-up: junk on the internal topics is refused before
it is parsed) and on one without a key (every message's body is checked)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nsync_lab.testing import (
    BrokerProcess,
    NodeCluster,
    RawClient,
    Watcher,
    ok,
    player_state,
    ready_cluster,
    unique_cluster_name,
    unsealed,
    wait_for,
)
from nsync_mqtt.client import NSyncClient
from nsync_mqtt.limits import PAYLOAD_LIMITS
from nsync_mqtt.messages import Topics, encode_chunk

pytestmark = pytest.mark.integration

SONG = "ab" * 28

RAW_JUNK: list[bytes] = [
    b"",
    b"\x00\xff\xfe",
    b"not json",
    b"[]",
    b"null",
    b"1e999",
    b"NaN",
    b'"a string"',
    b"[" * 50_000 + b"]" * 50_000,  # nested past the JSON parser's recursion limit
    b'{"v": 1}',
    b'{"v": 2, "t": "hb", "src": "n1", "term": 1}',
    b'{"v": 1, "t": "hb", "src": "../../etc", "term": 1}',
    b'{"v": 1, "t": "hb", "src": "n1", "term": -1}',
    b'{"v": 1, "t": "hb", "src": "n1", "term": true}',
    b'{"v": 1, "t": "hb", "src": "n1", "term": 1.5}',
    '{"v": 1, "t": "\u00e9\u6f22", "src": "n2", "term": 0}'.encode(),
]

# well-formed envelopes from real peers, with bodies that are not: at the current term (so they
# reach the handlers) and at a huge one (which must not depose the master)
BAD_BODIES: dict[str, list[dict[str, Any]]] = {
    "hb": [{"index": "x"}, {"index": 1, "log_term": 1, "plist": 5}, {}],
    "vote_req": [{"last_log": "x"}, {"last_log": [1]}, {"last_log": [True, 2]}, {}],
    "prevote_req": [{"next_term": "9", "last_log": [0, 0]}, {"next_term": 2}],
    "prevote": [{"pre_term": None, "granted": "yes"}],
    "vote": [{"granted": 1}],
    "ping": [{"t1": "x"}, {"t1": None}, {}],
    "pong": [{"t1": "x", "t2": 1, "t3": 2}, {"t1": 1e308, "t2": [], "t3": 2}],
    "op": [{"op": "x"}, {"op": {"index": "1"}}, {"op": {"op": "volume", "index": 10**12}}],
    "ack": [{"index": "x", "ok": True}, {"ok": "yes"}, {"ok": True, "index": 1}],
    "sync_req": [{"songs": "x"}, {"songs": [1, 2]}, {"songs": [], "partial": {"x": 1}}],
    "sync": [{"state": "x"}, {"state": {"playlist": 5}}],
    "want": [{"song": 5}, {"song": SONG, "missing": ["a"]}, {"song": SONG, "from": 7}],
    "offer": [{"manifest": "x"}, {"manifest": {"song": SONG, "size": -1, "chunk_size": 1}}],
    "finished": [{"slot": "x", "song": SONG}, {"slot": 0, "song": "nope"}],
    "no_such_type": [{}],
}

NODE_STATE_JUNK: list[bytes] = [
    b"not json",
    b"[1, 2]",
    b'{"clock": "x"}',  # a string where the clock object belongs
    b'{"clock": {"rtt_p90_s": "slow"}}',
    b'{"clock": {"rtt_p90_s": -1}}',
    b'{"clock": {"rtt_p90_s": NaN}}',
    b'{"songs": 5}',
    b'{"songs": ["nope"]}',
    b'{"songs": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}",
]


@pytest.fixture(scope="module", params=["signed", "unsigned"])
def cluster(
    cluster_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeCluster]:
    broker: BrokerProcess = request.getfixturevalue(f"{cluster_kind}_broker")
    nodes = NodeCluster.of(
        broker.url,
        tmp_path_factory.mktemp("cluster"),
        3,
        cluster=unique_cluster_name(),
        signed=request.param == "signed",
    )
    with ready_cluster(nodes) as c:
        yield c


@pytest.fixture
def raw(cluster: NodeCluster) -> Iterator[RawClient]:
    topics = Topics(cluster.cluster)
    subscriptions = [f"{topics.base}/reply/#", topics.internal("hb")]
    with RawClient(cluster.broker_url, cluster.cluster, subscriptions) as r:
        yield r


def heartbeats_from(raw: RawClient, master: str, since: int) -> list[int]:
    out = []
    for m in raw.since(since):
        if m.topic == raw.topics.internal("hb"):
            doc = json.loads(unsealed(m.payload))
            if doc.get("src") == master:
                out.append(doc["term"])
    return out


def test_junk_on_every_subscribed_topic_changes_nothing(
    cluster: NodeCluster, client: NSyncClient, raw: RawClient, watcher: Watcher
) -> None:
    ok(client.volume(37))
    before = player_state(raw)
    master, term = before["master"], before["term"]
    others = [n for n in cluster.specs if n != master]
    t = raw.topics

    internal = [
        "hb", "vote_req", "prevote_req", "op", "offer", "ping", "ack", "sync_req",
        "finished", "want", "chunk/all",
        *(f"to/{n}" for n in cluster.specs),
        *(f"chunk/{n}" for n in cluster.specs),
    ]  # fmt: skip
    for name in internal:
        for payload in RAW_JUNK:
            raw.publish(t.internal(name), payload)
    for name in ("chunk/all", *(f"chunk/{n}" for n in cluster.specs)):
        raw.publish(t.internal(name), encode_chunk({"song": 5}, b"data"))
        raw.publish(t.internal(name), b"NSC1\xff\xff\xff\xff{}")
    for type_, bodies in BAD_BODIES.items():
        for body in bodies:
            for src in [*others, master]:
                for junk_term in (term, 10**9):
                    env = {"v": 1, "t": type_, "src": src, "term": junk_term, **body}
                    topic = "hb" if type_ == "no_such_type" else type_
                    raw.publish(t.internal(topic), json.dumps(env))
                    raw.publish(t.internal(f"to/{master}"), json.dumps(env))
    for node in cluster.specs:
        for payload in NODE_STATE_JUNK:
            raw.publish(t.node_state(node), payload, retain=True)
    for payload in RAW_JUNK:
        raw.publish(t.upload, payload)
        raw.publish(t.cmd("volume"), payload)
        raw.publish(t.cmd("no-such-verb"), payload)
    # over the size limits: dropped before they are read (no reply), counted as rejected
    pad = b"x" * PAYLOAD_LIMITS["command"]
    raw.publish(t.cmd("status"), b'{"reply_to": "oversize", "pad": "' + pad + b'"}')
    raw.publish(t.internal("want"), b"x" * (PAYLOAD_LIMITS["internal"] + 1))

    # the master goes on heartbeating, in the same term
    mark = raw.mark()
    wait_for(lambda: len(heartbeats_from(raw, master, mark)) >= 10, 5.0, "ten heartbeats")
    assert set(heartbeats_from(raw, master, mark)) == {term}
    assert sorted(cluster.alive()) == sorted(cluster.specs), cluster.logs_tail()
    # commands still succeed, and nothing the junk said was taken
    assert player_state(raw) == before
    ok(client.volume(38))
    assert player_state(raw)["volume"] == 38
    ok(client.volume(37))
    # each node published its own state again over the junk, and counts what it refused
    time.sleep(1.5)
    states = watcher.node_states()
    assert set(states) >= set(cluster.specs), states
    faults = states[master].get("faults", {})
    for node in cluster.specs:
        assert states[node]["signed"] is (cluster.key_file is not None)
        if cluster.key_file is not None:  # refused before it was read
            assert states[node]["rejected"].get("unsigned", 0) >= len(RAW_JUNK), states[node]
        for kind in ("command", "internal"):
            assert states[node]["rejected"].get(f"oversize {kind} message", 0) >= 1, states[node]
    assert not [m for m in raw.since(0) if m.topic == t.reply("oversize")]
    if cluster.key_file is None:
        assert faults.get("bad internal message/ProtocolError", 0) > 0, faults
    assert faults.get("bad node state/ProtocolError", 0) > 0, faults
    unexpected = {k: v for s in states.values() for k, v in s.get("faults", {}).items()
                  if not k.endswith("/ProtocolError")}  # fmt: skip
    assert unexpected == {}, unexpected
