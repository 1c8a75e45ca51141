"""The master's duties, pure: which operations of its term f+1 nodes hold, and whose command
waits for which.

Acknowledgements are cumulative, as Raft's match index: a node that acknowledges index i of
the master's term holds every operation up to i (it applied them in order, each right after
the one before). An operation is committed once f+1 nodes hold it, the master counted only
once the operation is on its own disk. Commits happen in index order, so a client's reply goes
out once its operation and everything before it is committed: after a new term's first
operation, nothing of the term is answered before what the master holds of older terms is
committed too.

:class:`Commits` reads no clock and sends nothing: the driver passes ``now`` and the events
(an operation sent, the master's own save, an acknowledgement, a refusal, the housekeeping
tick, a step-down) and answers the requests each call returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")  # whatever the driver needs to answer a client


@dataclass
class _Waiting(Generic[R]):
    deadline: float
    requests: list[R] = field(default_factory=list)


@dataclass(frozen=True)
class Failed(Generic[R]):
    """A request whose operation f+1 nodes did not hold in time."""

    request: R
    held_by: int  # nodes holding it when it expired, the master included
    reasons: tuple[tuple[str, str], ...]  # (node, why) of the refusals heard meanwhile


class Commits(Generic[R]):
    """One master term's commit tracking."""

    def __init__(self, majority: int, ack_timeout_s: float, own_index: int = 0) -> None:
        self.majority = majority
        self.ack_timeout_s = ack_timeout_s
        self.match: dict[str, int] = {}  # node -> highest index of this term it holds
        self.own = own_index  # highest index on the master's own disk
        self.commit_index = 0  # highest index known held by f+1 nodes
        self._waiting: dict[int, _Waiting[R]] = {}
        self._refusals: dict[str, str] = {}  # node -> why, since the oldest waiting index

    def held_by(self, index: int) -> int:
        """How many nodes hold ``index``, the master included once it saved it."""
        return (1 if index <= self.own else 0) + sum(1 for m in self.match.values() if m >= index)

    def sent(self, now: float, index: int, request: R | None = None) -> None:
        """The operation at ``index`` went out; ``request`` (if any) waits for its commit."""
        waiting = self._waiting.setdefault(index, _Waiting(now + self.ack_timeout_s))
        if request is not None:
            waiting.requests.append(request)

    def wait(self, now: float, index: int, request: R) -> list[R]:
        """``request`` is answered once ``index`` is committed: at once (returned) if it is."""
        if index <= self.commit_index or self.held_by(index) >= self.majority:
            return [request]
        self.sent(now, index, request)
        return []

    def saved(self, index: int) -> list[R]:
        """The master's own copy of ``index`` is on disk. Returns the requests now committed."""
        self.own = max(self.own, index)
        return self._advance()

    def ack(self, node: str, index: int, last_index: int) -> list[R]:
        """``node`` holds this term's operations up to ``index`` (capped at ``last_index``, the
        master's own last: a node cannot hold more of this term than its master made)."""
        if index <= self.match.get(node, 0):
            return []
        self.match[node] = min(index, last_index)
        return self._advance()

    def refused(self, node: str, why: str) -> None:
        """``node`` could not apply an operation (it will pull the master's state)."""
        if self._waiting:
            self._refusals[node] = why

    def expire(self, now: float) -> list[Failed[R]]:
        """The requests whose operation was not committed within ``ack_timeout_s``."""
        out: list[Failed[R]] = []
        for index in sorted(self._waiting):
            waiting = self._waiting[index]
            if now < waiting.deadline:
                continue
            del self._waiting[index]
            reasons = tuple(sorted(self._refusals.items()))
            out += [Failed(r, self.held_by(index), reasons) for r in waiting.requests]
        if not self._waiting:
            self._refusals.clear()
        return out

    def drop(self) -> list[R]:
        """The master steps down: every waiting request, none of them answered."""
        requests = [r for w in self._waiting.values() for r in w.requests]
        self._waiting.clear()
        self._refusals.clear()
        return requests

    def _advance(self) -> list[R]:
        done: list[R] = []
        for index in sorted(self._waiting):
            if self.held_by(index) < self.majority:
                break
            done += self._waiting.pop(index).requests
            self.commit_index = max(self.commit_index, index)
        if not self._waiting:
            self._refusals.clear()
        return done
