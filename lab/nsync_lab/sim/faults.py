"""Seeded fault schedules, and a runner that applies one to a simulated world.

:func:`plan` draws a list of :class:`Fault` from an rng. Every fault starts after ``warmup_s``
and is over (healed, restarted, restored) by ``duration_s - settle_s``, so a test can check
"after healing" invariants at the end. At most ``f`` nodes are down (crashed) at any moment, a
node is not crashed twice at once, two faults of the same kind on the same target never
overlap, and two partitions never overlap.

Kinds and what they mean in a star network around one broker:

- ``crash``: node ``target`` crashes at ``at`` and restarts at ``until``.
- ``partition``: the nodes in ``target`` (a minority or majority, never all or none) lose
  their links to the broker both ways; the broker side is ``params["other"]``.
- ``oneway``: one direction (``params["direction"]``: ``"up"`` = node→broker, ``"down"``) of
  node ``target``'s link is cut.
- ``delay``: node ``target``'s link (both ways) gets ``params["base_s"] ± params["jitter_s"]``,
  so its messages arrive late and out of order relative to other nodes' messages.
- ``dup``: the broker duplicates deliveries with probability ``params["p"]``.
- ``broker_restart``: the broker is down from ``at`` to ``until`` and loses its state.
- ``clock_step``: node ``target``'s clock jumps by ``params["delta_s"]`` at ``at``
  (``until == at``); a node adapter that does not support clock steps may skip it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .broker import SimBroker
from .world import World

ALL_KINDS = (
    "crash",
    "partition",
    "oneway",
    "delay",
    "dup",
    "broker_restart",
    "clock_step",
)

# (shortest, longest) duration of each kind, seconds
DURATIONS: dict[str, tuple[float, float]] = {
    "crash": (0.5, 10.0),
    "partition": (0.5, 10.0),
    "oneway": (0.5, 8.0),
    "delay": (1.0, 10.0),
    "dup": (1.0, 10.0),
    "broker_restart": (0.2, 3.0),
    "clock_step": (0.0, 0.0),
}

Target = int | tuple[int, ...] | None


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    target: Target
    params: dict[str, Any] = field(default_factory=dict)
    until: float = 0.0

    def describe(self) -> str:
        span = f"t={self.at:.3f}..{self.until:.3f}"
        k, p = self.kind, self.params
        if k == "crash":
            what = f"crash node {self.target}, restart at {self.until:.3f}"
        elif k == "partition":
            side = ",".join(map(str, p["side"]))
            other = ",".join(map(str, p["other"]))
            what = f"partition {{{side}}} | {{{other}}}+broker"
        elif k == "oneway":
            arrow = "node->broker" if p["direction"] == "up" else "broker->node"
            what = f"cut {arrow} of node {self.target}"
        elif k == "delay":
            what = (
                f"delay node {self.target}'s link "
                f"{p['base_s'] * 1e3:.1f}±{p['jitter_s'] * 1e3:.1f} ms"
            )
        elif k == "dup":
            what = f"duplicate deliveries with p={p['p']:.2f}"
        elif k == "broker_restart":
            what = f"broker down for {self.until - self.at:.3f} s, state lost"
        elif k == "clock_step":
            span = f"t={self.at:.3f}"
            what = f"node {self.target}'s clock steps {p['delta_s']:+.3f} s"
        else:
            what = f"{k} {self.target} {p}"
        return f"{span} {what}"


def _draw(
    rng: random.Random, kind: str, n_nodes: int, start: float, end: float
) -> tuple[float, float, Target, dict[str, Any]]:
    lo, hi = DURATIONS[kind]
    hi = min(hi, end - start)
    length = rng.uniform(lo, hi) if hi > lo else lo
    at = rng.uniform(start, end - length)
    until = at + length
    nodes = list(range(n_nodes))
    target: Target = None
    params: dict[str, Any] = {}
    if kind in ("crash", "oneway", "delay", "clock_step"):
        target = rng.randrange(n_nodes)
    if kind == "partition":
        k = rng.randint(1, n_nodes - 1)
        side = tuple(sorted(rng.sample(nodes, k)))
        target = side
        params = {"side": side, "other": tuple(n for n in nodes if n not in side)}
    elif kind == "oneway":
        params = {"direction": rng.choice(("up", "down"))}
    elif kind == "delay":
        base = rng.uniform(0.001, 0.05)
        params = {"base_s": base, "jitter_s": rng.uniform(0.0, base)}
    elif kind == "dup":
        params = {"p": rng.uniform(0.05, 0.3)}
    elif kind == "clock_step":
        params = {"delta_s": rng.choice((-1.0, 1.0)) * rng.uniform(0.5, 5.0)}
    return at, until, target, params


def _overlap(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 < b1 and b0 < a1


def plan(
    rng: random.Random,
    duration_s: float,
    n_nodes: int,
    f: int,
    n_faults: int,
    kinds: Sequence[str] = ALL_KINDS,
    *,
    warmup_s: float = 2.0,
    settle_s: float = 10.0,
    attempts: int = 50,
) -> list[Fault]:
    """Up to ``n_faults`` faults in ``[warmup_s, duration_s - settle_s]``, sorted by start.

    Fewer are returned only when the constraints leave no room (e.g. ``crash`` with ``f=0``,
    or a short window crowded with faults): each fault gets ``attempts`` draws.
    """
    end = duration_s - settle_s
    if end - warmup_s < DURATIONS["broker_restart"][0] * 5:
        raise ValueError(f"no room for faults between {warmup_s} and {end}")
    if n_nodes < 1:
        raise ValueError("need at least one node")
    kinds = [k for k in kinds if k in DURATIONS]
    if f <= 0:
        kinds = [k for k in kinds if k != "crash"]
    if n_nodes < 2:
        kinds = [k for k in kinds if k != "partition"]
    faults: list[Fault] = []
    if not kinds:
        return faults
    for _ in range(n_faults):
        kind = rng.choice(kinds)
        for _ in range(attempts):
            at, until, target, params = _draw(rng, kind, n_nodes, warmup_s, end)
            if _allowed(faults, kind, at, until, target, f):
                faults.append(Fault(at, kind, target, params, until))
                break
    faults.sort(key=lambda x: x.at)
    return faults


def _allowed(
    faults: list[Fault], kind: str, at: float, until: float, target: Target, f: int
) -> bool:
    for x in faults:
        if x.kind != kind or not _overlap(
            at, max(until, at + 1e-9), x.at, max(x.until, x.at + 1e-9)
        ):
            continue
        if kind == "partition" or x.target == target:
            return False
    if kind == "crash":
        crashes = [x for x in faults if x.kind == "crash" and _overlap(at, until, x.at, x.until)]
        for p in [at, *(x.at for x in crashes if at <= x.at)]:
            if 1 + sum(1 for x in crashes if x.at <= p < x.until) > f:
                return False
    return True


def max_crashed(faults: Sequence[Fault]) -> int:
    """The most nodes crashed at any one moment in ``faults``."""
    events = sorted(
        [(x.at, 1) for x in faults if x.kind == "crash"]
        + [(x.until, -1) for x in faults if x.kind == "crash"]
    )  # at a tie the end (-1) sorts first: a restart and a crash at one instant don't overlap
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


NodeHook = Callable[[int], object]


def _node(fault: Fault) -> int:
    if not isinstance(fault.target, int):
        raise TypeError(f"{fault.kind} fault without a node target: {fault!r}")
    return fault.target


class FaultRunner:
    """Applies a plan to a world and its broker; node-level faults go to the adapter's hooks.

    ``client_id(node)`` names a node's broker link. Cuts are counted per link and direction, so
    overlapping partition and one-way faults heal correctly. With ``keepalive_drop_s`` a cut
    that lasts that long drops the connection (will published, client told), as a keepalive
    timeout would; without it a cut link stays a silent black hole. A fault whose hook is None
    is recorded in the trace as skipped.
    """

    def __init__(
        self,
        world: World,
        broker: SimBroker,
        faults: Sequence[Fault],
        client_id: Callable[[int], str],
        *,
        on_crash: NodeHook | None = None,
        on_restart: NodeHook | None = None,
        on_clock_step: Callable[[int, float], object] | None = None,
        keepalive_drop_s: float | None = None,
    ) -> None:
        self.world = world
        self.broker = broker
        self.faults = list(faults)
        self.client_id = client_id
        self.on_crash = on_crash
        self.on_restart = on_restart
        self.on_clock_step = on_clock_step
        self.keepalive_drop_s = keepalive_drop_s
        self.applied: list[Fault] = []
        self._cuts: dict[tuple[str, str], int] = {}
        self._dup_base = broker.dup_p

    def start(self) -> None:
        for fault in self.faults:
            self.world.at(fault.at, self._begin, fault)
            if fault.kind != "clock_step":
                self.world.at(fault.until, self._end, fault)

    def _log(self, what: str, fault: Fault) -> None:
        self.world.log("faults", what, fault.describe())

    def _cut(self, node: int, direction: str) -> None:
        cid = self.client_id(node)
        key = (cid, direction)
        self._cuts[key] = self._cuts.get(key, 0) + 1
        if self._cuts[key] == 1:
            self.broker.cut(
                cid,
                up=direction == "up",
                down=direction == "down",
                drop_after_s=self.keepalive_drop_s,
            )

    def _heal(self, node: int, direction: str) -> None:
        cid = self.client_id(node)
        key = (cid, direction)
        self._cuts[key] -= 1
        if self._cuts[key] == 0:
            del self._cuts[key]
            self.broker.heal(cid, up=direction == "up", down=direction == "down")

    def _begin(self, fault: Fault) -> None:
        k, p, b = fault.kind, fault.params, self.broker
        skipped = False
        if k == "crash":
            skipped = self.on_crash is None
            if self.on_crash is not None:
                self.on_crash(_node(fault))
        elif k == "partition":
            for node in p["side"]:
                self._cut(node, "up")
                self._cut(node, "down")
        elif k == "oneway":
            self._cut(_node(fault), p["direction"])
        elif k == "delay":
            cid = self.client_id(_node(fault))
            b.set_delay(cid, p["base_s"], p["jitter_s"])
        elif k == "dup":
            b.dup_p = p["p"]
        elif k == "broker_restart":
            b.restart(fault.until - fault.at)
        elif k == "clock_step":
            skipped = self.on_clock_step is None
            if self.on_clock_step is not None:
                self.on_clock_step(_node(fault), p["delta_s"])
        self._log("fault-skip" if skipped else "fault", fault)
        if not skipped:
            self.applied.append(fault)

    def _end(self, fault: Fault) -> None:
        k, p, b = fault.kind, fault.params, self.broker
        if k == "crash":
            if self.on_restart is None:
                return
            self.on_restart(_node(fault))
        elif k == "partition":
            for node in p["side"]:
                self._heal(node, "up")
                self._heal(node, "down")
        elif k == "oneway":
            self._heal(_node(fault), p["direction"])
        elif k == "delay":
            b.reset_delay(self.client_id(_node(fault)))
        elif k == "dup":
            b.dup_p = self._dup_base
        # broker_restart: the broker brings itself back
        self._log("fault-end", fault)
