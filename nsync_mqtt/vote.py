"""Master election: a Raft-style state machine, pure.

The cluster has 2f+1 peers; a node becomes master with the votes of a majority (f+1, its own
included). Every node starts as a follower with a randomised election timeout, drawn uniformly
from ``[election_timeout_min_s, election_timeout_max_s)`` and re-drawn at each reset. A follower
that hears no heartbeat before its timeout starts a new term, votes for itself and asks the others
for their votes. A node grants one vote per term, and only to a candidate whose last applied
operation ``(term, index)`` is at least as recent as its own, so a node that missed operations
never becomes master. Any message carrying a higher term turns the receiver into a follower of
that term.

The election reads no clock and touches no network: the driver passes ``now`` with every event,
calls ``tick`` at ``deadline()``, and carries out the effects returned.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from nsync_mqtt.errors import ConfigError
from nsync_mqtt.timing import Timing


class Role(enum.Enum):
    FOLLOWER = "follower"
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


Effect = RequestVotes | GrantVote | SendHeartbeat | BecameMaster | BecameFollower


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
        self._votes: set[str] = set()
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
            self._deadline += self.timing.heartbeat_interval_s
            if self._deadline <= now:
                self._deadline = now + self.timing.heartbeat_interval_s
            return [SendHeartbeat(self.term)]
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

    def _start_election(self, now: float) -> list[Effect]:
        self.term += 1
        self.role = Role.CANDIDATE
        self.voted_for = self.node_id
        self.master = None
        self._votes = {self.node_id}
        self._reset_timeout(now)
        if len(self._votes) >= self.majority:
            return self._become_master(now)
        return [RequestVotes(self.term, self.last_log)]

    def _become_master(self, now: float) -> list[Effect]:
        self.role = Role.MASTER
        self.master = self.node_id
        self._votes.clear()
        self._deadline = now + self.timing.heartbeat_interval_s
        return [BecameMaster(self.term), SendHeartbeat(self.term)]
