"""The simulator's world: event order, cancel, determinism, trace, and the node clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsync_lab.sim import SimClock, Trace, World


def test_events_run_in_time_order_and_ties_in_scheduling_order() -> None:
    w = World(1)
    ran: list[tuple[float, str]] = []
    w.at(2.0, lambda: ran.append((w.now, "c")))
    w.at(1.0, lambda: ran.append((w.now, "a")))
    w.at(1.0, lambda: ran.append((w.now, "b")))
    w.after(0.5, lambda: ran.append((w.now, "first")))
    w.run_until(10.0)
    assert ran == [(0.5, "first"), (1.0, "a"), (1.0, "b"), (2.0, "c")]
    assert w.now == 10.0
    assert w.events_run == 4


def test_an_event_scheduled_for_now_runs_after_the_ones_already_due() -> None:
    w = World(1)
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        w.after(0.0, ran.append, "spawned")

    w.at(1.0, first)
    w.at(1.0, ran.append, "second")
    w.run_until(1.0)
    assert ran == ["first", "second", "spawned"]


def test_run_until_stops_at_the_boundary_and_leaves_later_events() -> None:
    w = World(1)
    ran: list[float] = []
    for t in (0.1, 0.2, 0.3):
        w.at(t, lambda: ran.append(w.now))
    w.run_until(0.2)
    assert ran == [0.1, 0.2]
    assert w.now == 0.2
    assert w.next_time() == 0.3
    w.run_for(1.0)
    assert ran == [0.1, 0.2, 0.3]
    assert w.now == pytest.approx(1.2)


def test_cancel_stops_a_callback_and_step_skips_it() -> None:
    w = World(1)
    ran: list[str] = []
    t1 = w.at(1.0, ran.append, "cancelled")
    t2 = w.at(2.0, ran.append, "kept")
    assert t1.active and t1.time == 1.0
    t1.cancel()
    assert not t1.active
    assert t2.active
    assert w.step() is True
    assert ran == ["kept"] and w.now == 2.0
    assert w.step() is False
    assert not t2.active  # it ran
    assert w.events_run == 1


def test_scheduling_in_the_past_is_refused() -> None:
    w = World(1)
    w.run_until(5.0)
    with pytest.raises(ValueError):
        w.at(4.0, print)
    with pytest.raises(ValueError):
        w.after(-1.0, print)
    with pytest.raises(ValueError):
        w.run_until(1.0)


def _random_run(seed: int) -> list[str]:
    w = World(seed)
    net = w.fork_rng("net")

    def hop(i: int) -> None:
        w.log(i % 3, "hop", f"{i} {w.rng.random():.6f}")
        if i % 1000 < 200:
            w.after(net.expovariate(1000.0), hop, i + 1)

    for start in range(3):
        w.after(w.rng.random() * 0.01, hop, start * 1000)
    w.run_until(10.0)
    return w.trace.lines()


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    a = _random_run(42)
    assert len(a) > 300
    assert a == _random_run(42)
    assert a != _random_run(43)


def test_fork_rng_streams_are_independent_of_each_other_and_of_the_main_rng() -> None:
    w = World(7)
    a = [w.fork_rng("a").random() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert w.fork_rng("a").random() != w.fork_rng("b").random()
    assert World(7).fork_rng("a").random() == a[0]
    assert World(8).fork_rng("a").random() != a[0]


def test_trace_is_a_bounded_ring_and_dumps_readable_text(tmp_path: Path) -> None:
    tr = Trace(capacity=3)
    for i in range(5):
        tr.record(i * 0.5, f"n{i}", "kind", f"line {i}")
    assert len(tr) == 3 and tr.total == 5
    assert [r[3] for r in tr.records()] == ["line 2", "line 3", "line 4"]
    path = tmp_path / "trace.txt"
    tr.dump(path)
    text = path.read_text().splitlines()
    assert text[0].startswith("# 2 earlier records dropped")
    assert "n4" in text[-1] and "line 4" in text[-1] and "2.000000" in text[-1]


def test_world_log_stamps_the_current_time() -> None:
    w = World(1)
    w.at(1.5, w.log, "node1", "elect", "term 3")
    w.run_until(2.0)
    assert w.trace.records() == [(1.5, "node1", "elect", "term 3")]


def test_event_loop_is_fast() -> None:
    w = World(1)
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1

    for i in range(20_000):
        w.post(i * 1e-4, tick, ())
    w.run_until(10.0)
    assert count == 20_000


# --- SimClock --------------------------------------------------------------------------


def test_clock_reads_offset_plus_drifted_true_time() -> None:
    w = World(1)
    c = SimClock(w, offset_s=100.0, drift_ppm=50.0)
    assert c.now() == 100.0
    w.run_until(1000.0)
    assert c.now() == pytest.approx(100.0 + 1000.0 * (1 + 50e-6))
    assert c.to_true(c.now()) == pytest.approx(1000.0)
    assert c.from_true(2000.0) == pytest.approx(100.0 + 2000.0 * (1 + 50e-6))
    assert c.to_host(c.from_host(1234.5)) == pytest.approx(1234.5)


def test_clock_step_jumps_the_local_reading_only() -> None:
    w = World(1)
    c = SimClock(w, offset_s=5.0)
    w.run_until(10.0)
    c.step(-2.5)
    assert c.now() == pytest.approx(12.5)
    assert w.now == 10.0
    assert c.to_true(20.0) == pytest.approx(17.5)


def test_clock_drift_change_keeps_the_reading_continuous() -> None:
    w = World(1)
    c = SimClock(w, offset_s=0.0, drift_ppm=0.0)
    w.run_until(100.0)
    before = c.now()
    c.set_drift(1000.0)
    assert c.now() == pytest.approx(before)
    w.run_until(200.0)
    assert c.now() == pytest.approx(100.0 + 100.0 * 1.001)
