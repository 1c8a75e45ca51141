"""The partition rule (vote.IsolationWatch): when a masterless node gives up and stops playing."""

from __future__ import annotations

from nsync_mqtt.vote import IsolationWatch

PEERS = ["b", "c", "d", "e"]  # five nodes: a majority is 3


def watch() -> IsolationWatch:
    return IsolationWatch(window_s=0.8, grace_s=3.8, majority=3)


def test_a_node_that_hears_a_master_is_never_cut_off() -> None:
    w = watch()
    assert not any(w.cut_off(t / 10, "b", PEERS, {}) for t in range(100))


def test_cut_off_only_after_the_grace_and_without_a_quorum() -> None:
    w = watch()
    assert not w.cut_off(10.0, None, PEERS, {})  # the masterless spell starts here
    assert not w.cut_off(13.7, None, PEERS, {})
    assert w.cut_off(13.9, None, PEERS, {})


def test_two_peers_heard_means_an_election_can_still_succeed() -> None:
    w = watch()
    w.cut_off(0.0, None, PEERS, {})
    seen = {"b": 9.5, "c": 9.6}
    assert not w.cut_off(10.0, None, PEERS, seen)
    assert w.cut_off(10.0, None, PEERS, {"b": 9.5, "c": 9.1})  # c heard too long ago
    assert w.heard(10.0, PEERS, seen) == 2


def test_a_master_that_steps_down_gets_the_whole_grace() -> None:
    """A node masterless long ago, then master for a while (its own name as the master), then
    stepping down: its spell without a master starts at the step-down."""
    w = watch()
    w.cut_off(0.0, None, PEERS, {})
    w.cut_off(0.5, "a", PEERS, {})  # elected
    for t in range(6, 100):
        w.cut_off(t / 10, "a", PEERS, {})
    assert not w.cut_off(10.0, None, PEERS, {})  # steps down, the broker gone
    assert not w.cut_off(10.1, None, PEERS, {})
    assert not w.cut_off(13.7, None, PEERS, {})
    assert w.cut_off(13.9, None, PEERS, {})


def test_hearing_a_master_ends_the_spell() -> None:
    w = watch()
    w.cut_off(0.0, None, PEERS, {})
    w.cut_off(3.0, "c", PEERS, {})
    assert not w.cut_off(4.0, None, PEERS, {})
    assert not w.cut_off(7.7, None, PEERS, {})
    assert w.cut_off(7.9, None, PEERS, {})
