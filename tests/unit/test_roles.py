"""The node's pure roles (speaker.Speaker, master.Master) driven by hand: literal times, a
synchronous in-test message router, no sockets, no disk, no threads."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import deque
from typing import Any

import pytest

from nsync_lab.memlib import MemoryLibrary
from nsync_mqtt.effects import PLAY, RETIME, Effects, Publish
from nsync_mqtt.messages import Topics, decode, encode
from nsync_mqtt.persist import Durable
from nsync_mqtt.speaker import Speaker
from nsync_mqtt.timing import Timing

SONG = "a" * 56
TOPICS = Topics("t")
PEERS = ["a", "b", "c"]


def make(node: str, lib: MemoryLibrary | None = None, now: float = 0.0) -> Speaker:
    lib = lib or MemoryLibrary()
    lib.add(SONG, seconds=30.0, title="Song A")
    return Speaker(
        node,
        PEERS,
        "t",
        Timing(),
        lib,
        random.Random(node),
        now,
        Durable(),
        chunk_size=1024,
        max_song_bytes=10 << 20,
        wall=lambda: 1.7e9,
    )


class Net:
    """Delivers every internal message at once, in order; records the rest."""

    def __init__(self, nodes: dict[str, Speaker]) -> None:
        self.nodes = nodes
        self.public: list[Publish] = []
        self.persists: dict[str, int] = dict.fromkeys(nodes, 0)
        self.now = 0.0
        self.held: set[str] = set()  # nodes whose internal messages in are dropped

    def run(self, node: str, eff: Effects) -> None:
        queue: deque[tuple[str, Effects]] = deque([(node, eff)])
        while queue:
            src, e = queue.popleft()
            out = list(e.early)
            if e.persist:
                self.persists[src] += 1
                saved = self.nodes[src].persisted(self.now)
                out += e.out
                queue.append((src, saved))
            else:
                out += e.out
            for p in out:
                queue.extend(self._route(src, p))

    def _route(self, src: str, p: Publish) -> list[tuple[str, Effects]]:
        base = TOPICS.internal("")
        if not p.topic.startswith(base) or p.topic.startswith(base + "xfer/"):
            self.public.append(p)
            return []
        name = p.topic[len(base) :]
        targets = [name[3:]] if name.startswith("to/") else [n for n in self.nodes if n != src]
        return [
            (t, self.nodes[t].step(self.now, p.payload))
            for t in targets
            if t in self.nodes and t not in self.held
        ]

    def replies(self, reply_to: str) -> list[dict[str, Any]]:
        topic = TOPICS.reply(reply_to)
        return [json.loads(p.payload) for p in self.public if p.topic == topic]

    def elect(self, node: str) -> None:
        """Let ``node``'s election timeout fire first and carry the election through."""
        sp = self.nodes[node]
        for _ in range(4):
            self.now = sp.election.deadline() + 0.001
            self.run(node, sp.election_tick(self.now))
            if sp.master is not None:
                return
        raise AssertionError(f"{node} did not become master")


@pytest.fixture
def net() -> Net:
    n = Net({p: make(p) for p in PEERS})
    n.elect("a")
    return n


def command(net: Net, verb: str, body: dict[str, Any]) -> Effects:
    master = net.nodes["a"].master
    assert master is not None
    return master.command(net.now, verb, json.dumps({"reply_to": "cli", **body}).encode())


def test_an_elected_master_starts_its_term_with_an_operation_every_node_holds(net: Net) -> None:
    a = net.nodes["a"]
    assert a.master is not None and [n.master is None for n in net.nodes.values()].count(True) == 2
    assert {n.state.last for n in net.nodes.values()} == {(a.term, 1)}
    assert a.master.commits.commit_index == 1
    status = [p.payload for p in net.public if p.topic == TOPICS.status]
    assert status[-1] == b"online"


def test_the_master_sends_its_operation_before_its_save_and_answers_after_f_plus_1(
    net: Net,
) -> None:
    a = net.nodes["a"]
    eff = command(net, "enqueue", {"song": SONG})
    assert [decode(p.payload).type for p in eff.early] == ["op"] and eff.persist
    assert net.replies("cli") == []  # nothing answered before anything is saved
    net.held = {"b", "c"}  # no speaker hears the op: the master's own save is not enough
    net.run("a", eff)
    assert net.replies("cli") == [] and a.state.playlist == (SONG,)
    net.held = set()
    b = net.nodes["b"]
    eff_b = b.step(net.now, eff.early[0].payload)
    # a speaker saves before it acknowledges: the ack is in `out`, never in `early`
    assert eff_b.persist and eff_b.early == []
    assert [decode(p.payload).type for p in eff_b.out] == ["ack"]
    net.run("b", eff_b)
    (reply,) = net.replies("cli")
    assert reply["success"] and reply["command"] == "enqueue"


def test_a_speaker_schedules_its_sink_only_after_calibration(net: Net) -> None:
    net.run("a", command(net, "enqueue", {"song": SONG}))
    eff = command(net, "play", {})
    net.run("a", eff)
    b = net.nodes["b"]
    assert b.state.playback.state == "playing" and not b.est.calibrated
    # pings and pongs calibrate the estimate: the pending schedule goes to the sink then
    plans = []
    for _ in range(12):
        net.now += 0.01
        ping = b.ping(net.now)
        (p,) = ping.out
        pong = net.nodes["a"].step(net.now + 0.0005, p.payload, rx=net.now + 0.0005)
        got = b.step(net.now + 0.001, pong.out[0].payload, rx=net.now + 0.001)
        if got.sink is not None:
            plans.append(got.sink)
    # then every newer estimate maps the same schedule again: the sink steers onto it
    assert b.est.calibrated and [p.action for p in plans] == [PLAY] + [RETIME] * (len(plans) - 1)
    assert len(plans) > 1
    assert {(p.song, p.frame) for p in plans} == {(SONG, 0)}
    assert plans[-1].at == pytest.approx(b.est.to_local(b.state.playback.at), abs=1e-9)
    assert plans[-1].speed == 1.0 + b.est.rate_ppm * 1e-6


def test_only_a_pong_answering_one_of_this_nodes_pings_is_a_clock_sample(net: Net) -> None:
    """A pong must answer a ping this node sent, once: a forged one (a ping never sent), a
    duplicate and a late answer to a forgotten ping are counted, not used."""
    a, b = net.nodes["a"], net.nodes["b"]
    net.now += 0.01
    (p,) = b.ping(net.now).out
    real = a.step(net.now + 0.0005, p.payload, rx=net.now + 0.0005).out[0].payload
    forged = json.loads(real)
    forged["t1"] += 0.123  # answers a ping b never sent
    forged["t2"] += 5.0  # would pull b's clock 5 s
    b.step(net.now + 0.001, json.dumps(forged).encode(), rx=net.now + 0.001)
    assert b.stray_pongs == 1 and b.est.stats()["samples"] == 0
    b.step(net.now + 0.001, real, rx=net.now + 0.001)
    assert b.stray_pongs == 1 and b.est.stats()["samples"] == 1
    b.step(net.now + 0.002, real, rx=net.now + 0.002)  # the broker's duplicate
    assert b.stray_pongs == 2 and b.est.stats()["samples"] == 1


def test_a_higher_term_deposes_the_master_and_its_waiting_clients_hear_it(net: Net) -> None:
    a = net.nodes["a"]
    net.held = {"b", "c"}
    net.run("a", command(net, "volume", {"arg": 30}))  # waits for acks that never come
    other = "e" * 56
    load = {"song": other, "size": 5000, "chunk_size": 1024}
    net.run("a", command(net, "load", load))  # waits for the client's chunks
    xfer = [p for p in net.public if p.topic == TOPICS.internal("xfer/cli")]
    assert json.loads(xfer[-1].payload) == {"song": other, "missing": [0, 1, 2, 3, 4]}
    assert net.replies("cli") == []
    vote_req = encode("vote_req", "b", a.term + 5, last_log=[a.term, a.state.index])
    eff = a.step(net.now, vote_req)
    net.run("a", eff)
    assert a.master is None and a.term == net.nodes["a"].election.term
    assert eff.persist  # the new term is saved before anything is sent in it
    replies = {r["command"]: r for r in net.replies("cli")}
    assert set(replies) == {"volume", "load"} and not any(r["success"] for r in replies.values())
    assert "stepped down before f+1 nodes acknowledged" in replies["volume"]["msg"]
    assert "load again to resume" in replies["load"]["msg"]


def test_a_load_waits_for_the_bytes_then_for_f_plus_1_holders(net: Net) -> None:
    a = net.nodes["a"]
    new = "f" * 56
    net.run("a", command(net, "load", {"song": new, "size": 2048, "chunk_size": 1024}))
    assert net.replies("cli") == []
    lib = a.lib
    assert isinstance(lib, MemoryLibrary)
    lib.add(new, size=2048, title="New")
    net.run("a", a.song_arrived(net.now, new))
    assert net.replies("cli") == []  # held by the master alone
    net.run("a", a.node_state(net.now, "b", _peer_state([SONG, new])))
    (reply,) = net.replies("cli")
    assert reply["success"] and reply["msg"] == "loaded New on 2 nodes"


def test_a_load_whose_client_goes_quiet_fails_after_the_idle_timeout(net: Net) -> None:
    a = net.nodes["a"]
    net.run("a", command(net, "load", {"song": "9" * 56, "size": 3000, "chunk_size": 1024}))
    net.now += Timing().upload_idle_timeout_s - 0.01
    net.run("a", a.tick(net.now))
    assert net.replies("cli") == []
    net.now += 0.02
    net.run("a", a.tick(net.now))
    (reply,) = net.replies("cli")
    assert not reply["success"] and "received 0 of 3 chunks" in reply["msg"]


def test_junk_and_strangers_change_nothing_not_even_the_term(net: Net) -> None:
    b = net.nodes["b"]
    before = (b.term, b.state, b.election.master)
    for payload in (b"{", b"[]", encode("hb", "zz", 99), encode("op", "a", 99, op={"op": "x"})):
        eff = b.step(net.now, payload)
        assert eff.faults and not eff.persist and not eff.out
    assert (b.term, b.state, b.election.master) == before


def test_commands_have_one_reply_shape_and_unknown_verbs_name_the_known_ones(net: Net) -> None:
    net.run("a", command(net, "dance", {"client_req_id": 7}))
    (reply,) = net.replies("cli")
    assert set(reply) == {"success", "command", "params", "msg", "client_req_id"}
    assert reply["client_req_id"] == 7 and not reply["success"] and "play" in reply["msg"]


def _peer_state(songs: list[str]) -> Any:
    from nsync_mqtt.wire import PeerState

    return PeerState.parse(json.dumps({"songs": songs}).encode())


@pytest.mark.parametrize(
    ("verb", "body"),
    [
        ("remove", {"index": 1e308}),
        ("remove", {"index": [0]}),
        ("remove", {"index": -1}),
        ("move", {"from": None, "to": 0}),
        ("move", {"arg": "0 1 2"}),
        ("move", {"from": {"a": 1}, "to": "x"}),
        ("replace", {"song": 42}),
        ("replace", {}),
        ("announce", {"song": "z" * 56}),
        ("enqueue", {"song": SONG, "next": "yes"}),
        ("enqueue", {"song": SONG, "play": 1}),
        ("clear", {"arg": "everything"}),  # an argument clear ignores: succeeds or no-op
    ],
)
def test_bad_editing_commands_get_one_failure_reply_and_change_nothing(
    net: Net, verb: str, body: dict[str, Any]
) -> None:
    net.run("a", command(net, "enqueue", {"song": SONG}))
    before = {p: n.state for p, n in net.nodes.items()}
    net.run("a", command(net, verb, {"client_req_id": 9, **body}))
    (reply,) = [r for r in net.replies("cli") if r["client_req_id"] == 9]
    if verb == "clear":
        assert reply["success"] and all(n.state.playlist == () for n in net.nodes.values())
        return
    assert reply["success"] is False and reply["command"] == verb and reply["msg"], reply
    assert {p: n.state for p, n in net.nodes.items()} == before


def test_the_master_publishes_the_discovery_document_only_when_switched_on() -> None:
    def elected(prefix: str | None) -> list[Publish]:
        nodes = {p: make(p) for p in PEERS}
        nodes["a"].discovery_prefix = prefix
        n = Net(nodes)
        n.elect("a")
        return [p for p in n.public if p.topic.startswith("ha/")]

    (doc,) = elected("ha")
    assert doc.topic == "ha/device/nsync_t/config" and doc.retain
    assert set(json.loads(doc.payload)["components"]) >= {"nsync_t_play", "nsync_t_b_online"}
    assert elected(None) == []


def test_a_client_flooding_commands_is_told_to_slow_down_and_others_are_not(net: Net) -> None:
    from nsync_mqtt.limits import COMMAND_BURST

    master = net.nodes["a"].master
    assert master is not None
    for i in range(int(COMMAND_BURST) + 3):
        body = json.dumps({"reply_to": "flood", "client_req_id": i}).encode()
        net.run("a", master.command(net.now, "status", body))
    replies = net.replies("flood")
    assert [r["success"] for r in replies] == [True] * int(COMMAND_BURST) + [False] * 3
    assert "too many commands" in replies[-1]["msg"] and replies[-1]["client_req_id"] == (
        COMMAND_BURST + 2
    )
    net.run("a", command(net, "status", {"client_req_id": 1}))  # reply_to "cli": its own bucket
    assert net.replies("cli")[-1]["success"]
    net.now += 1.0  # the flood's bucket refills
    body = json.dumps({"reply_to": "flood", "client_req_id": "later"}).encode()
    net.run("a", master.command(net.now, "status", body))
    assert net.replies("flood")[-1]["success"]


def test_a_flood_under_a_new_name_for_every_command_meets_the_cap_on_all_clients(
    net: Net,
) -> None:
    from nsync_mqtt.limits import ALL_COMMAND_BURST

    master = net.nodes["a"].master
    assert master is not None
    n = int(ALL_COMMAND_BURST)
    for i in range(n + 2):
        body = json.dumps({"reply_to": f"r{i}", "client_req_id": i}).encode()
        net.run("a", master.command(net.now, "status", body))
    assert all(net.replies(f"r{i}")[-1]["success"] for i in range(n))
    for i in (n, n + 1):
        (refused,) = net.replies(f"r{i}")
        assert not refused["success"], refused
        assert "too many commands from all clients together" in refused["msg"]
    net.now += 0.01  # ten shared tokens back at 1,000 a second
    net.run("a", command(net, "status", {"client_req_id": 1}))
    assert net.replies("cli")[-1]["success"]


def test_finished_reports_keep_only_the_current_slots_song(net: Net) -> None:
    master = net.nodes["a"].master
    assert master is not None
    for slot in range(50):  # forged or stale reports of songs not playing
        master.count_finished(net.now, Effects(), "b", slot, "e" * 56)
    assert master.finished == {}


def test_uploads_in_progress_are_capped(net: Net) -> None:
    from nsync_mqtt.master import MAX_UPLOADS

    for i in range(MAX_UPLOADS + 1):
        song = f"{i:x}".rjust(56, "c")
        net.run("a", command(net, "load", {"song": song, "size": 2048, "client_req_id": i}))
    (refused,) = net.replies("cli")
    assert refused["client_req_id"] == MAX_UPLOADS and not refused["success"]
    assert "too many uploads" in refused["msg"]


def test_songs_named_in_peer_states_are_forgotten_once_no_one_holds_them() -> None:
    """A node state may list any hashes (it is not signed): a stream of states naming new songs
    each time leaves only what the peers hold now."""
    a = make("a")
    a.song_arrived(0.0, SONG)
    for i in range(50):
        junk = [f"{i:04d}{j:052d}" for j in range(20)]
        a.node_state(float(i), "b", _peer_state(junk))
        a.node_state(float(i), "c", _peer_state([SONG, *junk[:5]]))
    last = [f"{49:04d}{j:052d}" for j in range(20)]
    assert set(a.holders) == {SONG, *last}
    assert a.holders[SONG] == {"a", "c"} and a.holders[last[0]] == {"b", "c"}
    a.node_state(60.0, "b", _peer_state([]))
    a.node_state(60.0, "c", _peer_state([SONG]))
    assert a.holders == {SONG: {"a", "c"}}


def test_progress_on_songs_outside_the_playlist_is_forgotten_after_ten_minutes() -> None:
    from nsync_mqtt.speaker import SONG_PROGRESS_KEEP_S

    a = make("a")
    other = "b" * 56
    for i in range(100):  # chunks of songs that never complete
        a.chunk_progress(float(i), f"{i:056d}")
    a.chunk_progress(0.0, other)
    a.state = dataclasses.replace(a.state, playlist=(other,))
    a.tick(50.0)
    assert len(a.song_progress) == 101  # all recent
    a.tick(SONG_PROGRESS_KEEP_S + 100.5)
    assert set(a.song_progress) == {other}  # the playlist's song is kept: still wanted
