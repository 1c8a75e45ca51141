"""Player state: the master's commands and operations, and speakers replaying those operations."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from typing import Any

import pytest

from nsync_mqtt.errors import CommandError, NSyncError, ProtocolError, SongMissing
from nsync_mqtt.playlist import (
    BACKWARD_RESTART_S,
    IDLE,
    PAUSED,
    PLAYING,
    RATE,
    Context,
    Mismatch,
    Playback,
    PlayerState,
    apply_command,
    apply_op,
    next_song,
    playlist_hash,
)


def sha(name: str) -> str:
    return hashlib.sha224(name.encode()).hexdigest()


A, B, C = sha("a"), sha("b"), sha("c")
UNKNOWN = sha("never loaded")
FRAMES = {A: 10 * RATE, B: 20 * RATE, C: 5 * RATE}
LEAD = 0.25  # exact in binary, so scheduled instants and frames are exact


def ctx(now: float, frames: dict[str, int] = FRAMES) -> Context:
    return Context(now=now, lead_s=LEAD, song_frames=frames)


def run(state: PlayerState, verb: str, arg: Any = None, now: float = 0.0) -> PlayerState:
    return apply_command(state, verb, arg, ctx(now))[0]


def loaded(*songs: str) -> PlayerState:
    state = PlayerState()
    for s in songs:
        state = run(state, "enqueue", s)
    return state


def playing(*songs: str, slot: int = 0, now: float = 10.0) -> PlayerState:
    """`songs` enqueued, slot `slot` playing from frame 0 at now+LEAD."""
    state = loaded(*songs)
    for _ in range(slot):
        state = run(state, "forward")
    return run(state, "play", now=now)


# --- playlist_hash ----------------------------------------------------------------------------


def test_playlist_hash_equal_for_equal_playlists() -> None:
    assert playlist_hash((A, B)) == playlist_hash((A, B))
    assert PlayerState((A, B)).hash == playlist_hash((A, B))


def test_playlist_hash_depends_on_order_content_and_length() -> None:
    hashes = {
        playlist_hash(()),
        playlist_hash((A,)),
        playlist_hash((A, B)),
        playlist_hash((B, A)),
        playlist_hash((A, A)),
        playlist_hash((A, B, C)),
    }
    assert len(hashes) == 6
    assert all(len(h) == 56 for h in hashes)


# --- enqueue ----------------------------------------------------------------------------------


def test_enqueue_on_empty_playlist_slots_the_song() -> None:
    new, op = apply_command(PlayerState(), "enqueue", A, ctx(1.0))
    assert new.playlist == (A,)
    assert new.playback == Playback(IDLE, 0, A, 0, None)
    assert new.slotted == A
    assert new.index == 1
    assert op == {
        "op": "enqueue",
        "index": 1,
        "pre": playlist_hash(()),
        "post": playlist_hash((A,)),
        "song": A,
        "playback": new.playback.to_dict(),
    }


def test_enqueue_behind_a_slotted_song_leaves_playback_alone() -> None:
    state = playing(A)
    new, op = apply_command(state, "enqueue", B, ctx(11.0))
    assert new.playlist == (A, B)
    assert new.playback == state.playback
    assert (op["pre"], op["post"], op["index"]) == (state.hash, new.hash, state.index + 1)


def test_enqueue_after_the_playlist_ended_slots_the_new_song() -> None:
    ended = run(playing(A), "forward", now=11.0)
    assert ended.playback.song is None
    new = run(ended, "enqueue", B, now=12.0)
    assert new.playlist == (A, B)
    assert (new.playback.slot, new.playback.song, new.playback.state) == (1, B, IDLE)
    assert run(new, "play", now=13.0).playback == Playback(PLAYING, 1, B, 0, 13.25)


def test_enqueue_of_an_unloaded_song_is_song_missing() -> None:
    state = loaded(A)
    with pytest.raises(SongMissing, match="not loaded"):
        apply_command(state, "enqueue", UNKNOWN, ctx(1.0))
    assert issubclass(SongMissing, CommandError)


@pytest.mark.parametrize("arg", ["not a hash", A.upper(), None, 5])
def test_enqueue_of_a_malformed_hash_is_refused(arg: Any) -> None:
    # The node resolves titles before this point; a malformed hash is a ProtocolError today.
    with pytest.raises(NSyncError):
        apply_command(loaded(A), "enqueue", arg, ctx(1.0))


# --- play / pause / stop ----------------------------------------------------------------------


def test_play_schedules_the_slotted_song_at_now_plus_lead() -> None:
    state = loaded(A, B)
    new, op = apply_command(state, "play", None, ctx(10.0))
    assert new.playback == Playback(PLAYING, 0, A, 0, 10.25)
    assert new.index == state.index + 1
    assert op == {
        "op": "playback",
        "index": new.index,
        "pre": state.hash,
        "post": state.hash,
        "playback": {"state": PLAYING, "slot": 0, "song": A, "frame": 0, "at": 10.25},
    }


def test_pause_stops_at_now_plus_lead_at_the_frame_reached_then() -> None:
    state = playing(A, now=10.0)  # frame 0 at 10.25
    new, op = apply_command(state, "pause", None, ctx(12.0))
    assert new.playback == Playback(PAUSED, 0, A, 2 * RATE, 12.25)
    assert op["playback"]["frame"] == 2 * RATE
    assert op["playback"]["state"] == PAUSED


def test_pause_before_a_scheduled_start_keeps_the_start_frame() -> None:
    state = playing(A, now=10.0)  # frame 0 at 10.25
    new = run(state, "pause", now=9.0)  # pause lands at 9.25, before the start
    assert new.playback == Playback(PAUSED, 0, A, 0, 9.25)


def test_play_after_pause_resumes_from_the_paused_frame() -> None:
    paused = run(playing(A, now=10.0), "pause", now=12.0)
    resumed = run(paused, "play", now=30.0)
    assert resumed.playback == Playback(PLAYING, 0, A, 2 * RATE, 30.25)
    assert resumed.playback.frame_at(31.25) == 3 * RATE


def test_play_on_an_empty_playlist_is_refused() -> None:
    with pytest.raises(CommandError, match="empty"):
        apply_command(PlayerState(), "play", None, ctx(1.0))


def test_play_while_playing_is_refused() -> None:
    with pytest.raises(CommandError, match="already playing"):
        apply_command(playing(A), "play", None, ctx(11.0))


def test_play_after_the_playlist_ended_starts_again_from_the_top() -> None:
    ended = run(playing(A, B, slot=1), "forward", now=11.0)
    assert ended.playback.song is None
    assert run(ended, "play", now=12.0).playback == Playback(PLAYING, 0, A, 0, 12.25)


@pytest.mark.parametrize("state", [PlayerState(), loaded(A)])
def test_pause_when_not_playing_is_refused(state: PlayerState) -> None:
    with pytest.raises(CommandError, match="not playing"):
        apply_command(state, "pause", None, ctx(1.0))


def test_stop_rewinds_to_frame_zero_of_the_slotted_song() -> None:
    state = playing(A, B, slot=1, now=10.0)
    new, op = apply_command(state, "stop", None, ctx(15.0))
    assert new.playback == Playback(IDLE, 1, B, 0, 15.25)
    assert op["playback"]["state"] == IDLE
    assert run(new, "play", now=20.0).playback == Playback(PLAYING, 1, B, 0, 20.25)


def test_stop_from_pause_goes_idle() -> None:
    paused = run(playing(A, now=10.0), "pause", now=12.0)
    assert run(paused, "stop", now=13.0).playback == Playback(IDLE, 0, A, 0, 13.25)


@pytest.mark.parametrize("state", [PlayerState(), loaded(A)])
def test_stop_when_already_stopped_is_refused(state: PlayerState) -> None:
    with pytest.raises(CommandError, match="already stopped"):
        apply_command(state, "stop", None, ctx(1.0))


# --- forward / backward -----------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["forward", "next"])
def test_forward_while_playing_starts_the_next_song(verb: str) -> None:
    state = playing(A, B, C, now=10.0)
    new, op = apply_command(state, verb, None, ctx(14.0))
    assert new.playback == Playback(PLAYING, 1, B, 0, 14.25)
    assert op["op"] == "playback"
    assert op["playback"]["song"] == B


def test_forward_while_paused_cues_the_next_song_paused() -> None:
    paused = run(playing(A, B, now=10.0), "pause", now=12.0)
    assert run(paused, "forward", now=13.0).playback == Playback(PAUSED, 1, B, 0, None)


def test_forward_while_idle_cues_the_next_song_idle() -> None:
    assert run(loaded(A, B), "forward", now=1.0).playback == Playback(IDLE, 1, B, 0, None)


@pytest.mark.parametrize("verb", ["forward", "next"])
def test_forward_past_the_last_song_goes_idle_with_no_song(verb: str) -> None:
    state = playing(A, B, slot=1, now=10.0)
    new = run(state, verb, now=12.0)
    assert new.playback == Playback(IDLE, 2, None, 0, None)
    assert new.slotted is None
    with pytest.raises(CommandError, match="nothing to skip"):
        apply_command(new, verb, None, ctx(13.0))


def test_forward_on_an_empty_playlist_is_refused() -> None:
    with pytest.raises(CommandError):
        apply_command(PlayerState(), "forward", None, ctx(1.0))


@pytest.mark.parametrize("verb", ["backward", "previous"])
def test_backward_early_in_a_song_goes_to_the_previous_song(verb: str) -> None:
    state = playing(A, B, slot=1, now=10.0)  # B frame 0 at 10.25
    new = run(state, verb, now=11.25)  # 1 s into B
    assert new.playback == Playback(PLAYING, 0, A, 0, 11.5)


@pytest.mark.parametrize("verb", ["backward", "previous"])
def test_backward_late_in_a_song_restarts_it(verb: str) -> None:
    state = playing(A, B, slot=1, now=10.0)
    new = run(state, verb, now=15.25)  # 5 s into B
    assert new.playback == Playback(PLAYING, 1, B, 0, 15.5)


def test_backward_threshold_is_backward_restart_s() -> None:
    state = playing(A, B, slot=1, now=10.0)
    at_threshold = run(state, "backward", now=10.25 + BACKWARD_RESTART_S)
    just_before = run(state, "backward", now=10.25 + BACKWARD_RESTART_S - 0.5)
    assert at_threshold.playback.slot == 1
    assert just_before.playback.slot == 0


def test_backward_in_the_first_song_restarts_it() -> None:
    state = playing(A, B, now=10.0)
    assert run(state, "backward", now=11.0).playback == Playback(PLAYING, 0, A, 0, 11.25)


def test_backward_while_paused_late_in_a_song_cues_it_paused_at_zero() -> None:
    paused = run(playing(A, B, slot=1, now=10.0), "pause", now=15.0)
    assert run(paused, "backward", now=20.0).playback == Playback(PAUSED, 1, B, 0, None)


def test_backward_after_the_playlist_ended_cues_the_last_song() -> None:
    ended = run(playing(A, B, slot=1, now=10.0), "forward", now=12.0)
    assert run(ended, "backward", now=13.0).playback == Playback(IDLE, 1, B, 0, None)


def test_backward_on_an_empty_playlist_is_refused() -> None:
    with pytest.raises(CommandError, match="empty"):
        apply_command(PlayerState(), "backward", None, ctx(1.0))


# --- seek -------------------------------------------------------------------------------------


def test_seek_while_playing_jumps_at_now_plus_lead() -> None:
    state = playing(A, now=10.0)
    new, op = apply_command(state, "seek", "4.5", ctx(11.0))
    assert new.playback == Playback(PLAYING, 0, A, 198450, 11.25)
    assert op["playback"]["frame"] == 198450


def test_seek_while_paused_stays_paused_at_the_new_frame() -> None:
    paused = run(playing(A, now=10.0), "pause", now=12.0)
    assert run(paused, "seek", 1, now=13.0).playback == Playback(PAUSED, 0, A, RATE, None)


@pytest.mark.parametrize("seconds", [10, 10.0, 60])
def test_seek_at_or_past_the_end_is_refused(seconds: float) -> None:
    state = playing(A, now=10.0)  # A is 10 s long
    with pytest.raises(CommandError, match="past the end"):
        apply_command(state, "seek", seconds, ctx(11.0))
    assert state.playback == Playback(PLAYING, 0, A, 0, 10.25)


def test_seek_just_before_the_end_is_accepted() -> None:
    new = run(playing(A, now=10.0), "seek", 9.9, now=11.0)
    assert new.playback.frame == round(9.9 * RATE)


def test_seek_in_a_song_of_unknown_length_is_accepted() -> None:
    state = playing(A, now=10.0)
    new, _ = apply_command(state, "seek", 500, Context(11.0, LEAD, {}))
    assert new.playback.frame == 500 * RATE


@pytest.mark.parametrize("arg", [-1, "abc", None, True, "nan", "inf"])
def test_seek_with_a_bad_argument_is_refused(arg: Any) -> None:
    with pytest.raises(CommandError, match="seek"):
        apply_command(playing(A), "seek", arg, ctx(11.0))


def test_seek_with_nothing_slotted_is_refused() -> None:
    with pytest.raises(CommandError, match="no song"):
        apply_command(PlayerState(), "seek", 1, ctx(1.0))


# --- volume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [(70, 70), ("70", 70), (0, 0), (100, 100), (" 35 ", 35), ("+10", 60), ("-10", 40)],
)
def test_volume_absolute_and_relative(arg: Any, expected: int) -> None:
    state = loaded(A)  # volume 50
    new, op = apply_command(state, "volume", arg, ctx(1.0))
    assert new.volume == expected
    assert new.playback == state.playback
    assert op == {
        "op": "volume",
        "index": state.index + 1,
        "pre": state.hash,
        "post": state.hash,
        "volume": expected,
    }


@pytest.mark.parametrize(("arg", "expected"), [("+80", 100), ("-80", 0), ("+900", 100)])
def test_relative_volume_is_clamped(arg: str, expected: int) -> None:
    assert run(loaded(A), "volume", arg).volume == expected


@pytest.mark.parametrize("arg", [900, 101, "900", "loud", "", None, True, 50.5])
def test_bad_volume_is_refused(arg: Any) -> None:
    with pytest.raises(CommandError, match="volume"):
        apply_command(loaded(A), "volume", arg, ctx(1.0))


def test_volume_works_on_an_empty_playlist() -> None:
    assert run(PlayerState(), "volume", 20).volume == 20


# --- unknown verbs, op bookkeeping ------------------------------------------------------------


@pytest.mark.parametrize("verb", ["shuffle", "", "PLAY", "status", "load"])
def test_unknown_verb_is_a_command_error(verb: str) -> None:
    with pytest.raises(CommandError, match="unknown command"):
        apply_command(loaded(A), verb, None, ctx(1.0))


def test_every_op_increments_the_index_and_carries_pre_and_post_hashes() -> None:
    steps: list[tuple[str, Any, float]] = [
        ("enqueue", A, 0.0),
        ("enqueue", B, 0.5),
        ("play", None, 1.0),
        ("volume", "+5", 2.0),
        ("pause", None, 3.0),
        ("seek", 2, 4.0),
        ("play", None, 5.0),
        ("forward", None, 6.0),
        ("backward", None, 7.0),
        ("stop", None, 8.0),
        ("enqueue", C, 9.0),
    ]
    state = PlayerState()
    for i, (verb, arg, now) in enumerate(steps, start=1):
        new, op = apply_command(state, verb, arg, ctx(now))
        assert new.index == op["index"] == i
        assert op["pre"] == state.hash
        assert op["post"] == new.hash
        state = new
    assert state.playlist == (A, B, C)


# --- next_song --------------------------------------------------------------------------------


def test_next_song_starts_the_following_song() -> None:
    state = playing(A, B, now=10.0)
    new, op = next_song(state, 0, ctx(20.5))
    assert new.playback == Playback(PLAYING, 1, B, 0, 20.75)
    assert (op["op"], op["index"], op["pre"], op["post"]) == (
        "playback",
        state.index + 1,
        state.hash,
        state.hash,
    )


def test_next_song_after_the_last_goes_idle() -> None:
    state = playing(A, B, slot=1, now=10.0)
    new, _ = next_song(state, 1, ctx(31.0))
    assert new.playback == Playback(IDLE, 2, None, 0, None)


def test_next_song_for_another_slot_is_stale() -> None:
    state = playing(A, B, slot=1, now=10.0)
    with pytest.raises(CommandError, match="stale"):
        next_song(state, 0, ctx(31.0))


def test_next_song_when_not_playing_is_stale() -> None:
    paused = run(playing(A, B, now=10.0), "pause", now=12.0)
    with pytest.raises(CommandError, match="stale"):
        next_song(paused, 0, ctx(31.0))


# --- speakers: apply_op -----------------------------------------------------------------------


def history(*steps: tuple[str, Any, float]) -> tuple[PlayerState, list[dict[str, Any]]]:
    state, ops = PlayerState(), []
    for verb, arg, now in steps:
        state, op = apply_command(state, verb, arg, ctx(now))
        ops.append(op)
    return state, ops


STEPS = (("enqueue", A, 0.0), ("enqueue", B, 0.1), ("play", None, 1.0), ("volume", 80, 2.0))


def replay(ops: list[dict[str, Any]], state: PlayerState | None = None) -> PlayerState:
    state = state or PlayerState()
    for op in ops:
        state = apply_op(state, op)
    return state


def test_replaying_ops_reproduces_the_master_state() -> None:
    master, ops = history(*STEPS)
    assert replay(ops) == master


def test_redelivered_op_leaves_the_state_unchanged() -> None:
    _, ops = history(*STEPS)
    speaker = replay(ops)
    for op in ops:
        assert apply_op(speaker, op) == speaker


def test_redelivered_enqueue_right_after_applying_it_is_harmless() -> None:
    _, ops = history(("enqueue", A, 0.0), ("enqueue", B, 0.1))
    once = replay(ops)
    assert apply_op(once, ops[-1]) == once
    assert once.playlist == (A, B)


def test_missed_op_raises_mismatch() -> None:
    _, ops = history(*STEPS)
    with pytest.raises(Mismatch, match="missed"):
        apply_op(replay(ops[:1]), ops[2])


def test_playlist_hash_mismatch_on_a_playback_op() -> None:
    _, ops = history(("enqueue", A, 0.0), ("play", None, 1.0))
    other = PlayerState((B,), Playback(IDLE, 0, B), index=1)  # same index, other playlist
    with pytest.raises(Mismatch, match="playlist hash"):
        apply_op(other, ops[1])


def test_playlist_hash_mismatch_on_an_enqueue_op() -> None:
    _, ops = history(("enqueue", A, 0.0), ("enqueue", B, 0.1))
    other = PlayerState((C,), Playback(IDLE, 0, C), index=1)
    with pytest.raises(Mismatch, match="before this enqueue"):
        apply_op(other, ops[1])


def test_enqueue_op_whose_post_hash_disagrees_raises_mismatch() -> None:
    _, ops = history(("enqueue", A, 0.0))
    forged = {**ops[0], "post": playlist_hash((B,))}
    with pytest.raises(Mismatch, match="after this enqueue"):
        apply_op(PlayerState(), forged)


def test_enqueue_op_already_reflected_in_the_playlist_only_catches_up_the_index() -> None:
    _, ops = history(("enqueue", A, 0.0), ("enqueue", B, 0.1))
    speaker = replace(replay(ops), index=1)  # holds (A, B) but counted one op fewer
    assert apply_op(speaker, ops[1]) == replace(speaker, index=2)


def test_wrong_slotted_song_raises_mismatch() -> None:
    master, ops = history(("enqueue", A, 0.0), ("enqueue", B, 0.1))
    speaker = replay(ops)
    op = {
        "op": "playback",
        "index": master.index + 1,
        "pre": master.hash,
        "post": master.hash,
        "playback": Playback(PLAYING, 0, B, 0, 1.0).to_dict(),  # slot 0 holds A
    }
    with pytest.raises(Mismatch, match="slotted song"):
        apply_op(speaker, op)


@pytest.mark.parametrize(
    "change",
    [
        {"op": "shuffle"},
        {"index": "2"},
        {"index": True},
        {"index": None},
        {"op": "volume", "volume": 101},
        {"op": "volume", "volume": "50"},
        {"playback": "playing"},
    ],
)
def test_malformed_op_raises_protocol_error(change: dict[str, Any]) -> None:
    _, ops = history(("enqueue", A, 0.0), ("play", None, 1.0))
    speaker = replay(ops[:1])
    with pytest.raises(ProtocolError):
        apply_op(speaker, {**ops[1], **change})


class Simulation:
    """A master taking random commands; two speakers applying its operations."""

    VERBS = (
        "enqueue",
        "play",
        "pause",
        "stop",
        "forward",
        "next",
        "backward",
        "previous",
        "seek",
        "volume",
        "finished",
    )

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 100.0
        self.master = PlayerState()
        self.speakers = [PlayerState(), PlayerState()]
        self.ops: list[dict[str, Any]] = []
        self.succeeded: set[str] = set()

    def command(self) -> tuple[str, Any]:
        rng = self.rng
        verb = rng.choice(self.VERBS)
        arg: Any = None
        if verb == "enqueue":
            arg = rng.choice([A, B, C, C, UNKNOWN])
        elif verb == "seek":
            arg = rng.choice([0, 1.5, 4.99, 9.5, 12, 30])
        elif verb == "volume":
            arg = rng.choice([0, 35, 100, 900, "+15", "-40", "+200"])
        return verb, arg

    def step(self) -> None:
        self.now += self.rng.choice([0.0, 0.01, 0.3, 1.0, 4.0])
        verb, arg = self.command()
        c = ctx(self.now)
        try:
            if verb == "finished":
                new, op = next_song(self.master, self.master.playback.slot, c)
            else:
                new, op = apply_command(self.master, verb, arg, c)
        except CommandError:
            return
        assert new.index == self.master.index + 1 == op["index"]
        self.succeeded.add(verb)
        self.master = new
        self.ops.append(op)
        # speaker 0 gets the op object; speaker 1 gets it over the wire, sometimes twice, and
        # sometimes an older op again first.
        self.speakers[0] = apply_op(self.speakers[0], op)
        wire = json.loads(json.dumps(op))
        if self.rng.random() < 0.2:
            old = json.loads(json.dumps(self.rng.choice(self.ops)))
            self.speakers[1] = apply_op(self.speakers[1], old)
        self.speakers[1] = apply_op(self.speakers[1], wire)
        if self.rng.random() < 0.2:
            self.speakers[1] = apply_op(self.speakers[1], wire)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_speakers_replaying_master_ops_match_it_after_every_step(seed: int) -> None:
    sim = Simulation(seed)
    for _ in range(200):
        sim.step()
        assert sim.speakers[0] == sim.master
        assert sim.speakers[1] == sim.master
    assert len(sim.ops) > 50
    assert sim.succeeded == set(Simulation.VERBS)
    assert PlayerState.from_dict(json.loads(json.dumps(sim.master.to_dict()))) == sim.master


# --- to_dict / from_dict ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        PlayerState(),
        loaded(A, B),
        playing(A, B, C, slot=2, now=7.5),
        run(run(playing(A, now=10.0), "pause", now=12.0), "volume", 9),
        run(playing(A, now=10.0), "forward", now=11.0),
    ],
)
def test_state_round_trips_through_json(state: PlayerState) -> None:
    assert PlayerState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_integer_at_is_read_as_a_float() -> None:
    pb = Playback.from_dict({"state": PLAYING, "slot": 0, "song": A, "frame": 0, "at": 3})
    assert pb.at == 3.0
    assert isinstance(pb.at, float)


GOOD = PlayerState((A, B), Playback(PAUSED, 1, B, 123, 4.5), 30, 7).to_dict()


def bad_state(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


def bad_playback(**changes: Any) -> dict[str, Any]:
    return bad_state(playback={**GOOD["playback"], **changes})


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        "state",
        bad_state(playlist="ab"),
        bad_state(playlist=[A, "nope"]),
        bad_state(playlist=[A, A.upper()]),
        bad_state(volume=101),
        bad_state(volume=-1),
        bad_state(volume=True),
        bad_state(volume="30"),
        bad_state(index=-1),
        bad_state(index=1.0),
        bad_state(index=None),
        bad_state(playback=None),
        bad_state(playback=[]),
        bad_playback(state="stopped"),
        bad_playback(slot=-1),
        bad_playback(slot=True),
        bad_playback(frame="0"),
        bad_playback(frame=1.5),
        bad_playback(at="soon"),
        bad_playback(at=[1]),
        bad_playback(song="abc"),
        bad_playback(song=5),
    ],
)
def test_from_dict_rejects_bad_types(doc: Any) -> None:
    with pytest.raises(ProtocolError):
        PlayerState.from_dict(doc)


def test_from_dict_accepts_the_good_document() -> None:
    state = PlayerState.from_dict(GOOD)
    assert state.playback == Playback(PAUSED, 1, B, 123, 4.5)
    assert (state.volume, state.index, state.slotted) == (30, 7, B)


def test_frame_at_advances_only_while_playing_and_after_the_start() -> None:
    pb = Playback(PLAYING, 0, A, 100, 10.0)
    assert pb.frame_at(9.0) == 100
    assert pb.frame_at(10.0) == 100
    assert pb.frame_at(11.0) == 100 + RATE
    assert pb.frame_at(11.0, rate=48000) == 100 + 48000
    assert Playback(PAUSED, 0, A, 100, 10.0).frame_at(20.0) == 100
