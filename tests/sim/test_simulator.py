"""The deterministic cluster simulator (nsync_lab.sim): the real roles of every node on a
simulated broker, disks, clocks and sinks under seeded faults. The CI profile runs here; the
long profile is bench/bench_sim.py."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nsync_lab.sim.cluster import Simulation, Violation
from nsync_lab.sim.faults import Fault
from nsync_lab.sim.run import main, replay_command, run_seed, run_seeds

CI_SEEDS = 500


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)  # the nodes' own logs, thousands of lines a seed
    yield
    logging.disable(logging.NOTSET)


def test_the_ci_profile_breaks_no_invariant() -> None:
    failures, totals = run_seeds(range(CI_SEEDS), "ci", jobs=min(2, os.cpu_count() or 1))
    print(json.dumps(totals))
    assert totals["seeds"] == CI_SEEDS or failures
    assert not failures, "\n".join(
        f"seed {o.seed}: {o.error}\n  replay: {replay_command(o.seed, 'ci')}" for o in failures
    )
    # the seeds did real work: faults, commands answered, enqueues acknowledged
    assert totals["faults"] >= 9 * CI_SEEDS and totals["acked_enqueues"] >= 10 * CI_SEEDS


UNSIGNED_SEEDS = 100


def test_the_unsigned_profile_breaks_no_invariant() -> None:
    """The CI profile signs every internal message (the recommended set-up); a cluster
    without a key must hold the same invariants."""
    failures, totals = run_seeds(
        range(UNSIGNED_SEEDS), "unsigned", jobs=min(2, os.cpu_count() or 1)
    )
    print(json.dumps(totals))
    assert not failures, "\n".join(
        f"seed {o.seed}: {o.error}\n  replay: {replay_command(o.seed, 'unsigned')}"
        for o in failures
    )
    assert totals["seeds"] == UNSIGNED_SEEDS


def test_a_signed_simulation_refuses_the_duplicates_the_broker_delivers() -> None:
    """The simulated broker delivers some messages twice (as QoS 1 does): with a key they are
    refused as replays before the roles see them, and nothing else is refused."""
    refused: dict[str, int] = {}
    for seed in range(12):
        sim = Simulation(seed, nodes=3)
        sim.run()
        for n in sim.nodes.values():
            counts = [n.rejected, n.opener.rejected if n.opener else {}]
            for c in counts:
                for k, v in c.items():
                    refused[k] = refused.get(k, 0) + v
    assert set(refused) == {"replayed"} and refused["replayed"] > 0, refused


EDIT_SEEDS = 100


def test_the_edits_profile_breaks_no_invariant() -> None:
    """The CI profile's faults under a workload that also clears, removes, moves, inserts
    after the current song, replaces and announces."""
    failures, totals = run_seeds(range(EDIT_SEEDS), "edits", jobs=min(2, os.cpu_count() or 1))
    print(json.dumps(totals))
    assert not failures, "\n".join(
        f"seed {o.seed}: {o.error}\n  replay: {replay_command(o.seed, 'edits')}" for o in failures
    )
    assert totals["seeds"] == EDIT_SEEDS


def test_the_edits_workload_really_edits() -> None:
    done: set[str] = set()
    for seed in range(1, 5):  # a rare verb may miss one short run, not four
        sim = Simulation(seed, nodes=3, edits=True)
        sim.run()
        done |= {r["command"] for r in sim.client.replies if r["success"]}
    assert {"clear", "remove", "move", "replace", "announce", "enqueue"} <= done, done


def test_a_seed_replays_exactly() -> None:
    a, b = Simulation(7, nodes=5), Simulation(7, nodes=5)
    ra, rb = a.run(), b.run()
    assert ra.events == rb.events and ra.acked_enqueues == rb.acked_enqueues
    assert a.world.trace.lines() == b.world.trace.lines()
    assert a.client.replies == b.client.replies
    c = Simulation(8, nodes=5)
    c.run()
    assert c.world.trace.lines() != a.world.trace.lines()  # the seed matters


def test_a_divergent_node_is_caught_and_the_failure_replays(tmp_path: Path) -> None:
    """Make one node hold another content at a log position: the log-matching check fails."""
    sim = Simulation(3, nodes=3, faults=0)

    def corrupt() -> None:
        node = next(n for n in sim.nodes.values() if n.core and n.core.master is None)
        assert node.core is not None
        node.core.state = replace(node.core.state, volume=(node.core.state.volume + 1) % 101)
        sim.checker.after_event(node)

    sim.world.at(30.0, corrupt)
    with pytest.raises(Violation, match=r"holds .* but that position was made as"):
        sim.run()


def test_a_master_that_loses_an_acknowledged_enqueue_is_caught() -> None:
    """The end check compares the client's acknowledged enqueues with the final playlist."""
    sim = Simulation(5, nodes=3, faults=0)
    sim.world.at(40.0, lambda: sim.client.acked_enqueues.insert(0, "f" * 56))
    with pytest.raises(Violation, match="acknowledged enqueue of ffffffff missing"):
        sim.run()


def test_crashes_partitions_and_broker_restarts_are_survived() -> None:
    plan = [
        Fault(5.0, "broker_restart", None, {}, 7.0),
        Fault(10.0, "crash", 0, {}, 14.0),
        Fault(16.0, "partition", (1,), {"side": (1,), "other": (0, 2, 3, 4)}, 20.0),
        Fault(22.0, "oneway", 2, {"direction": "down"}, 26.0),
        Fault(27.0, "dup", None, {"p": 0.3}, 33.0),
    ]
    sim = Simulation(11, nodes=5, duration_s=50.0, faults_plan=plan)
    result = sim.run()
    assert result.faults == len(plan) and result.acked_enqueues > 10
    assert result.terms >= 2  # the restart and the partition cost the master its place


def test_the_runner_prints_a_replay_command_and_writes_a_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Simulation) -> None:
        raise Violation("planted")

    monkeypatch.setattr(Simulation, "final_checks", broken)
    assert main(["--seed", "4", "--trace-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "seed 4 broke an invariant: planted" in err
    assert "python -m nsync_lab.sim.run --seed 4 --profile ci" in err
    trace = (tmp_path / "sim-seed-4.txt").read_text()
    assert "# seed 4: fault plan" in trace and "boot" in trace
    assert run_seed(4).ok is False


def test_a_master_elected_without_a_committed_operation_is_caught() -> None:
    """Leader completeness: plant a committed operation no log holds, then kill the master."""
    sim = Simulation(6, nodes=3, faults=0)

    def plant_and_kill() -> None:
        sim.checker.committed.append(999)
        sim.checker.committed_in.append(0)
        master = next(n for n in sim.nodes.values() if n.core and n.core.master)
        master.crash()

    sim.world.at(30.0, plant_and_kill)
    with pytest.raises(Violation, match=r"became master of term \d+ without the operation"):
        sim.run()
