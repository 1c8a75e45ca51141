"""Durable node state: atomic snapshots, the log after them (replayed, torn tails ignored,
compacted), corrupt files kept aside, the player state at rest."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.persist import Durable, StateFile
from nsync_mqtt.playlist import (
    PAUSED,
    PLAYING,
    RATE,
    Context,
    Playback,
    PlayerState,
    apply_command,
    playlist_hash,
    start_term,
)

SONG = "a" * 56
REST = PlayerState().to_dict()


def state(pb: Playback) -> PlayerState:
    return PlayerState((SONG,), pb, volume=40, index=7)


def test_round_trip_and_no_rewrite_when_unchanged(tmp_path: Path) -> None:
    f = StateFile(tmp_path / "state.json")
    assert f.load() == Durable()
    d = Durable(3, "n2", state(Playback(PAUSED, 0, SONG, 4410, None)), (3, 7), 1_795_000_000.25)
    assert f.save(d) is True
    assert f.save(d) is False  # nothing changed: no I/O
    assert StateFile(tmp_path / "state.json").load() == d
    assert not (tmp_path / "state.tmp").exists()


def test_a_corrupt_file_is_set_aside_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"format": 1, "term": "x"')
    assert StateFile(path).load() == Durable()
    assert (tmp_path / "state.corrupt").read_text().startswith('{"format": 1')
    assert not path.exists()


@pytest.mark.parametrize(
    "doc",
    [
        {"format": 3},
        {"format": 2},
        {"format": 1, "term": -1, "voted_for": None, "state": {}, "last_log": [0, 0]},
        {"format": 1, "term": 1, "voted_for": "Bad Id", "state": {}, "last_log": [0, 0]},
        {"format": 1, "term": 1, "voted_for": None, "state": {}, "last_log": [0]},
        {"format": 1, "term": True, "voted_for": None, "state": {}, "last_log": [0, 0]},
        {
            "format": 1,
            "term": 1,
            "voted_for": None,
            "state": REST,
            "last_log": [1, 1],
            "last_log_at": "noon",
        },
        {
            "format": 1,
            "term": 1,
            "voted_for": None,
            "state": REST,
            "last_log": [1, 1],
            "last_log_at": float("nan"),
        },
    ],
)
def test_bad_documents_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        Durable.from_dict(json.loads(json.dumps(doc)))


HUGE = 2**63  # one past the largest integer NSync stores


@pytest.mark.parametrize(
    "change",
    [
        {"term": HUGE},
        {"last_log": [HUGE, 1]},
        {"last_log": [1, HUGE]},
        {"state": {**REST, "index": HUGE}},
        {"state": {**REST, "term": HUGE}},
        {"state": {**REST, "playlist": [SONG], "playback": {**REST["playback"], "frame": HUGE}}},
        {"state": {**REST, "playlist": [SONG], "playback": {**REST["playback"], "slot": HUGE}}},
    ],
)
def test_integers_too_large_for_64_bits_are_refused_on_reload(change: dict[str, object]) -> None:
    doc = {"format": 1, "term": 1, "voted_for": None, "state": REST, "last_log": [1, 1]}
    Durable.from_dict(json.loads(json.dumps(doc)))  # as is, it loads
    with pytest.raises(ProtocolError):
        Durable.from_dict(json.loads(json.dumps({**doc, **change})))


def test_a_file_from_before_the_time_was_kept_still_loads() -> None:
    doc = {"format": 1, "term": 2, "voted_for": "n1", "state": REST, "last_log": [2, 5]}
    d = Durable.from_dict(doc)
    assert (d.term, d.voted_for, d.last_log, d.last_log_at) == (2, "n1", (2, 5), None)


def test_at_rest_keeps_the_place_and_drops_the_schedule() -> None:
    playing = state(Playback(PLAYING, 0, SONG, 88200, 12345.5))
    rest = playing.at_rest()
    assert rest.playback == Playback(PAUSED, 0, SONG, 88200, None)
    assert (rest.playlist, rest.volume, rest.index) == (playing.playlist, 40, 7)
    idle = state(Playback("idle", 0, SONG, 0, 99.0)).at_rest()
    assert idle.playback == Playback("idle", 0, SONG, 0, None)
    unscheduled = state(Playback(PAUSED, 0, SONG, 10, None))
    assert unscheduled.at_rest() is unscheduled


# --- the log after the snapshot ---------------------------------------------------------------


def song(i: int) -> str:
    return hashlib.sha224(f"song {i}".encode()).hexdigest()


FRAMES = {song(i): 10 * RATE for i in range(50)}


class Node:
    """Just enough of a node: applies commands as master, keeps its durable state."""

    def __init__(self, f: StateFile, d: Durable | None = None) -> None:
        self.f = f
        self.d = d or Durable(1, "n1", PlayerState(), (0, 0), None)
        self.t = 1_795_000_000.0

    def command(self, verb: str, arg: object = None) -> tuple[Durable, dict[str, object]]:
        self.t += 1.5
        ctx = Context(now=self.t, lead_s=0.25, song_frames=FRAMES, term=self.d.term)
        state, op = apply_command(self.d.state, verb, arg, ctx)
        self.d = replace(self.d, state=state, last_log=state.last, last_log_at=self.t)
        return self.d, op

    def append(self, verb: str, arg: object = None) -> None:
        d, op = self.command(verb, arg)
        assert self.f.append(d, json.loads(json.dumps(op))) is True

    def run(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            self.append("enqueue", song(i % 50))
            if i % 7 == 0:
                self.append("play" if self.d.state.playback.state != PLAYING else "pause")


def fresh(tmp_path: Path, **kw: int) -> StateFile:
    return StateFile(tmp_path / "state.json", **kw)


def reloaded(tmp_path: Path, **kw: int) -> Durable:
    return fresh(tmp_path, **kw).load()


def test_appends_go_to_the_log_and_a_restart_replays_them(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    assert f.save(node.d) is True  # the first write: a snapshot
    snap = (tmp_path / "state.json").stat()
    node.run(30)
    assert len(node.d.state.playlist) == 30
    assert (f.snapshots_written, f.records_written) == (1, 35)
    after = (tmp_path / "state.json").stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        snap.st_ino,
        snap.st_mtime_ns,
        snap.st_size,
    )
    again = reloaded(tmp_path)
    assert again == node.d
    assert again.state.hash == playlist_hash(again.state.playlist)


def test_a_restarted_node_goes_on_appending_to_the_same_log(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(5)
    g = fresh(tmp_path)
    node.d = g.load()
    node.f = g
    node.run(5, start=5)
    assert g.snapshots_written == 0
    assert reloaded(tmp_path) == node.d


def test_a_vote_alone_is_one_record(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(3)
    voted = replace(node.d, term=2, voted_for="n3")
    assert f.save(voted) is True
    assert f.save(replace(voted)) is False  # equal: nothing written
    assert f.snapshots_written == 1
    last = (tmp_path / "oplog.jsonl").read_text().splitlines()[-1]
    assert json.loads(last) == {"k": "vote", "term": 2, "voted_for": "n3"}
    assert reloaded(tmp_path) == voted


def test_an_op_in_a_new_term_logs_the_vote_first(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(2)
    node.d = replace(node.d, term=4, voted_for=None)
    state, op = start_term(node.d.state, 4)
    node.d = replace(node.d, state=state, last_log=state.last, last_log_at=node.t)
    assert f.append(node.d, op) is True
    kinds = [json.loads(x)["k"] for x in (tmp_path / "oplog.jsonl").read_text().splitlines()]
    assert kinds[-2:] == ["vote", "op"]
    assert reloaded(tmp_path) == node.d


def test_any_change_that_keeps_the_playlist_start_is_one_record(tmp_path: Path) -> None:
    """What the node saves without an op (a sync that extends the playlist, the playback moved
    onto a new master's clock): a state record, not a snapshot."""
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(4)
    ahead = node.d.state.with_songs((song(7), song(8)), index=node.d.state.index + 2)
    d = replace(node.d, state=ahead, last_log=ahead.last, last_log_at=None)
    assert f.save(d) is True
    moved = replace(d.state, playback=replace(d.state.playback, at=123.5))
    d = replace(d, state=moved)
    assert f.save(d) is True
    synced = PlayerState.from_dict(d.state.to_dict())  # a distinct but equal state: nothing new
    assert f.save(replace(d, state=synced)) is False
    assert f.snapshots_written == 1
    assert reloaded(tmp_path) == d


def test_another_playlist_takes_a_snapshot(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(4)
    other = PlayerState((song(40), song(41)), Playback(), 50, 9, 2)
    d = Durable(2, "n2", other, (2, 9), None)
    assert f.save(d) is True
    assert f.snapshots_written == 2
    assert (tmp_path / "oplog.jsonl").read_text().count("\n") == 1  # an empty log: its header
    assert reloaded(tmp_path) == d


def test_append_of_a_state_the_op_does_not_make_falls_back_to_save(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(3)
    d, op = node.command("volume", "+5")
    skewed = replace(d, state=replace(d.state, playback=replace(d.state.playback, frame=99)))
    assert f.append(skewed, op) is True
    assert json.loads((tmp_path / "oplog.jsonl").read_text().splitlines()[-1])["k"] == "state"
    assert reloaded(tmp_path) == skewed
    assert f.append(skewed, op) is False  # held already and nothing else changed


def test_the_log_is_compacted_into_a_snapshot(tmp_path: Path) -> None:
    f = fresh(tmp_path, compact_records=10)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(40)
    assert f.snapshots_written == 1 + (40 + 6) // 11  # every 11th write is a snapshot
    assert len((tmp_path / "oplog.jsonl").read_text().splitlines()) <= 11
    assert reloaded(tmp_path) == node.d
    g = fresh(tmp_path, compact_bytes=2000)
    node.d, node.f = g.load(), g
    node.run(20)
    assert g.snapshots_written >= 2
    assert (tmp_path / "oplog.jsonl").stat().st_size < 2000 + 1000
    assert reloaded(tmp_path) == node.d


def test_a_crash_between_snapshot_and_new_log_keeps_the_snapshot(tmp_path: Path) -> None:
    f = fresh(tmp_path, compact_records=10)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(8)  # 10 records: the next write is a snapshot
    old_log = (tmp_path / "oplog.jsonl").read_bytes()
    node.append("volume", "+1")
    assert f.snapshots_written == 2
    (tmp_path / "oplog.jsonl").write_bytes(old_log)  # as if the crash came before the new log
    assert reloaded(tmp_path) == node.d
    (tmp_path / "oplog.jsonl").write_bytes(old_log + b"garbage\n" + old_log)
    assert reloaded(tmp_path) == node.d  # what a stale log holds does not matter
    g = fresh(tmp_path)
    node.d, node.f = g.load(), g
    node.append("volume", "+1")  # the stale log is replaced, not appended to
    assert g.snapshots_written == 1
    assert reloaded(tmp_path) == node.d


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(3)
    kept = node.d
    log_path = tmp_path / "oplog.jsonl"
    good = log_path.read_bytes()
    for torn in (b'{"k":"op","op":{"op":"enq', b'{"k":"op","op":{"op":"enq\n', b"\0\0\0"):
        log_path.write_bytes(good + torn)
        g = fresh(tmp_path)
        assert g.load() == kept
    node.d, node.f = g.load(), g
    node.append("volume", "+3")  # after a torn tail, a snapshot and a new log
    assert g.snapshots_written == 1
    assert not log_path.read_bytes().endswith(torn)
    assert reloaded(tmp_path) == node.d


@pytest.mark.parametrize(
    "bad",
    [
        b"not json\n",
        b'{"k":"vote","term":-1,"voted_for":null}\n',
        b'{"k":"surprise"}\n',
        b"[1,2]\n",
    ],
)
def test_corruption_before_the_last_line_is_set_aside(tmp_path: Path, bad: bytes) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(4)
    log_path = tmp_path / "oplog.jsonl"
    lines = log_path.read_bytes().splitlines(keepends=True)
    log_path.write_bytes(b"".join([*lines[:2], bad, *lines[2:]]))
    assert reloaded(tmp_path) == Durable()
    assert not log_path.exists() and not (tmp_path / "state.json").exists()
    assert (tmp_path / "oplog.corrupt").read_bytes().count(b"\n") == len(lines) + 1
    assert json.loads((tmp_path / "state.corrupt").read_text())["term"] == 1


def test_a_record_that_does_not_replay_is_corruption(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(2)
    log_path = tmp_path / "oplog.jsonl"
    lines = log_path.read_text().splitlines()
    rec = json.loads(lines[-1])
    rec["op"]["pre"] = song(49)  # the playlist before it was another
    log_path.write_text("\n".join([*lines[:-1], json.dumps(rec)]) + "\n")
    assert reloaded(tmp_path) == Durable()
    assert (tmp_path / "oplog.corrupt").exists()


def test_a_snapshot_written_before_the_log_existed_still_loads(tmp_path: Path) -> None:
    doc = {
        "format": 1,
        "term": 2,
        "voted_for": "n1",
        "state": PlayerState((SONG,), Playback(PAUSED, 0, SONG, 10, None), 40, 5, 2).to_dict(),
        "last_log": [2, 5],
        "last_log_at": 1_795_000_000.5,
    }
    (tmp_path / "state.json").write_text(json.dumps(doc))
    f = fresh(tmp_path)
    d = f.load()
    assert (d.term, d.voted_for, d.last_log, d.state.playlist) == (2, "n1", (2, 5), (SONG,))
    assert f.save(replace(d, term=3)) is True  # the first write makes a snapshot and its log
    assert f.snapshots_written == 1
    assert json.loads((tmp_path / "state.json").read_text())["format"] == 2
    assert reloaded(tmp_path) == replace(d, term=3)


def test_a_log_without_its_snapshot_is_not_trusted(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(2)
    (tmp_path / "state.json").unlink()
    assert reloaded(tmp_path) == Durable()


def test_a_reader_beside_the_node_sees_the_log_and_sets_nothing_aside(tmp_path: Path) -> None:
    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(3)
    assert fresh(tmp_path).read() == node.d
    node.append("volume", "+2")  # the writer goes on: a reader wrote nothing
    assert fresh(tmp_path).read() == node.d
    log_path = tmp_path / "oplog.jsonl"
    log_path.write_bytes(b"junk\n" + log_path.read_bytes())
    with pytest.raises(ProtocolError):
        fresh(tmp_path).read()
    assert log_path.exists() and not (tmp_path / "oplog.corrupt").exists()


def test_after_a_failed_append_the_next_write_is_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nsync_mqtt.persist as persist

    f = fresh(tmp_path)
    f.load()
    node = Node(f)
    f.save(node.d)
    node.run(2)
    log_path = tmp_path / "oplog.jsonl"

    def failing(fd: int) -> None:
        os.write(fd, b'{"k":"op","op":{"op":"vol')  # what a full disk might leave
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "_sync_data", failing)
    d, op = node.command("volume", "+4")
    with pytest.raises(OSError):
        f.append(d, op)
    monkeypatch.undo()
    assert f.append(d, op) is True
    assert f.snapshots_written == 2
    assert b"vol" not in log_path.read_bytes()
    assert reloaded(tmp_path) == d
