"""TransferQueue: the chunks a master owes, merged, without duplicates, taking turns."""

from __future__ import annotations

from nsync_mqtt.replication import TransferQueue

A, B = "a" * 56, "b" * 56


def drain(q: TransferQueue) -> list[tuple[str, str, int]]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_empty_queue_owes_nothing() -> None:
    q = TransferQueue()
    q.add("to/n1", A, [])
    assert len(q) == 0 and q.pop() is None


def test_a_repeated_request_adds_only_the_chunks_not_already_owed() -> None:
    q = TransferQueue()
    q.add("to/n1", A, [0, 1, 2])
    q.add("to/n1", A, [2, 3, 1])
    assert len(q) == 4
    assert drain(q) == [("to/n1", A, i) for i in (0, 1, 2, 3)]


def test_destinations_and_songs_take_turns() -> None:
    q = TransferQueue()
    q.add("to/n1", A, [0, 1, 2])
    q.add("to/n2", A, [5, 6])
    q.add("to/n1", B, [7])
    assert drain(q) == [
        ("to/n1", A, 0),
        ("to/n2", A, 5),
        ("to/n1", B, 7),
        ("to/n1", A, 1),
        ("to/n2", A, 6),
        ("to/n1", A, 2),
    ]


def test_a_chunk_sent_can_be_asked_for_again() -> None:
    q = TransferQueue()
    q.add("to/n1", A, [0, 1])
    assert q.pop() == ("to/n1", A, 0)
    q.add("to/n1", A, [0])  # lost on the way: asked again
    assert drain(q) == [("to/n1", A, 1), ("to/n1", A, 0)]


def test_drop_forgets_a_song_for_every_destination() -> None:
    q = TransferQueue()
    q.add("to/n1", A, [0, 1])
    q.add("to/n2", A, [0])
    q.add("to/n2", B, [3])
    q.drop(A)
    assert drain(q) == [("to/n2", B, 3)]
