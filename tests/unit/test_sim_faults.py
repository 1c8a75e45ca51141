"""Seeded fault plans and the runner that applies them to the simulated broker."""

from __future__ import annotations

import random

import pytest

from nsync_lab.sim import ALL_KINDS, Fault, FaultRunner, SimBroker, World, max_crashed, plan
from nsync_lab.sim.broker import DEFAULT_BASE_S, DEFAULT_JITTER_S


def _overlap(a: Fault, b: Fault) -> bool:
    return a.at < b.until and b.at < a.until


@pytest.mark.parametrize("seed", range(40))
def test_plans_respect_the_window_the_crash_budget_and_no_same_target_overlap(seed: int) -> None:
    n, f = 5, 2
    faults = plan(random.Random(seed), 60.0, n, f, 25, settle_s=10.0, warmup_s=2.0)
    assert len(faults) >= 15
    assert [x.at for x in faults] == sorted(x.at for x in faults)
    for x in faults:
        assert 2.0 <= x.at <= x.until <= 50.0, x.describe()
        assert x.kind in ALL_KINDS
    assert max_crashed(faults) <= f
    for i, a in enumerate(faults):
        for b in faults[i + 1 :]:
            if a.kind == b.kind == "partition" or (a.kind == b.kind and a.target == b.target):
                assert not _overlap(a, b), (a.describe(), b.describe())
    for x in faults:
        if x.kind == "partition":
            side, other = x.params["side"], x.params["other"]
            assert side and other and sorted(side + other) == list(range(n))
        if x.kind in ("crash", "oneway", "delay", "clock_step"):
            assert isinstance(x.target, int) and 0 <= x.target < n
        if x.kind == "clock_step":
            assert x.until == x.at and 0.5 <= abs(x.params["delta_s"]) <= 5.0
        if x.kind == "broker_restart":
            assert 0.2 <= x.until - x.at <= 3.0


def test_the_crash_budget_binds_when_crashes_crowd() -> None:
    for seed in range(10):
        faults = plan(random.Random(seed), 30.0, 5, 1, 30, kinds=["crash"], settle_s=5.0)
        assert faults and all(x.kind == "crash" for x in faults)
        assert max_crashed(faults) == 1
    assert plan(random.Random(0), 30.0, 5, 0, 10, kinds=["crash"]) == []


def test_max_crashed_counts_overlaps() -> None:
    a = Fault(1.0, "crash", 0, until=5.0)
    b = Fault(2.0, "crash", 1, until=3.0)
    c = Fault(5.0, "crash", 2, until=6.0)  # starts as a ends
    assert max_crashed([a, b, c]) == 2
    assert max_crashed([a, c]) == 1


def test_plans_are_deterministic_and_kinds_are_respected() -> None:
    a = plan(random.Random(9), 60.0, 3, 1, 20)
    assert a == plan(random.Random(9), 60.0, 3, 1, 20)
    assert a != plan(random.Random(10), 60.0, 3, 1, 20)
    only = plan(random.Random(9), 60.0, 3, 1, 20, kinds=["dup", "delay"])
    assert {x.kind for x in only} == {"dup", "delay"}
    with pytest.raises(ValueError):
        plan(random.Random(9), 10.0, 3, 1, 5, settle_s=10.0)


def test_describe_is_readable() -> None:
    texts = [
        Fault(1.0, "crash", 2, {}, 4.0).describe(),
        Fault(1.0, "partition", (0, 2), {"side": (0, 2), "other": (1,)}, 3.0).describe(),
        Fault(1.0, "oneway", 1, {"direction": "up"}, 2.0).describe(),
        Fault(1.0, "delay", 1, {"base_s": 0.02, "jitter_s": 0.01}, 2.0).describe(),
        Fault(1.0, "dup", None, {"p": 0.2}, 2.0).describe(),
        Fault(1.0, "broker_restart", None, {}, 1.5).describe(),
        Fault(1.0, "clock_step", 0, {"delta_s": -2.5}, 1.0).describe(),
    ]
    assert texts == [
        "t=1.000..4.000 crash node 2, restart at 4.000",
        "t=1.000..3.000 partition {0,2} | {1}+broker",
        "t=1.000..2.000 cut node->broker of node 1",
        "t=1.000..2.000 delay node 1's link 20.0±10.0 ms",
        "t=1.000..2.000 duplicate deliveries with p=0.20",
        "t=1.000..1.500 broker down for 0.500 s, state lost",
        "t=1.000 node 0's clock steps -2.500 s",
    ]


def test_runner_applies_and_heals_overlapping_cuts_and_calls_node_hooks() -> None:
    w = World(1)
    b = SimBroker(w)
    calls: list[tuple[float, str, int]] = []
    faults = [
        Fault(1.0, "partition", (1,), {"side": (1,), "other": (0, 2)}, 3.0),
        Fault(2.0, "oneway", 1, {"direction": "down"}, 4.0),
        Fault(1.5, "crash", 2, {}, 2.5),
        Fault(1.0, "delay", 0, {"base_s": 0.05, "jitter_s": 0.01}, 2.0),
        Fault(1.0, "dup", None, {"p": 0.3}, 2.0),
        Fault(5.0, "broker_restart", None, {}, 5.5),
        Fault(6.0, "clock_step", 0, {"delta_s": 1.0}, 6.0),
    ]
    runner = FaultRunner(
        w,
        b,
        faults,
        lambda node: f"n{node}",
        on_crash=lambda node: calls.append((w.now, "crash", node)),
        on_restart=lambda node: calls.append((w.now, "restart", node)),
    )
    runner.start()
    link1, link0 = b.link("n1"), b.link("n0")
    w.run_until(1.0)
    assert link1.up_cut and link1.down_cut
    assert (link0.up_base, link0.down_jitter) == (0.05, 0.01) and b.dup_p == 0.3
    w.run_until(2.0)
    assert (link0.up_base, link0.up_jitter) == (DEFAULT_BASE_S, DEFAULT_JITTER_S)
    assert b.dup_p == 0.0
    w.run_until(3.0)
    assert not link1.up_cut and link1.down_cut  # the one-way cut outlives the partition
    w.run_until(4.0)
    assert not link1.down_cut
    assert calls == [(1.5, "crash", 2), (2.5, "restart", 2)]
    w.run_until(5.2)
    assert not b.up
    w.run_until(7.0)
    assert b.up
    assert len(runner.applied) == 6  # the clock step had no hook
    skipped = [r for r in w.trace.records() if r[2] == "fault-skip"]
    assert len(skipped) == 1 and "clock steps" in skipped[0][3]


@pytest.mark.parametrize("seed", range(5))
def test_after_a_random_plan_everything_is_healed_by_the_settle_time(seed: int) -> None:
    w = World(seed)
    b = SimBroker(w)
    rng = w.fork_rng("faults")
    faults = plan(rng, 40.0, 4, 1, 30, settle_s=8.0)
    down: set[int] = set()
    FaultRunner(
        w,
        b,
        faults,
        lambda node: f"n{node}",
        on_crash=down.add,
        on_restart=down.discard,
        on_clock_step=lambda node, d: None,
        keepalive_drop_s=1.0,
    ).start()
    most_down = 0
    for t in range(1, 33):
        w.run_until(float(t))
        most_down = max(most_down, len(down))
    assert most_down <= 1
    assert down == set() and b.up and b.dup_p == 0.0
    for node in range(4):
        link = b.link(f"n{node}")
        assert not (link.up_cut or link.down_cut)
        assert (link.down_base, link.down_jitter) == (DEFAULT_BASE_S, DEFAULT_JITTER_S)
