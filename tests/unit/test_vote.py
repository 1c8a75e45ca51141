"""Election state machine: single nodes driven by hand, and small clusters on an in-test router."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from nsync_mqtt.errors import ConfigError
from nsync_mqtt.timing import Timing
from nsync_mqtt.vote import (
    BecameFollower,
    BecameMaster,
    Effect,
    Election,
    GrantPreVote,
    GrantVote,
    RequestPreVotes,
    RequestVotes,
    Role,
    SendHeartbeat,
)

# the literal times below are written for a heartbeat of 0.1 s and timeouts in [1.0, 2.0)
T = Timing(heartbeat_interval_s=0.1, election_timeout_min_s=1.0, election_timeout_max_s=2.0)
ABC = ["a", "b", "c"]


def node(node_id: str = "a", peers: list[str] = ABC, seed: int = 1, **kw: Any) -> Election:
    return Election(node_id, peers, T, random.Random(seed), now=0.0, **kw)


def candidate(node_id: str = "a", peers: list[str] = ABC, **kw: Any) -> Election:
    """A node that has just timed out, won its pre-vote and asked for votes."""
    e = node(node_id, peers, **kw)
    now = e.deadline()
    assert e.tick(now) == [RequestPreVotes(e.term + 1, e.last_log)]
    assert e.role is Role.PRECANDIDATE
    others = [p for p in peers if p != node_id]
    for p in others[: e.majority - 2]:
        assert e.on_prevote(now, p, e.term + 1, True) == []
    effects = e.on_prevote(now, others[e.majority - 2], e.term + 1, True)
    assert effects == [RequestVotes(e.term, e.last_log)]
    assert e.role is Role.CANDIDATE
    return e


@dataclass(frozen=True)
class Alive:
    """A follower's answer to a heartbeat (in NSync: its pings to the master)."""


@dataclass
class Cluster:
    """Election objects wired together by a message queue with a fixed one-way latency."""

    ids: list[str]
    seed: int
    latency_s: float = 0.005
    dead: set[str] = field(default_factory=set)
    now: float = 0.0
    nodes: dict[str, Election] = field(init=False)
    log: list[tuple[float, str, Effect]] = field(default_factory=list)
    _queue: list[tuple[float, int, str, str, Any]] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.nodes = {
            i: Election(i, self.ids, T, random.Random(f"{self.seed}-{i}"), now=0.0)
            for i in self.ids
        }

    def alive(self) -> list[Election]:
        return [n for i, n in self.nodes.items() if i not in self.dead]

    def masters(self) -> list[Election]:
        return [n for n in self.alive() if n.role is Role.MASTER]

    def _send(self, src: str, dst: str, msg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.now + self.latency_s, self._seq, src, dst, msg))

    def _carry_out(self, src: str, effects: list[Effect]) -> None:
        for eff in effects:
            self.log.append((self.now, src, eff))
            if isinstance(eff, (RequestPreVotes, RequestVotes, SendHeartbeat)):
                for dst in self.ids:
                    if dst != src:
                        self._send(src, dst, eff)
            elif isinstance(eff, (GrantPreVote, GrantVote)):
                self._send(src, eff.to, eff)

    def _deliver(self, src: str, dst: str, msg: Any) -> list[Effect]:
        n = self.nodes[dst]
        n.on_peer_alive(self.now, src)
        if isinstance(msg, RequestPreVotes):
            return n.on_prevote_request(self.now, src, msg.term, msg.last_log)
        if isinstance(msg, GrantPreVote):
            return n.on_prevote(self.now, src, msg.term, msg.granted)
        if isinstance(msg, RequestVotes):
            return n.on_vote_request(self.now, src, msg.term, msg.last_log)
        if isinstance(msg, SendHeartbeat):
            effects = n.on_heartbeat(self.now, src, msg.term)
            if n.master == src:
                self._send(dst, src, Alive())
            return effects
        if isinstance(msg, Alive):
            return []
        assert isinstance(msg, GrantVote)
        return n.on_vote(self.now, src, msg.term, msg.granted)

    def run_until(self, end: float, stop_on_master: bool = False) -> None:
        while True:
            next_tick = min(n.deadline() for n in self.alive())
            next_msg = self._queue[0][0] if self._queue else float("inf")
            t = min(next_tick, next_msg)
            if t > end:
                self.now = end
                return
            self.now = t
            if next_msg <= next_tick:
                _, _, src, dst, msg = heapq.heappop(self._queue)
                if dst not in self.dead:
                    self._carry_out(dst, self._deliver(src, dst, msg))
            else:
                for n in self.alive():
                    if n.deadline() <= t:
                        self._carry_out(n.node_id, n.tick(t))
            if stop_on_master and self.masters() and not self._queue:
                return

    def elect(self, end: float = 60.0) -> Election:
        self.run_until(end, stop_on_master=True)
        masters = self.masters()
        assert len(masters) == 1, f"no single master by {end} s"
        return masters[0]


# -- clusters --------------------------------------------------------------------------------


def test_three_nodes_elect_one_master_that_everyone_follows() -> None:
    c = Cluster(ABC, seed=7)
    m = c.elect()
    assert m.term == 1
    assert c.now < T.election_timeout_max_s + 0.1
    for n in c.alive():
        assert n.term == 1
        assert n.master == m.node_id
        if n is not m:
            assert n.role is Role.FOLLOWER
    became = [(src, e) for _, src, e in c.log if isinstance(e, BecameMaster)]
    assert became == [(m.node_id, BecameMaster(1))]
    # Followers were told who the master is.
    told = {src for _, src, e in c.log if e == BecameFollower(1, m.node_id)}
    assert told == set(ABC) - {m.node_id}


def test_master_keeps_its_term_while_heartbeats_flow() -> None:
    c = Cluster(ABC, seed=3)
    m = c.elect()
    c.run_until(c.now + 30.0)
    assert c.masters() == [m]
    assert all(n.term == m.term for n in c.alive())
    assert not any(isinstance(e, RequestVotes) and e.term > m.term for _, _, e in c.log)


def test_split_vote_resolves_in_a_later_term() -> None:
    c = Cluster(ABC, seed=11)
    # All three time out at once: each wins its pre-vote (no master anywhere), then votes for
    # itself, and nobody can win term 1.
    latest = max(n.deadline() for n in c.alive())
    c.now = latest
    for n in c.alive():
        c._carry_out(n.node_id, n.tick(latest))
    assert all(n.role is Role.PRECANDIDATE and n.term == 0 for n in c.alive())
    c.run_until(latest + 2 * c.latency_s + 0.001)
    assert all(n.role is Role.CANDIDATE and n.term == 1 for n in c.alive())
    c.run_until(latest + 0.05)
    assert c.masters() == []
    refusals = [e for _, _, e in c.log if isinstance(e, GrantVote)]
    assert len(refusals) == 6 and not any(e.granted for e in refusals)
    m = c.elect()
    assert m.term >= 2
    assert all(n.master == m.node_id and n.term == m.term for n in c.alive())


def test_outdated_node_never_wins() -> None:
    for seed in range(40):
        c = Cluster(ABC, seed=seed)
        for n in c.alive():
            n.set_last_log((3, 10))
        stale = c.nodes["b"]
        stale.set_last_log((3, 9))
        stale._deadline = 0.5  # it times out first, every time
        m = c.elect()
        assert m is not stale
        assert stale.master == m.node_id


def test_five_nodes_with_two_dead_still_elect() -> None:
    ids = ["n1", "n2", "n3", "n4", "n5"]
    c = Cluster(ids, seed=5, dead={"n2", "n5"})
    m = c.elect(end=30.0)
    assert m.node_id not in c.dead
    assert all(n.master == m.node_id for n in c.alive())


def test_five_nodes_with_three_dead_never_elect() -> None:
    ids = ["n1", "n2", "n3", "n4", "n5"]
    c = Cluster(ids, seed=5, dead={"n1", "n3", "n4"})
    c.run_until(30.0)
    assert not any(isinstance(e, BecameMaster) for _, _, e in c.log)
    assert all(n.role is not Role.MASTER for n in c.nodes.values())
    # The survivors kept trying, but a minority never wins a pre-vote, so no term was spent.
    tries = [e for _, _, e in c.log if isinstance(e, RequestPreVotes)]
    assert len(tries) >= 10 and all(e.term == 1 for e in tries)
    assert all(n.term == 0 and n.role is Role.PRECANDIDATE for n in c.alive())
    assert not any(isinstance(e, RequestVotes) for _, _, e in c.log)


def test_killing_the_master_elects_another_in_a_higher_term() -> None:
    c = Cluster(ABC, seed=2)
    first = c.elect()
    c.dead.add(first.node_id)
    t0 = c.now
    c.run_until(t0 + 60.0, stop_on_master=True)
    [second] = c.masters()
    assert second is not first
    assert second.term > first.term
    assert c.now - t0 < 2 * T.election_timeout_max_s


def run_to_master(seed: int) -> tuple[str, int, float]:
    c = Cluster(["n1", "n2", "n3", "n4", "n5"], seed=seed)
    m = c.elect()
    return m.node_id, m.term, c.now


def test_same_seed_gives_same_winner_term_and_time() -> None:
    assert run_to_master(42) == run_to_master(42)
    # The seed matters: different seeds do not all elect the same node.
    assert len({run_to_master(s)[0] for s in range(20)}) > 1


# -- single node, driven by hand ---------------------------------------------------------------


def test_single_node_cluster_becomes_master_at_once_and_beats() -> None:
    e = node("solo", ["solo"])
    t = e.deadline()
    assert T.election_timeout_min_s <= t < T.election_timeout_max_s
    assert e.tick(t - 0.01) == []
    assert e.tick(t) == [BecameMaster(1), SendHeartbeat(1)]
    assert e.role is Role.MASTER and e.master == "solo" and e.vote_state() == (1, "solo")
    assert e.deadline() == pytest.approx(t + T.heartbeat_interval_s)
    assert e.tick(t + 0.05) == []
    assert e.tick(t + 0.1) == [SendHeartbeat(1)]
    assert e.deadline() == pytest.approx(t + 0.2)


def test_election_timeout_is_drawn_from_the_range_and_redrawn() -> None:
    deadlines = set()
    e = node(seed=9)
    for i in range(200):
        now = 100.0 * i
        e.on_heartbeat(now, "b", 0)
        d = e.deadline() - now
        assert T.election_timeout_min_s <= d < T.election_timeout_max_s
        deadlines.add(round(d, 9))
    assert len(deadlines) > 150


def test_heartbeats_every_100ms_prevent_an_election_for_60s() -> None:
    e = node()
    now = 0.0
    for _ in range(600):
        now += 0.1
        assert e.on_heartbeat(now, "b", 0) in ([], [BecameFollower(0, "b")])
        assert e.tick(now) == []
    assert e.role is Role.FOLLOWER and e.term == 0 and e.master == "b"
    # Once the heartbeats stop, the timeout fires.
    assert e.tick(now + T.election_timeout_max_s) == [RequestPreVotes(1, (0, 0))]
    assert e.role is Role.PRECANDIDATE and e.term == 0 and e.master is None


def test_one_vote_per_term_and_regrant_is_idempotent() -> None:
    e = node("c")
    before = e.deadline()
    assert e.on_vote_request(0.5, "a", 1, (0, 0)) == [GrantVote("a", 1, True)]
    assert e.vote_state() == (1, "a")
    assert e.deadline() > before  # granting a vote resets the timeout
    assert e.on_vote_request(0.6, "b", 1, (0, 0)) == [GrantVote("b", 1, False)]
    assert e.on_vote_request(0.7, "a", 1, (0, 0)) == [GrantVote("a", 1, True)]
    assert e.vote_state() == (1, "a")
    # A new term frees the vote.
    assert e.on_vote_request(0.8, "b", 2, (0, 0)) == [GrantVote("b", 2, True)]
    assert e.vote_state() == (2, "b")


def test_stale_vote_request_is_refused_with_our_term() -> None:
    e = node("c", term=5)
    assert e.on_vote_request(0.1, "a", 4, (9, 9)) == [GrantVote("a", 5, False)]
    assert e.vote_state() == (5, None)


@pytest.mark.parametrize(
    ("cand_log", "granted"),
    [((2, 4), False), ((1, 99), False), ((2, 5), True), ((2, 6), True), ((3, 0), True)],
)
def test_vote_needs_a_log_at_least_as_recent(cand_log: tuple[int, int], granted: bool) -> None:
    e = node("c", last_log=(2, 5))
    assert e.on_vote_request(0.1, "a", 1, cand_log) == [GrantVote("a", 1, granted)]
    assert e.voted_for == ("a" if granted else None)


def test_refused_candidate_term_is_still_adopted() -> None:
    e = candidate("c", last_log=(2, 5))  # term 1
    assert e.on_vote_request(0.1, "a", 3, (1, 0)) == [
        BecameFollower(3, None),
        GrantVote("a", 3, False),
    ]
    assert e.role is Role.FOLLOWER and e.vote_state() == (3, None)


def test_duplicate_votes_count_once() -> None:
    e = candidate("a", ["a", "b", "c", "d", "e"])
    assert e.majority == 3
    t = e.term
    assert e.on_vote(2.0, "b", t, True) == []
    assert e.on_vote(2.0, "b", t, True) == []
    assert e.on_vote(2.0, "b", t, True) == []
    assert e.role is Role.CANDIDATE
    assert e.on_vote(2.0, "c", t, False) == []
    assert e.role is Role.CANDIDATE
    assert e.on_vote(2.0, "d", t, True) == [BecameMaster(t), SendHeartbeat(t)]
    assert e.role is Role.MASTER and e.master == "a"
    # Late votes after winning change nothing.
    assert e.on_vote(2.1, "e", t, True) == []


def test_votes_from_strangers_self_or_old_terms_are_ignored() -> None:
    e = candidate("a")
    t = e.term
    assert e.on_vote(2.0, "zz", t, True) == []
    assert e.on_vote(2.0, "a", t, True) == []
    assert e.on_vote(2.0, "b", t - 1, True) == []
    assert e.role is Role.CANDIDATE
    assert e.on_vote(2.0, "b", t, True) == [BecameMaster(t), SendHeartbeat(t)]


def test_messages_from_non_peers_are_ignored_entirely() -> None:
    e = node("a")
    d = e.deadline()
    assert e.on_heartbeat(0.5, "mallory", 7) == []
    assert e.on_vote_request(0.5, "mallory", 7, (9, 9)) == []
    assert e.on_vote(0.5, "mallory", 7, True) == []
    assert (e.term, e.voted_for, e.master, e.deadline()) == (0, None, None, d)


def test_lower_term_heartbeat_has_no_effect() -> None:
    e = node("a", term=4)
    d = e.deadline()
    assert e.on_heartbeat(0.5, "b", 3) == []
    assert e.master is None and e.deadline() == d


def test_heartbeat_of_higher_term_makes_follower_of_its_sender() -> None:
    e = node("a", term=2, voted_for="c")
    assert e.on_heartbeat(0.5, "b", 5) == [BecameFollower(5, "b")]
    assert e.vote_state() == (5, None) and e.master == "b"
    # Same master, same term: nothing new to report.
    assert e.on_heartbeat(0.6, "b", 5) == []


def test_candidate_hearing_heartbeat_of_its_term_follows_the_sender() -> None:
    e = candidate("a")
    t = e.term
    assert e.on_heartbeat(2.0, "c", t) == [BecameFollower(t, "c")]
    assert e.role is Role.FOLLOWER and e.master == "c" and e.vote_state() == (t, "a")
    # Votes arriving now no longer matter.
    assert e.on_vote(2.0, "b", t, True) == []
    assert e.role is Role.FOLLOWER


def test_higher_term_deposes_a_master() -> None:
    def master() -> Election:
        e = candidate("a")
        e.on_vote(2.0, "b", e.term, True)
        assert e.role is Role.MASTER
        return e

    e = master()
    t = e.term
    assert e.on_heartbeat(2.5, "c", t) == []  # same term: ignored, still master
    assert e.role is Role.MASTER
    assert e.on_heartbeat(2.5, "c", t + 1) == [BecameFollower(t + 1, "c")]
    assert e.role is Role.FOLLOWER and e.master == "c"
    assert e.deadline() >= 2.5 + T.election_timeout_min_s

    e = master()
    assert e.on_vote_request(2.5, "b", t + 1, (0, 0)) == [
        BecameFollower(t + 1, None),
        GrantVote("b", t + 1, True),
    ]
    assert e.role is Role.FOLLOWER and e.vote_state() == (t + 1, "b")

    e = master()
    assert e.observe_term(2.5, t + 3) == [BecameFollower(t + 3, None)]
    assert e.role is Role.FOLLOWER and e.master is None and e.vote_state() == (t + 3, None)
    assert e.deadline() >= 2.5 + T.election_timeout_min_s
    assert e.observe_term(2.6, t + 3) == []


def test_restored_vote_state_is_honoured() -> None:
    e = node("c", term=3, voted_for="a")
    assert e.on_vote_request(0.1, "b", 3, (0, 0)) == [GrantVote("b", 3, False)]
    assert e.tick(e.deadline()) == [RequestPreVotes(4, (0, 0))]
    assert e.vote_state() == (3, "a")


def test_bad_peer_lists_are_refused() -> None:
    with pytest.raises(ConfigError):
        node("z", ABC)
    with pytest.raises(ConfigError):
        node("a", ["a", "b", "b"])
