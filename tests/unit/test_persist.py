"""Durable node state: atomic saves, corrupt files kept aside, the player state at rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsync_mqtt.errors import ProtocolError
from nsync_mqtt.persist import Durable, StateFile
from nsync_mqtt.playlist import PAUSED, PLAYING, Playback, PlayerState

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
