"""The chaos suite, short profile: five real nodes behind fault proxies with a second broker to
fail over to, seeded schedules of faults (five distinct kinds per seed, every kind over the
seeds), a client issuing commands throughout, and the invariants of nsync_lab.chaos checked
at the end. The long profile is bench/bench_chaos.py.

The checkers themselves are tested first, on literal records."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nsync_lab import chaos
from nsync_lab.chaos import (
    KINDS,
    MASTER,
    ChaosConfig,
    Fault,
    FaultRecord,
    Reply,
    Transition,
    continuity_breaks,
    continuity_problems,
    disagreement,
    double_masters,
    enqueue_problems,
    make_schedule,
    master_log_transitions,
    rejoin_skew_ns,
    run_chaos,
    unexplained_breaks,
)
from nsync_mqtt.sinklog import Block

NODES = ["n1", "n2", "n3", "n4", "n5"]
SEEDS = (1, 5)  # between them, every kind of fault
FAULTS_PER_SEED = 5
A, B = "a" * 56, "b" * 56
MS = 1_000_000
BLOCK = 2205  # frames of a 50 ms block at 44.1 kHz


# -- the schedule and the checkers -------------------------------------------------------------


def test_schedule_replays_from_its_seed_and_covers_every_kind() -> None:
    one = make_schedule(random.Random(7), NODES, 12)
    assert one == make_schedule(random.Random(7), NODES, 12)
    assert one != make_schedule(random.Random(8), NODES, 12)
    assert sorted(f.kind for f in one[: len(KINDS)]) == sorted(KINDS)
    for fault in one:
        if fault.kind == "kill_f":
            assert 1 <= len(fault.targets) <= 2 and set(fault.targets) <= set(NODES)
        elif fault.kind == "kill_master":
            assert fault.targets == (MASTER,)
        elif fault.kind == "kill_broker":
            assert fault.targets == () and 2.0 <= fault.hold_s <= 4.0
            assert str(fault) == f"kill_broker({fault.hold_s:.1f}s)"
        if fault.kind == "delay":
            assert 0.02 <= fault.delay_s <= 0.1
        else:
            assert fault.delay_s == 0.0


def test_a_short_schedule_draws_distinct_kinds_and_the_short_profile_covers_them_all() -> None:
    few = make_schedule(random.Random(7), NODES, 3)
    assert len({f.kind for f in few}) == 3
    assert few == make_schedule(random.Random(7), NODES, 3)
    seen = {f.kind for s in SEEDS for f in make_schedule(random.Random(s), NODES, FAULTS_PER_SEED)}
    assert seen == set(KINDS)
    assert "kill_broker" in KINDS


def test_a_broker_kill_counts_as_a_fault_on_the_master() -> None:
    broker = FaultRecord(0, Fault("kill_broker", (), 2.0), nodes=(), master_before="n1")
    delay = FaultRecord(1, Fault("delay", (MASTER,), 2.0, 0.05), nodes=("n1",), master_before="n1")
    other = FaultRecord(2, Fault("stop", ("n2",), 2.0), nodes=("n2",), master_before="n1")
    cut = FaultRecord(3, Fault("cut", (MASTER,), 2.0), nodes=("n1",), master_before="n1")
    assert [r.hit_master for r in (broker, delay, other, cut)] == [True, False, False, True]


def test_two_masters_in_one_term_are_reported() -> None:
    seen = [
        Transition(1.0, "n1", "master", 3),
        Transition(2.0, "n1", "follower", 4),
        Transition(2.1, "n2", "master", 4),
    ]
    assert double_masters(seen) == []
    assert double_masters([*seen, Transition(2.2, "n3", "master", 4)]) == [
        "term 4: masters ['n2', 'n3']"
    ]
    log = "x\nnode n2 is master for term 5\nnode n3 is master for term 9\n"
    assert master_log_transitions("n2", log) == [Transition(0.0, "n2", "master", 5)]


def enq(song: str, success: bool, t: float) -> Reply:
    return Reply(t, t + 0.01, "enqueue", song, success, "")


def test_acknowledged_enqueues_must_all_be_kept_in_order() -> None:
    replies = [enq(A, True, 1), enq(B, False, 2), enq(B, True, 3), enq(A, True, 4)]
    assert enqueue_problems(replies, {"n1": [A, B, A], "n2": [A, B, A]}) == []
    assert enqueue_problems(replies, {"n1": [A, B, B, A]}) == []  # the unacked one applied
    (lost,) = enqueue_problems(replies, {"n1": [A, B]})
    assert "not a subsequence" in lost
    (order,) = enqueue_problems(replies, {"n1": [B, A, A]})
    assert "not a subsequence" in order
    (dup,) = enqueue_problems(replies, {"n1": [A, B, A, A]})
    assert "more often than enqueued" in dup
    (differ,) = enqueue_problems(replies, {"n1": [A, B, A], "n2": [A, B, B, A]})
    assert "final playlists differ" in differ


def test_disagreement_names_the_nodes() -> None:
    node = {"playlist_hash": "h", "index": 3, "last_op": {"term": 2, "index": 3}}
    same = {"n1": node, "n2": dict(node)}
    assert disagreement(same) is None
    why = disagreement({**same, "n3": {**node, "index": 2}})
    assert why is not None and "n3: h@(2,2)" in why
    # the same index in another term is another operation
    why = disagreement({**same, "n3": {**node, "last_op": {"term": 1, "index": 3}}})
    assert why is not None and "n3: h@(1,3)" in why


def blocks(song: str, t0_ms: int, n: int, frame: int = 0) -> list[Block]:
    return [Block((t0_ms + 50 * i) * MS, song, frame + BLOCK * i, BLOCK, 44100) for i in range(n)]


def test_continuity_finds_gaps_unless_explained() -> None:
    frames = {A: 100 * BLOCK, B: 10 * BLOCK}
    steady = blocks(A, 0, 40)
    assert continuity_problems(steady, 100 * MS, 1500 * MS, frames, []) == (True, [])
    assert continuity_problems(steady, 2500 * MS, 3000 * MS, frames, []) == (False, [])
    gap = blocks(A, 0, 10) + blocks(A, 800, 20, frame=10 * BLOCK)
    playing, problems = continuity_problems(gap, 100 * MS, 1500 * MS, frames, [])
    assert playing and len(problems) == 1 and "gap 300.0 ms" in problems[0]
    # the master paused there and played on: explained
    assert continuity_problems(gap, 100 * MS, 1500 * MS, frames, [(400 * MS, 900 * MS)]) == (
        True,
        [],
    )
    jump = blocks(A, 0, 10) + blocks(A, 500, 20, frame=30 * BLOCK)
    assert "a jump of 1000.0 ms" in continuity_problems(jump, 100 * MS, 1500 * MS, frames, [])[1][0]
    nudged = blocks(A, 0, 10) + blocks(A, 500, 20, frame=10 * BLOCK + 30)  # re-anchored 0.7 ms
    assert continuity_problems(nudged, 100 * MS, 1500 * MS, frames, []) == (True, [])
    ended = blocks(B, 0, 10, frame=0) + blocks(A, 900, 10)  # B ran out: the next starts later
    assert continuity_problems(ended, 100 * MS, 1500 * MS, frames, []) == (True, [])
    stopped = blocks(A, 0, 10)
    assert "stopped playing" in continuity_problems(stopped, 100 * MS, 1500 * MS, frames, [])[1][0]


def test_a_change_every_node_made_together_during_a_command_is_the_clusters_own() -> None:
    """A forward the observers missed (its state went to a broker being killed): every node
    jumped to the next song at the same instant while a command was in flight. A break on one
    node only, or with no command in flight, stays a violation."""
    frames = {A: 100 * BLOCK, B: 100 * BLOCK}

    def forwarded(shift_ns: int) -> list[Block]:
        before = blocks(A, 0, 10)
        after = blocks(B, 500, 20)
        return before + [Block(b.t_ns + shift_ns, b.song, b.frame, b.frames, b.rate) for b in after]

    found = {
        n: continuity_breaks(forwarded(k * MS), 100 * MS, 1500 * MS, frames, [])
        for k, n in enumerate(("n1", "n2", "n3"))
    }
    assert all(playing and len(b) == 1 for playing, b in found.values())
    breaks = {n: b for n, (_, b) in found.items()}
    in_flight = [(300 * MS, 700 * MS)]
    assert unexplained_breaks(breaks, in_flight) == {"n1": [], "n2": [], "n3": []}
    assert unexplained_breaks(breaks, []) == breaks  # no command could have caused it
    # n3 alone stopped for a while (a master stepping down, say): not the cluster's doing
    _, alone = continuity_breaks(
        blocks(A, 0, 10) + blocks(A, 900, 20, frame=18 * BLOCK), 100 * MS, 1500 * MS, frames, []
    )
    steady = {n: [] for n in ("n1", "n2")}
    assert unexplained_breaks({**steady, "n3": alone}, [(0, 2000 * MS)])["n3"] == alone
    # every node stopping together during a pause command is the pause
    _, stop1 = continuity_breaks(blocks(A, 0, 10), 100 * MS, 1500 * MS, frames, [])
    _, stop2 = continuity_breaks(blocks(A, 0, 10), 100 * MS, 1500 * MS, frames, [])
    assert unexplained_breaks({"n1": stop1, "n2": stop2}, in_flight) == {"n1": [], "n2": []}


def test_rejoin_skew_compares_the_same_frames() -> None:
    ref = blocks(A, 0, 40)
    late = [Block(b.t_ns + 3 * MS, b.song, b.frame, b.frames, b.rate) for b in ref[10:]]
    assert rejoin_skew_ns(late, {"n1": ref, "n2": ref}, 0, 2000 * MS) == 3 * MS
    assert rejoin_skew_ns(late, {"n1": blocks(B, 0, 40)}, 0, 2000 * MS) is None


# -- the short profile ---------------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_hold_under_faults(
    seed: int, tmp_path: Path, mosquitto: None, no_leaked_processes: None
) -> None:
    result = run_chaos(ChaosConfig(seed, FAULTS_PER_SEED, tmp_path))
    report = result.report()
    print(report)
    assert result.error is None, report
    assert len(result.records) == FAULTS_PER_SEED
    assert len({r.fault.kind for r in result.records}) == FAULTS_PER_SEED
    for name in chaos.INVARIANTS:
        assert result.checked[name] > 0, f"{name} never checked\n{report}"
    assert result.passed, report
