"""The master's commit tracking, pure: match indices, its own save, in-order commits,
expiry and step-down, with literal times."""

from __future__ import annotations

from nsync_mqtt.master import Commits, Failed

TIMEOUT = 2.0


def three(own: int = 4) -> Commits[str]:
    """A master of 3 nodes (f+1 = 2) whose own state was saved at index ``own``."""
    return Commits(majority=2, ack_timeout_s=TIMEOUT, own_index=own)


def test_an_op_commits_with_one_ack_and_the_masters_own_save() -> None:
    c = three()
    c.sent(10.0, 5, "play")
    assert c.ack("n2", 5, last_index=5) == []  # the master has not saved it yet
    assert c.saved(5) == ["play"]
    assert c.commit_index == 5


def test_acks_are_cumulative_and_commits_go_in_index_order() -> None:
    c = three()
    c.sent(10.0, 5, "term op's waiter")
    c.sent(10.0, 6, "volume")
    c.sent(10.0, 7, "pause")
    assert c.saved(7) == []
    assert c.ack("n3", 7, last_index=7) == ["term op's waiter", "volume", "pause"]
    assert c.commit_index == 7


def test_a_node_holding_less_of_the_term_commits_only_that_much() -> None:
    c = three()
    for i, who in ((5, "a"), (6, "b")):
        c.sent(10.0, i, who)
    c.saved(6)
    assert c.ack("n2", 5, last_index=6) == ["a"]
    assert c.ack("n2", 5, last_index=6) == []  # the same again changes nothing
    assert c.ack("n2", 6, last_index=6) == ["b"]


def test_an_ack_beyond_the_masters_own_last_index_counts_only_up_to_it() -> None:
    c = three()
    c.sent(10.0, 5, "a")
    c.saved(5)
    assert c.ack("n2", 99, last_index=5) == ["a"]
    assert c.match["n2"] == 5


def test_five_nodes_need_two_speakers() -> None:
    c: Commits[str] = Commits(majority=3, ack_timeout_s=TIMEOUT, own_index=0)
    c.sent(0.0, 1, "x")
    c.saved(1)
    assert c.ack("n2", 1, last_index=1) == []
    assert c.held_by(1) == 2
    assert c.ack("n5", 1, last_index=1) == ["x"]


def test_waiting_for_what_is_already_committed_answers_at_once() -> None:
    c = three()
    c.sent(10.0, 5, "a")
    c.saved(5)
    c.ack("n2", 5, last_index=5)
    assert c.wait(11.0, 5, "pause again") == ["pause again"]
    # not yet committed: it waits like any other
    c.sent(12.0, 6)
    assert c.wait(12.0, 6, "play again") == []
    c.saved(6)
    assert c.ack("n3", 6, last_index=6) == ["play again"]


def test_expiry_names_who_held_it_and_why_others_refused() -> None:
    c = three()
    c.sent(10.0, 5, "a")
    c.saved(5)
    c.refused("n2", "conflict: holds (3, 5)")
    assert c.expire(11.9) == []
    failed = c.expire(12.0)
    assert failed == [Failed("a", 1, (("n2", "conflict: holds (3, 5)"),))]
    assert c.drop() == []  # nothing waits any more
    # a late ack commits nothing it could answer, and no error either
    assert c.ack("n3", 5, last_index=5) == []


def test_stepping_down_hands_back_every_waiting_request() -> None:
    c = three()
    c.sent(10.0, 5, "a")
    c.sent(10.0, 6, "b")
    c.sent(10.0, 7)
    assert sorted(c.drop()) == ["a", "b"]
    assert c.expire(100.0) == []
