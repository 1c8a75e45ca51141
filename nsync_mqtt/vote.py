"""Master election: a Raft-style state machine, pure.

The cluster has 2f+1 peers; a node becomes master with the votes of a majority (f+1, its own
included). Every node starts as a follower with a randomised election timeout, drawn uniformly
from ``[election_timeout_min_s, election_timeout_max_s)`` and re-drawn at each reset. A follower
that hears no heartbeat before its timeout starts a new term (after a pre-vote, below), votes for
itself and asks the others for their votes. A node grants one vote per term, and only to a
candidate whose last applied operation ``(term, index)`` is at least as recent as its own, so a
node that missed operations never becomes master. Any message carrying a higher term turns the
receiver into a follower of that term.

Two guards keep a healthy master in place (Raft thesis §9.6 and §6.2):

- Pre-vote. A node whose timeout fires first becomes a pre-candidate: it keeps its term and asks
  whether the others would vote for it in the next term. A peer says yes only if it too has not
  heard from a master for ``election_timeout_min_s``, is not master itself, and the asker's log is
  at least as recent as its own. Only with a majority of yeses does the node start a real
  election. A node cut off from the cluster thus never inflates its term, and cannot depose the
  master when it returns.
- Step-down on lost quorum. The driver reports every message from a peer (``on_peer_alive``). A
  master that has not heard from a majority (itself included) within ``election_timeout_max_s``
  becomes a follower, so a master cut off from the others stops acting as one while the majority
  side elects a new master.

The election reads no clock and touches no network: the driver passes ``now`` with every event,
calls ``tick`` at ``deadline()``, and carries out the effects returned.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from nsync_mqtt.errors import ConfigError
from nsync_mqtt.timing import Timing


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRECANDIDATE = "precandidate"
    CANDIDATE = "candidate"
    MASTER = "master"


@dataclass(frozen=True)
class RequestVotes:
    """Broadcast a vote request for ``term``, carrying our last applied operation."""

    term: int
    last_log: tuple[int, int]


@dataclass(frozen=True)
class GrantVote:
    """Answer the candidate ``to``: vote granted or refused in ``term``."""

    to: str
    term: int
    granted: bool


@dataclass(frozen=True)
class RequestPreVotes:
    """Broadcast a pre-vote request: would the others vote for us in ``term`` (ours + 1)?"""

    term: int
    last_log: tuple[int, int]


@dataclass(frozen=True)
class GrantPreVote:
    """Answer the pre-candidate ``to``: the proposed ``term`` if granted, else our own term."""

    to: str
    term: int
    granted: bool


@dataclass(frozen=True)
class SendHeartbeat:
    """As master, broadcast a heartbeat for ``term`` now."""

    term: int


@dataclass(frozen=True)
class BecameMaster:
    term: int


@dataclass(frozen=True)
class BecameFollower:
    """We are now a follower in ``term``, or the master we follow changed (None: unknown)."""

    term: int
    master: str | None


Effect = (
    RequestPreVotes
    | GrantPreVote
    | RequestVotes
    | GrantVote
    | SendHeartbeat
    | BecameMaster
    | BecameFollower
)


class Election:
    """One node's view of the election."""

    def __init__(
        self,
        node_id: str,
        peers: Sequence[str],
        timing: Timing,
        rng: random.Random,
        now: float,
        term: int = 0,
        voted_for: str | None = None,
        last_log: tuple[int, int] = (0, 0),
        prevote: bool = True,
    ) -> None:
        if len(set(peers)) != len(peers):
            raise ConfigError(f"peers: duplicate node id in {list(peers)!r}")
        if node_id not in peers:
            raise ConfigError(f"peers: must include this node {node_id!r}")
        if term < 0:
            raise ConfigError(f"term: must not be negative, got {term}")
        self.node_id = node_id
        self.peers: tuple[str, ...] = tuple(peers)
        self.majority = len(self.peers) // 2 + 1
        self.timing = timing
        self._rng = rng
        self.role = Role.FOLLOWER
        self.term = term
        self.voted_for = voted_for
        self.master: str | None = None
        self.last_log = last_log
        self.prevote = prevote
        self._votes: set[str] = set()
        self._prevotes: set[str] = set()
        self._master_heard_at: float | None = None  # last heartbeat accepted from a master
        self._peer_heard_at: dict[str, float] = {}  # last message from each peer
        self._deadline = 0.0
        self._reset_timeout(now)

    # -- queries ---------------------------------------------------------------------------

    def deadline(self) -> float:
        """The next instant ``tick`` must be called: election timeout, or heartbeat as master."""
        return self._deadline

    def vote_state(self) -> tuple[int, str | None]:
        """What must survive a restart: the current term and whom we voted for in it."""
        return self.term, self.voted_for

    # -- events ----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        if now < self._deadline:
            return []
        if self.role is Role.MASTER:
            if not self._has_quorum(now):
                return self._step_down(now)
            self._deadline += self.timing.heartbeat_interval_s
            if self._deadline <= now:
                self._deadline = now + self.timing.heartbeat_interval_s
            return [SendHeartbeat(self.term)]
        if self.prevote:
            return self._start_prevote(now)
        return self._start_election(now)

    def on_heartbeat(self, now: float, src: str, term: int) -> list[Effect]:
        if not self._is_peer(src) or term < self.term:
            return []
        before = self.role, self.master
        self.observe_term(now, term)
        if self.role is Role.MASTER:
            # Two masters in one term cannot happen: a majority voted for us alone.
            return []
        self.role = Role.FOLLOWER
        self.master = src
        self._master_heard_at = now
        self._prevotes.clear()
        self._reset_timeout(now)
        if before != (Role.FOLLOWER, src):
            return [BecameFollower(self.term, src)]
        return []

    def on_vote_request(
        self, now: float, src: str, term: int, last_log: tuple[int, int]
    ) -> list[Effect]:
        if not self._is_peer(src):
            return []
        effects = self.observe_term(now, term)
        if term < self.term:
            effects.append(GrantVote(src, self.term, False))
            return effects
        granted = self.voted_for in (None, src) and tuple(last_log) >= self.last_log
        if granted:
            self.voted_for = src
            self._reset_timeout(now)
        effects.append(GrantVote(src, self.term, granted))
        return effects

    def on_vote(self, now: float, src: str, term: int, granted: bool) -> list[Effect]:
        if not self._is_peer(src):
            return []
        effects = self.observe_term(now, term)
        if term < self.term or self.role is not Role.CANDIDATE or not granted:
            return effects
        self._votes.add(src)
        if len(self._votes) >= self.majority:
            effects.extend(self._become_master(now))
        return effects

    def on_prevote_request(
        self, now: float, src: str, term: int, last_log: tuple[int, int]
    ) -> list[Effect]:
        """Would we vote for ``src`` in ``term``? Changes neither our term, vote nor timeout."""
        if not self._is_peer(src):
            return []
        master_recent = (
            self._master_heard_at is not None
            and now - self._master_heard_at < self.timing.election_timeout_min_s
        )
        granted = (
            self.role is not Role.MASTER
            and not master_recent
            and term > self.term
            and tuple(last_log) >= self.last_log
        )
        return [GrantPreVote(src, term if granted else self.term, granted)]

    def on_prevote(self, now: float, src: str, term: int, granted: bool) -> list[Effect]:
        """An answer to our pre-vote request; a majority starts the real election."""
        if not self._is_peer(src):
            return []
        if not granted:
            # A refusal carries the peer's term: if it is ahead of ours, catch up.
            return self.observe_term(now, term)
        if self.role is not Role.PRECANDIDATE or term != self.term + 1:
            return []
        self._prevotes.add(src)
        if len(self._prevotes) >= self.majority:
            return self._start_election(now)
        return []

    def on_peer_alive(self, now: float, src: str) -> None:
        """Any message from ``src`` arrived: a master counts it towards its quorum."""
        if self._is_peer(src):
            self._peer_heard_at[src] = max(now, self._peer_heard_at.get(src, now))

    def set_last_log(self, last_log: tuple[int, int]) -> None:
        """Record ``(term, index)`` of the last operation this node applied."""
        self.last_log = last_log

    def observe_term(self, now: float, term: int) -> list[Effect]:
        """A message carried ``term``; if it is higher than ours, step down to follower."""
        if term <= self.term:
            return []
        was = self.role, self.master
        if self.role is Role.MASTER:
            self._reset_timeout(now)
        self.term = term
        self.voted_for = None
        self.role = Role.FOLLOWER
        self.master = None
        self._votes.clear()
        self._prevotes.clear()
        if was != (Role.FOLLOWER, None):
            return [BecameFollower(term, None)]
        return []

    # -- internals -------------------------------------------------------------------------

    def _is_peer(self, src: str) -> bool:
        return src != self.node_id and src in self.peers

    def _reset_timeout(self, now: float) -> None:
        lo = self.timing.election_timeout_min_s
        hi = self.timing.election_timeout_max_s
        self._deadline = now + lo + self._rng.random() * (hi - lo)

    def _has_quorum(self, now: float) -> bool:
        since = now - self.timing.election_timeout_max_s
        heard = sum(1 for t in self._peer_heard_at.values() if t >= since)
        return heard + 1 >= self.majority

    def _step_down(self, now: float) -> list[Effect]:
        self.role = Role.FOLLOWER
        self.master = None
        self._reset_timeout(now)
        return [BecameFollower(self.term, None)]

    def _start_prevote(self, now: float) -> list[Effect]:
        self.role = Role.PRECANDIDATE
        self.master = None
        self._votes.clear()
        self._prevotes = {self.node_id}
        self._reset_timeout(now)
        if len(self._prevotes) >= self.majority:
            return self._start_election(now)
        return [RequestPreVotes(self.term + 1, self.last_log)]

    def _start_election(self, now: float) -> list[Effect]:
        self.term += 1
        self.role = Role.CANDIDATE
        self.voted_for = self.node_id
        self.master = None
        self._prevotes.clear()
        self._votes = {self.node_id}
        self._reset_timeout(now)
        if len(self._votes) >= self.majority:
            return self._become_master(now)
        return [RequestVotes(self.term, self.last_log)]

    def _become_master(self, now: float) -> list[Effect]:
        self.role = Role.MASTER
        self.master = self.node_id
        for voter in self._votes:  # a grace period: our voters were alive a moment ago
            self.on_peer_alive(now, voter)
        self._votes.clear()
        self._deadline = now + self.timing.heartbeat_interval_s
        return [BecameMaster(self.term), SendHeartbeat(self.term)]


@dataclass
class IsolationWatch:
    """The paper's partition rule, pure: a node that has had no master for ``grace_s`` and has
    not heard, within ``window_s``, enough peers for any election to succeed (fewer than
    ``majority`` nodes, itself included) is cut off: it stops playing and recovers.

    ``grace_s`` covers an election and the bus working through its broker list. The masterless
    spell starts at the first check that sees no master; a check that sees a master (this node
    included) ends it, so the spell of a master that steps down starts at its step-down, not at
    some earlier masterless spell."""

    window_s: float
    grace_s: float
    majority: int
    masterless_since: float | None = None

    def cut_off(
        self, now: float, master: str | None, peers: Sequence[str], seen: dict[str, float]
    ) -> bool:
        """Check at ``now``; ``seen`` maps a peer to when it was last heard from. True when
        the node must stop playing (call again after it has recovered)."""
        if master is not None:
            self.masterless_since = None
            return False
        if self.masterless_since is None:
            self.masterless_since = now
            return False
        if now - self.masterless_since < self.grace_s:
            return False
        return self.heard(now, peers, seen) + 1 < self.majority

    def heard(self, now: float, peers: Sequence[str], seen: dict[str, float]) -> int:
        """How many of ``peers`` were heard from within ``window_s`` of ``now``."""
        return sum(1 for p in peers if now - seen.get(p, -math.inf) < self.window_s)
