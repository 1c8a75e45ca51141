"""Background song transfers: the chunks a master owes (merged, without duplicates, taking
turns), what it pushes to a recovering node, and when a node asks again."""

from __future__ import annotations

import pytest

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.replication import (
    TransferQueue,
    choose_source,
    next_retry_s,
    parse_held,
    songs_to_push,
    stalled_songs,
)

A, B = "a" * 56, "b" * 56


def drain(q: TransferQueue) -> list[tuple[str, str, int]]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_empty_queue_owes_nothing() -> None:
    q = TransferQueue()
    q.add("n1", A, [])
    assert len(q) == 0 and q.pop() is None


def test_a_repeated_request_adds_only_the_chunks_not_already_owed() -> None:
    q = TransferQueue()
    q.add("n1", A, [0, 1, 2])
    q.add("n1", A, [2, 3, 1])
    assert len(q) == 4
    assert drain(q) == [("n1", A, i) for i in (0, 1, 2, 3)]


def test_destinations_and_songs_take_turns() -> None:
    q = TransferQueue()
    q.add("n1", A, [0, 1, 2])
    q.add("n2", A, [5, 6])
    q.add("n1", B, [7])
    assert drain(q) == [
        ("n1", A, 0),
        ("n2", A, 5),
        ("n1", B, 7),
        ("n1", A, 1),
        ("n2", A, 6),
        ("n1", A, 2),
    ]


def test_a_chunk_sent_can_be_asked_for_again() -> None:
    q = TransferQueue()
    q.add("n1", A, [0, 1])
    assert q.pop() == ("n1", A, 0)
    q.add("n1", A, [0])  # lost on the way: asked again
    assert drain(q) == [("n1", A, 1), ("n1", A, 0)]


def test_drop_forgets_a_song_for_every_destination() -> None:
    q = TransferQueue()
    q.add("n1", A, [0, 1])
    q.add("n2", A, [0])
    q.add("n2", B, [3])
    q.drop(A)
    assert drain(q) == [("n2", B, 3)]


# -- what a master pushes to a recovering node, and when a node asks again ---------------------

C = "c" * 56


def test_the_master_pushes_the_playlist_songs_the_node_lacks() -> None:
    push = songs_to_push([A, B, C, A], master_holds={A, B, C}, node_holds={B}, node_partial={})
    assert push == {A: None, C: None}


def test_a_partly_received_song_is_pushed_from_where_the_node_stopped() -> None:
    push = songs_to_push([A, B], master_holds={A, B}, node_holds=set(), node_partial={A: [7, 3]})
    assert push == {A: [3, 7], B: None}


def test_a_song_the_master_lacks_is_not_promised() -> None:
    assert songs_to_push([A, B], master_holds={B}, node_holds=set(), node_partial={}) == {B: None}


def test_parse_held_checks_the_sync_request() -> None:
    assert parse_held([A, B], {C: [0, 2]}) == ({A, B}, {C: [0, 2]})
    assert parse_held([], None) == (set(), {})
    for songs, partial in [
        ("nope", None),
        (["not a hash"], None),
        ([A], [1, 2]),
        ([A], {"x": [1]}),
        ([A], {C: [-1]}),
        ([A], {C: [True]}),
        ([A], {C: "0,1"}),
    ]:
        with pytest.raises(ProtocolError):
            parse_held(songs, partial)


def test_stalled_songs_are_those_without_progress_for_the_retry_time() -> None:
    progress = {A: 10.0, B: 12.5}
    assert stalled_songs(13.0, [A, B, C], progress, {}, 3.0) == [A, C]
    assert stalled_songs(13.0, [B, B], progress, {}, 3.0) == []
    assert stalled_songs(15.5, [B, B], progress, {}, 3.0) == [B]
    assert stalled_songs(15.5, [A, B], progress, {A: 6.0}, 3.0) == [B]  # A waits longer now


def test_a_song_that_keeps_stalling_is_asked_for_less_and_less_often() -> None:
    intervals = [3.0]
    for _ in range(6):
        intervals.append(next_retry_s(intervals[-1], 3.0, 60.0))
    assert intervals == [3.0, 6.0, 12.0, 24.0, 48.0, 60.0, 60.0]


def test_drop_node_forgets_what_a_quiet_node_was_owed() -> None:
    q = TransferQueue()
    q.add("n1", A, [0, 1])
    q.add("n2", A, [0])
    q.add("n1", B, [3])
    q.drop_node("n1")
    assert drain(q) == [("n2", A, 0)]


def test_a_node_asks_its_master_or_else_a_live_holder() -> None:
    seen = {"n2": 9.9, "n3": 9.8, "n4": 1.0}
    # the master holds it, or nobody else known to: ask the master
    assert choose_source("n1", "n2", {"n2", "n3"}, seen, 10.0, 3.0) == "n2"
    assert choose_source("n1", "n2", set(), seen, 10.0, 3.0) == "n2"
    # the master lacks it: a live holder (n4 went quiet long ago)
    assert choose_source("n1", "n2", {"n3", "n4"}, seen, 10.0, 3.0) == "n3"
    # a master lacking a song asks a speaker; nobody to ask
    assert choose_source("n2", "n2", {"n3"}, seen, 10.0, 3.0) == "n3"
    assert choose_source("n2", "n2", {"n2", "n4"}, seen, 10.0, 3.0) is None
    assert choose_source("n1", None, {"n4"}, seen, 10.0, 3.0) is None
