"""Pre-vote and step-down on lost quorum: hand-driven nodes, and clusters on a lossy in-test net."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

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
FIVE = ["n1", "n2", "n3", "n4", "n5"]


def node(node_id: str = "a", peers: list[str] = ABC, seed: int = 1, **kw: Any) -> Election:
    return Election(node_id, peers, T, random.Random(seed), now=0.0, **kw)


def master_of(peers: list[str] = ABC, node_id: str = "a") -> tuple[Election, float]:
    """A node elected at the returned instant with the votes of the first peers."""
    e = node(node_id, peers)
    now = e.deadline()
    e.tick(now)
    others = [p for p in peers if p != node_id][: e.majority - 1]
    for p in others:
        e.on_prevote(now, p, e.term + 1, True)
    for p in others:
        e.on_vote(now, p, e.term, True)
    assert e.role is Role.MASTER
    return e, now


@dataclass(frozen=True)
class Alive:
    """A follower's answer to a heartbeat (in NSync: its pings to the master)."""


@dataclass
class Net:
    """Election objects on a message queue that can delay, drop and partition.

    Like the NSync node, every message carries its sender's current term, and a receiver first
    catches up with a higher term (``observe_term``) and reports the sender alive.
    """

    ids: list[str]
    seed: int
    latency_s: float = 0.005
    jitter_s: float = 0.0
    drop: float = 0.0
    groups: list[set[str]] | None = None  # a partition: messages flow only within a group
    now: float = 0.0
    prevote: bool = True
    nodes: dict[str, Election] = field(init=False)
    log: list[tuple[float, str, Effect]] = field(default_factory=list)
    masters_by_term: dict[int, set[str]] = field(default_factory=dict)
    _queue: list[tuple[float, int, str, str, int, Any]] = field(default_factory=list)
    _seq: int = 0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"net-{self.seed}")
        self.nodes = {
            i: Election(
                i, self.ids, T, random.Random(f"{self.seed}-{i}"), now=0.0, prevote=self.prevote
            )
            for i in self.ids
        }

    def isolate(self, *cut: str) -> None:
        self.groups = [set(cut), set(self.ids) - set(cut)]

    def heal(self) -> None:
        self.groups = None

    def masters(self) -> list[Election]:
        return [n for n in self.nodes.values() if n.role is Role.MASTER]

    def _linked(self, a: str, b: str) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)

    def _send(self, src: str, dst: str, msg: Any) -> None:
        if not self._linked(src, dst) or self._rng.random() < self.drop:
            return
        self._seq += 1
        at = self.now + self.latency_s + self._rng.random() * self.jitter_s
        heapq.heappush(self._queue, (at, self._seq, src, dst, self.nodes[src].term, msg))

    def _carry_out(self, src: str, effects: list[Effect]) -> None:
        for eff in effects:
            self.log.append((self.now, src, eff))
            if isinstance(eff, BecameMaster):
                self.masters_by_term.setdefault(eff.term, set()).add(src)
            if isinstance(eff, (RequestPreVotes, RequestVotes, SendHeartbeat)):
                for dst in self.ids:
                    if dst != src:
                        self._send(src, dst, eff)
            elif isinstance(eff, (GrantPreVote, GrantVote)):
                self._send(src, eff.to, eff)

    def _deliver(self, src: str, dst: str, term: int, msg: Any) -> None:
        n = self.nodes[dst]
        n.on_peer_alive(self.now, src)
        if term > n.term:
            self._carry_out(dst, n.observe_term(self.now, term))
        if isinstance(msg, RequestPreVotes):
            effects = n.on_prevote_request(self.now, src, msg.term, msg.last_log)
        elif isinstance(msg, GrantPreVote):
            effects = n.on_prevote(self.now, src, msg.term, msg.granted)
        elif isinstance(msg, RequestVotes):
            effects = n.on_vote_request(self.now, src, msg.term, msg.last_log)
        elif isinstance(msg, GrantVote):
            effects = n.on_vote(self.now, src, msg.term, msg.granted)
        elif isinstance(msg, SendHeartbeat):
            effects = n.on_heartbeat(self.now, src, msg.term)
            if n.master == src:
                self._send(dst, src, Alive())
        else:
            assert isinstance(msg, Alive)
            effects = []
        self._carry_out(dst, effects)

    def run_until(self, end: float, until: Callable[[], bool] | None = None) -> None:
        while True:
            next_tick = min(n.deadline() for n in self.nodes.values())
            next_msg = self._queue[0][0] if self._queue else float("inf")
            t = min(next_tick, next_msg)
            if t > end:
                self.now = end
                return
            self.now = t
            if next_msg <= next_tick:
                _, _, src, dst, term, msg = heapq.heappop(self._queue)
                if self._linked(src, dst):
                    self._deliver(src, dst, term, msg)
            else:
                for n in self.nodes.values():
                    if n.deadline() <= t:
                        self._carry_out(n.node_id, n.tick(t))
            assert all(len(m) == 1 for m in self.masters_by_term.values()), self.masters_by_term
            if until is not None and until():
                return

    def settled(self) -> bool:
        masters = self.masters()
        return len(masters) == 1 and all(
            n.master == masters[0].node_id and n.term == masters[0].term
            for n in self.nodes.values()
        )

    def elect(self, within: float = 60.0) -> Election:
        self.run_until(self.now + within, until=self.settled)
        assert self.settled(), f"no settled master by {self.now} s"
        return self.masters()[0]

    def since(self, t0: float) -> list[tuple[float, str, Effect]]:
        return [entry for entry in self.log if entry[0] >= t0]


# -- clusters --------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [ABC, FIVE])
def test_healthy_start_elects_through_pre_vote(ids: list[str]) -> None:
    for seed in range(10):
        net = Net(ids, seed)
        m = net.elect()
        assert m.term == 1
        assert net.now < T.election_timeout_max_s + 0.1
        kinds = (RequestPreVotes, RequestVotes, BecameMaster)
        mine = [e for _, src, e in net.log if src == m.node_id and isinstance(e, kinds)]
        assert mine[:3] == [RequestPreVotes(1, (0, 0)), RequestVotes(1, (0, 0)), BecameMaster(1)]
        assert net.masters_by_term == {1: {m.node_id}}


@pytest.mark.parametrize("ids", [ABC, FIVE])
def test_partitioned_node_keeps_its_term_and_does_not_depose_the_master(ids: list[str]) -> None:
    net = Net(ids, seed=4)
    m = net.elect()
    term = m.term
    x = next(n for n in net.nodes.values() if n is not m)
    t0 = net.now
    net.isolate(x.node_id)
    net.run_until(t0 + 30.0)
    assert x.term == term and x.role is Role.PRECANDIDATE and x.master is None
    tries = [
        e for _, src, e in net.since(t0) if src == x.node_id and isinstance(e, RequestPreVotes)
    ]
    assert len(tries) >= 10
    assert set(tries) == {RequestPreVotes(term + 1, (0, 0))}
    assert not any(isinstance(e, (RequestVotes, BecameMaster)) for _, _, e in net.since(t0))
    assert net.masters() == [m] and m.term == term

    # Heal just before its next timeout, so it asks the others before any heartbeat reaches it.
    net.run_until(x.deadline() - 0.001)
    net.heal()
    t1 = net.now
    net.run_until(t1 + T.heartbeat_interval_s + 2 * net.latency_s)
    assert x.role is Role.FOLLOWER and x.master == m.node_id and x.term == term
    answers = [e for _, _, e in net.since(t1) if isinstance(e, GrantPreVote)]
    assert answers == [GrantPreVote(x.node_id, term, False)] * (len(ids) - 1)
    net.run_until(t1 + 10.0)
    assert net.masters() == [m] and all(n.term == term for n in net.nodes.values())
    assert not any(isinstance(e, RequestVotes) for _, _, e in net.since(t0))


def test_without_pre_vote_the_returning_node_deposes_the_master() -> None:
    # The same scenario as above with pre-vote off: what pre-vote protects against.
    net = Net(ABC, seed=4, prevote=False)
    m = net.elect()
    term = m.term
    x = next(n for n in net.nodes.values() if n is not m)
    net.isolate(x.node_id)
    net.run_until(net.now + 30.0)
    assert x.term > term + 10 and x.role is Role.CANDIDATE
    net.heal()
    net.run_until(net.now + 10.0)
    assert m.term > term + 10


@pytest.mark.parametrize("ids", [ABC, FIVE])
def test_master_cut_off_steps_down_and_the_majority_elects_another(ids: list[str]) -> None:
    net = Net(ids, seed=6)
    old = net.elect()
    term = old.term
    t0 = net.now
    net.isolate(old.node_id)
    net.run_until(t0 + 30.0)
    [(t_down, step_down)] = [
        (t, e)
        for t, src, e in net.since(t0)
        if src == old.node_id and isinstance(e, BecameFollower)
    ]
    assert step_down == BecameFollower(term, None)
    max_s, beat = T.election_timeout_max_s, T.heartbeat_interval_s
    assert t0 + max_s - 2 * beat < t_down <= t0 + max_s + beat
    assert old.role is not Role.MASTER and old.term == term  # stepping down spends no term
    [new] = net.masters()
    assert new is not old and new.term > term
    assert all(n.master == new.node_id for n in net.nodes.values() if n is not old)
    assert all(len(m) == 1 for m in net.masters_by_term.values())

    net.heal()
    net.run_until(net.now + 10.0)
    assert net.masters() == [new] and old.master == new.node_id and old.term == new.term


def test_master_with_exactly_a_majority_stays_master() -> None:
    net = Net(FIVE, seed=8)
    m = net.elect()
    term = m.term
    others = [i for i in FIVE if i != m.node_id]
    minority = set(others[:2])
    net.groups = [set(FIVE) - minority, minority]
    t0 = net.now
    net.run_until(t0 + 30.0)
    assert net.masters() == [m] and m.term == term
    assert not any(src == m.node_id and isinstance(e, BecameFollower) for _, src, e in net.log)
    assert all(net.nodes[i].term == term for i in minority)  # they only asked for pre-votes
    assert all(net.nodes[i].role is Role.PRECANDIDATE for i in minority)


def chaos(seed: int) -> Net:
    """60 s of random drops, delays and partitions, then a healed network."""
    rng = random.Random(f"chaos-{seed}")
    net = Net(FIVE, seed, latency_s=0.002)
    while net.now < 60.0:
        net.drop = rng.choice([0.0, 0.1, 0.3, 0.6])
        net.jitter_s = rng.choice([0.0, 0.05, 0.3, 1.5])
        cut = rng.sample(FIVE, rng.choice([0, 0, 1, 2]))
        net.groups = [set(cut), set(FIVE) - set(cut)] if cut else None
        net.run_until(net.now + rng.uniform(0.5, 6.0))
    net.drop, net.jitter_s, net.groups = 0.0, 0.0, None
    return net


@pytest.mark.parametrize("seed", range(20))
def test_chaos_never_two_masters_in_a_term_and_one_master_after_healing(seed: int) -> None:
    net = chaos(seed)  # run_until checks: never two masters in a term
    net.elect(within=30.0)


def test_chaos_did_force_new_elections() -> None:
    terms = [len(chaos(seed).masters_by_term) for seed in range(20)]
    assert sum(n > 1 for n in terms) >= 10


# -- single node, driven by hand ---------------------------------------------------------------


def test_timeout_starts_a_pre_vote_that_changes_no_term_or_vote() -> None:
    e = node("a", term=3, voted_for="b")
    t = e.deadline()
    assert e.tick(t) == [RequestPreVotes(4, (0, 0))]
    assert e.role is Role.PRECANDIDATE and e.vote_state() == (3, "b") and e.master is None
    assert T.election_timeout_min_s <= e.deadline() - t < T.election_timeout_max_s
    # No majority by the next timeout: ask again, still in term 3.
    assert e.tick(e.deadline()) == [RequestPreVotes(4, (0, 0))]
    assert e.vote_state() == (3, "b")


def test_pre_vote_majority_starts_the_real_election() -> None:
    e = node("a", ["a", "b", "c", "d", "e"], term=2)
    t = e.deadline()
    e.tick(t)
    assert e.on_prevote(t, "b", 3, True) == []
    assert e.on_prevote(t, "b", 3, True) == []  # counted once
    assert e.on_prevote(t, "c", 2, True) == []  # not the term we proposed
    assert e.on_prevote(t, "zz", 3, True) == []  # not a peer
    assert e.on_prevote(t, "a", 3, True) == []  # ourselves
    assert e.role is Role.PRECANDIDATE and e.term == 2
    assert e.on_prevote(t, "d", 3, True) == [RequestVotes(3, (0, 0))]
    assert e.role is Role.CANDIDATE and e.vote_state() == (3, "a")
    # Late pre-votes change nothing.
    assert e.on_prevote(t, "e", 3, True) == []
    assert e.role is Role.CANDIDATE and e.term == 3


def test_pre_vote_refusal_from_a_later_term_is_adopted() -> None:
    e = node("a", term=2)
    e.tick(e.deadline())
    assert e.on_prevote(2.0, "b", 2, False) == []
    assert e.role is Role.PRECANDIDATE
    assert e.on_prevote(2.0, "b", 5, False) == [BecameFollower(5, None)]
    assert e.role is Role.FOLLOWER and e.vote_state() == (5, None)
    # Its pre-vote is over: grants for the old proposal no longer count.
    assert e.on_prevote(2.0, "c", 3, True) == []
    assert e.role is Role.FOLLOWER


def test_pre_candidate_hearing_a_heartbeat_follows_it() -> None:
    e = node("a", term=2)
    t = e.deadline()
    e.tick(t)
    assert e.on_heartbeat(t + 0.1, "b", 2) == [BecameFollower(2, "b")]
    assert e.role is Role.FOLLOWER and e.master == "b" and e.term == 2
    assert e.on_prevote(t + 0.1, "c", 3, True) == []
    assert e.role is Role.FOLLOWER and e.term == 2


def test_single_node_cluster_skips_the_pre_vote() -> None:
    e = node("solo", ["solo"])
    assert e.tick(e.deadline()) == [BecameMaster(1), SendHeartbeat(1)]


def test_prevote_off_starts_elections_at_once() -> None:
    e = node("a", prevote=False)
    assert e.tick(e.deadline()) == [RequestVotes(1, (0, 0))]
    assert e.role is Role.CANDIDATE and e.vote_state() == (1, "a")


def test_pre_vote_refused_while_a_master_is_heard() -> None:
    e = node("c", term=2, voted_for="a")
    e.on_heartbeat(1.0, "a", 2)
    d = e.deadline()
    state = (e.role, e.term, e.voted_for, e.master)
    assert e.on_prevote_request(1.5, "b", 3, (9, 9)) == [GrantPreVote("b", 2, False)]
    assert e.on_prevote_request(1.0 + T.election_timeout_min_s - 0.01, "b", 3, (0, 0)) == [
        GrantPreVote("b", 2, False)
    ]
    # Nothing heard from the master for election_timeout_min_s: it is presumed gone.
    assert e.on_prevote_request(1.0 + T.election_timeout_min_s, "b", 3, (0, 0)) == [
        GrantPreVote("b", 3, True)
    ]
    # Answering a pre-vote changes no term, vote, master or timeout.
    assert (e.role, e.term, e.voted_for, e.master) == state and e.deadline() == d


def test_master_refuses_pre_votes() -> None:
    m, t = master_of()
    assert m.on_prevote_request(t + 60.0, "c", m.term + 1, (9, 9)) == [
        GrantPreVote("c", m.term, False)
    ]
    assert m.role is Role.MASTER


def test_pre_vote_needs_a_later_term() -> None:
    e = node("c", term=4)
    assert e.on_prevote_request(0.5, "a", 4, (0, 0)) == [GrantPreVote("a", 4, False)]
    assert e.on_prevote_request(0.5, "a", 5, (0, 0)) == [GrantPreVote("a", 5, True)]
    assert e.on_prevote_request(0.5, "zz", 5, (0, 0)) == []
    assert e.vote_state() == (4, None)


@pytest.mark.parametrize(
    ("cand_log", "granted"),
    [((2, 4), False), ((1, 99), False), ((2, 5), True), ((2, 6), True), ((3, 0), True)],
)
def test_pre_vote_needs_a_log_at_least_as_recent(cand_log: tuple[int, int], granted: bool) -> None:
    e = node("c", term=2, last_log=(2, 5))
    assert e.on_prevote_request(0.5, "a", 3, cand_log) == [
        GrantPreVote("a", 3 if granted else 2, granted)
    ]


def test_fresh_master_has_a_grace_period_then_steps_down_alone() -> None:
    m, t0 = master_of()
    term = m.term
    now = t0
    while now < t0 + T.election_timeout_max_s - T.heartbeat_interval_s:
        now = m.deadline()
        assert m.tick(now) == [SendHeartbeat(term)]
    now = m.deadline()
    while (effects := m.tick(now)) == [SendHeartbeat(term)]:
        now = m.deadline()
    assert effects == [BecameFollower(term, None)]
    assert t0 + T.election_timeout_max_s < now <= t0 + T.election_timeout_max_s + 0.1 + 1e-9
    assert m.role is Role.FOLLOWER and m.master is None and m.vote_state() == (term, "a")
    assert T.election_timeout_min_s <= m.deadline() - now < T.election_timeout_max_s


def test_master_hearing_a_majority_stays_master() -> None:
    m, t0 = master_of(FIVE, "n1")
    now = t0
    for i in range(300):  # 30 s; n2 and n3 answer (with the master, a majority of five)
        now = m.deadline()
        m.on_peer_alive(now, "n2")
        if i % 10 == 0:  # a message a second is enough
            m.on_peer_alive(now, "n3")
        m.on_peer_alive(now, "n1")  # ourselves and strangers do not count
        m.on_peer_alive(now, "zz")
        assert m.tick(now) == [SendHeartbeat(m.term)]
    # n3 falls silent: only two of five remain.
    while (effects := m.tick(now)) in ([], [SendHeartbeat(m.term)]):
        m.on_peer_alive(now, "n2")
        now = m.deadline()
    assert effects == [BecameFollower(m.term, None)] and m.role is Role.FOLLOWER
