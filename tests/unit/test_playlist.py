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
    Operation,
    Playback,
    PlayerState,
    StaleOp,
    Unchanged,
    apply_command,
    apply_op,
    next_song,
    playlist_hash,
    start_term,
    takes_sync,
)


def sha(name: str) -> str:
    return hashlib.sha224(name.encode()).hexdigest()


A, B, C = sha("a"), sha("b"), sha("c")
UNKNOWN = sha("never loaded")
FRAMES = {A: 10 * RATE, B: 20 * RATE, C: 5 * RATE}
LEAD = 0.25  # exact in binary, so scheduled instants and frames are exact
TERM = 3  # the master's term in these tests


def ctx(now: float, frames: dict[str, int] = FRAMES, term: int = TERM) -> Context:
    return Context(now=now, lead_s=LEAD, song_frames=frames, term=term)


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


def test_playlist_hash_is_a_chain_over_the_songs() -> None:
    empty = hashlib.sha224(b"").hexdigest()
    assert playlist_hash(()) == PlayerState().hash == empty
    one = hashlib.sha224(f"{empty}\n{A}".encode()).hexdigest()
    assert playlist_hash((A,)) == one
    assert playlist_hash((A, B)) == hashlib.sha224(f"{one}\n{B}".encode()).hexdigest()
    assert playlist_hash((B,), start=one) == playlist_hash((A, B))


def test_the_kept_hash_always_equals_the_reference() -> None:
    """Seeded random enqueues, on the master (commands) and a speaker (operations), with other
    commands, replaced states and round trips between: every kept hash is the O(n) one."""
    rng = random.Random(20240611)
    songs = [sha(f"song {i}") for i in range(12)]
    frames = dict.fromkeys(songs, 3 * RATE)
    master = speaker = PlayerState()
    for step in range(400):
        verb = rng.choice(["enqueue"] * 5 + ["play", "pause", "forward", "volume"])
        arg = rng.choice(songs) if verb == "enqueue" else "+1" if verb == "volume" else None
        try:
            master, op = apply_command(master, verb, arg, ctx(float(step), frames))
        except NSyncError:
            continue
        assert op["post"] == master.hash == playlist_hash(master.playlist)
        speaker = apply_op(speaker, json.loads(json.dumps(op)))
        assert speaker == master
        assert speaker.hash == playlist_hash(speaker.playlist)
        if step % 50 == 0:  # a state rebuilt from its document, or with another playlist
            speaker = PlayerState.from_dict(speaker.to_dict())
            assert speaker.hash == master.hash
            other = replace(speaker, playlist=speaker.playlist[:-1])
            assert other.hash == playlist_hash(speaker.playlist[:-1])
    assert len(master.playlist) > 100


def test_an_operation_hashes_only_what_it_adds(monkeypatch: pytest.MonkeyPatch) -> None:
    import nsync_mqtt.playlist as pl

    songs = tuple(sha(f"song {i}") for i in range(1000))
    state = PlayerState(songs)
    assert state.hash == playlist_hash(songs)  # once, O(n), for a state built from a list
    calls = []
    real = pl.chain_hash
    monkeypatch.setattr(pl, "chain_hash", lambda h, s: calls.append(s) or real(h, s))
    frames = dict.fromkeys((*songs, C), RATE)
    master, op = apply_command(state, "enqueue", C, ctx(0.0, frames))
    speaker = apply_op(state, op)
    master, op2 = apply_command(master, "play", None, ctx(1.0, frames))
    speaker = apply_op(speaker, op2)
    assert (master.hash, speaker.hash, op2["pre"], op2["post"]) == (op["post"],) * 4
    assert calls == [C, C]  # one link each for the master and the speaker, nothing else


def test_an_operation_travels_as_it_came() -> None:
    state = loaded(A)
    for verb, arg in [("enqueue", B), ("play", None), ("volume", "7")]:
        state, op = apply_command(state, verb, arg, ctx(1.0))
        o = Operation.from_dict(op)
        assert o.to_dict() == op
        assert Operation.from_dict(json.loads(json.dumps(o.to_dict()))) == o


def test_a_state_never_reads_a_hash_kept_for_another_playlist() -> None:
    state = loaded(A, B)
    assert replace(state, playback=Playback()).hash == state.hash  # carried on
    assert replace(state, playlist=(A,)).hash == playlist_hash((A,))
    assert PlayerState((A, B), _hashed=((B,), playlist_hash((B,)))).hash == state.hash


# --- enqueue ----------------------------------------------------------------------------------


def test_enqueue_on_empty_playlist_slots_the_song() -> None:
    new, op = apply_command(PlayerState(), "enqueue", A, ctx(1.0))
    assert new.playlist == (A,)
    assert new.playback == Playback(IDLE, 0, A, 0, None)
    assert new.slotted == A
    assert new.last == (TERM, 1)
    assert op == {
        "op": "enqueue",
        "index": 1,
        "term": TERM,
        "prev_term": 0,
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
        "term": TERM,
        "prev_term": TERM,
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


def test_play_while_playing_changes_nothing_and_is_no_failure() -> None:
    with pytest.raises(Unchanged, match="already playing: nothing changed"):
        apply_command(playing(A), "play", None, ctx(11.0))
    assert not issubclass(Unchanged, CommandError)


def test_play_after_the_playlist_ended_starts_again_from_the_top() -> None:
    ended = run(playing(A, B, slot=1), "forward", now=11.0)
    assert ended.playback.song is None
    assert run(ended, "play", now=12.0).playback == Playback(PLAYING, 0, A, 0, 12.25)


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (PlayerState(), "already stopped"),
        (loaded(A), "already stopped"),
        (run(playing(A, now=10.0), "pause", now=12.0), "already paused"),
    ],
)
def test_pause_when_not_playing_changes_nothing(state: PlayerState, why: str) -> None:
    with pytest.raises(Unchanged, match=f"{why}: nothing changed"):
        apply_command(state, "pause", None, ctx(13.0))


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
def test_stop_when_already_stopped_changes_nothing(state: PlayerState) -> None:
    with pytest.raises(Unchanged, match="already stopped: nothing changed"):
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
    [
        (70, 70),
        ("70", 70),
        (0, 0),
        (100, 100),
        (" 35 ", 35),
        ("+10", 60),
        ("-10", 40),
        ("35.0", 35),  # a dashboard slider's value
        (35.0, 35),
    ],
)
def test_volume_absolute_and_relative(arg: Any, expected: int) -> None:
    state = loaded(A)  # volume 50
    new, op = apply_command(state, "volume", arg, ctx(1.0))
    assert new.volume == expected
    assert new.playback == state.playback
    assert op == {
        "op": "volume",
        "index": state.index + 1,
        "term": TERM,
        "prev_term": TERM,
        "pre": state.hash,
        "post": state.hash,
        "volume": expected,
    }


@pytest.mark.parametrize(("arg", "expected"), [("+80", 100), ("-80", 0), ("+900", 100)])
def test_relative_volume_is_clamped(arg: str, expected: int) -> None:
    assert run(loaded(A), "volume", arg).volume == expected


@pytest.mark.parametrize(
    "arg", [900, 101, "900", "loud", "", None, True, 50.5, "35.5", "nan", "inf", "1e999"]
)
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
    other = PlayerState((B,), Playback(IDLE, 0, B), index=1, term=TERM)  # other playlist
    with pytest.raises(Mismatch, match="playlist hash"):
        apply_op(other, ops[1])


def test_playlist_hash_mismatch_on_an_enqueue_op() -> None:
    _, ops = history(("enqueue", A, 0.0), ("enqueue", B, 0.1))
    other = PlayerState((C,), Playback(IDLE, 0, C), index=1, term=TERM)
    with pytest.raises(Mismatch, match="before this operation"):
        apply_op(other, ops[1])


def test_enqueue_op_whose_post_hash_disagrees_raises_mismatch() -> None:
    _, ops = history(("enqueue", A, 0.0))
    forged = {**ops[0], "post": playlist_hash((B,))}
    with pytest.raises(Mismatch, match="after this enqueue"):
        apply_op(PlayerState(), forged)


def test_enqueue_op_already_reflected_in_the_playlist_under_another_index_is_a_mismatch() -> None:
    _, ops = history(("enqueue", A, 0.0), ("enqueue", B, 0.1))
    speaker = replace(replay(ops), index=1)  # holds (A, B) but counted one op fewer
    with pytest.raises(Mismatch):
        apply_op(speaker, ops[1])


def test_wrong_slotted_song_raises_mismatch() -> None:
    master, ops = history(("enqueue", A, 0.0), ("enqueue", B, 0.1))
    speaker = replay(ops)
    op = {
        "op": "playback",
        "index": master.index + 1,
        "term": TERM,
        "prev_term": TERM,
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


# --- log matching across terms -----------------------------------------------------------------


def test_an_op_at_a_held_index_from_another_term_is_a_conflict_never_a_duplicate() -> None:
    # the dying master of term T1 sent X (volume 11) at index 2 to this speaker alone
    t1, t2 = TERM + 1, TERM + 2
    base, ops1 = history(("enqueue", A, 0.0))
    _, x = apply_command(base, "volume", 11, ctx(1.0, term=t1))
    speaker = replay([*ops1, x])
    assert speaker.last == (t1, 2)
    # the next master (term T2) never had X: it starts its term at index 2
    master, term_op = start_term(base, t2)
    assert term_op["index"] == 2 == x["index"]
    with pytest.raises(Mismatch, match="conflict"):
        apply_op(speaker, term_op)
    # ... and its next op, Y at index 3, is a conflict too (the op before it differs)
    _, y = apply_command(master, "volume", 22, ctx(2.0, term=t2))
    with pytest.raises(Mismatch, match="conflict"):
        apply_op(speaker, y)
    # the speaker takes the master's state instead: X is gone, and Y then applies
    assert takes_sync(speaker.last, master.last)
    synced = apply_op(master, y)
    assert (synced.volume, synced.last) == (22, (t2, 3))


def test_an_op_held_already_in_the_same_term_is_a_harmless_redelivery() -> None:
    _, ops = history(*STEPS)
    speaker = replay(ops)
    assert apply_op(speaker, ops[1]) is speaker
    assert apply_op(speaker, ops[-1]) is speaker


def test_an_op_of_an_older_term_is_stale() -> None:
    base, _ = history(("enqueue", A, 0.0))
    newer, _ = start_term(base, TERM + 1)
    _, old = apply_command(base, "volume", 11, ctx(1.0))  # the deposed master's, index 2
    with pytest.raises(StaleOp):
        apply_op(newer, old)


def test_a_next_op_whose_previous_term_differs_is_a_conflict() -> None:
    _, ops = history(("enqueue", A, 0.0), ("volume", 30, 1.0))
    speaker = replace(replay(ops[:1]), term=TERM - 1)  # index 1, but of another term
    with pytest.raises(Mismatch, match="term"):
        apply_op(speaker, ops[1])


def test_a_gap_in_the_same_term_is_a_mismatch() -> None:
    _, ops = history(*STEPS)
    with pytest.raises(Mismatch, match="missed"):
        apply_op(replay(ops[:1]), ops[3])


def test_start_term_moves_the_log_on_and_carries_the_masters_playback() -> None:
    state = playing(A, B, now=10.0)
    new, op = start_term(state, TERM + 1)
    assert new == replace(state, index=state.index + 1, term=TERM + 1)
    assert op == {
        "op": "term",
        "index": state.index + 1,
        "term": TERM + 1,
        "prev_term": TERM,
        "pre": state.hash,
        "post": state.hash,
        "playback": state.playback.to_dict(),
    }
    assert apply_op(state, op) == new
    # a speaker still holding the instants of an older master's clock takes the new master's
    older = replace(state, playback=replace(state.playback, at=state.playback.at + 2519.0))
    assert apply_op(older, op).playback == state.playback
    with pytest.raises(ValueError, match="above"):
        start_term(state, TERM)


@pytest.mark.parametrize(
    ("current", "offered", "takes"),
    [
        ((1, 5), (2, 5), True),  # a newer term settles a conflict
        ((1, 6), (2, 4), True),  # ... and drops uncommitted ops of the older one
        ((2, 5), (2, 5), True),
        ((2, 5), (2, 7), True),
        ((2, 7), (2, 5), False),  # a delayed answer must not undo ops applied since
        ((3, 1), (2, 9), False),
    ],
)
def test_takes_sync(current: tuple[int, int], offered: tuple[int, int], takes: bool) -> None:
    assert takes_sync(current, offered) is takes


@pytest.mark.parametrize(
    "change",
    [
        {"term": None},
        {"term": "3"},
        {"term": True},
        {"prev_term": None},
        {"prev_term": TERM + 1},  # after the op's own term
        {"index": 0},
    ],
)
def test_an_op_without_a_sound_position_is_a_protocol_error(change: dict[str, Any]) -> None:
    _, ops = history(("enqueue", A, 0.0), ("play", None, 1.0))
    with pytest.raises(ProtocolError):
        apply_op(replay(ops[:1]), {**ops[1], **change})


def test_a_non_playlist_op_that_claims_to_change_the_playlist_is_refused() -> None:
    _, ops = history(("enqueue", A, 0.0), ("volume", 30, 1.0))
    with pytest.raises(ProtocolError, match="playlist"):
        apply_op(replay(ops[:1]), {**ops[1], "post": playlist_hash((A, B))})


class Cluster:
    """Five nodes under a series of masters: each elected by the vote rule (a majority whose
    last op is not newer than the candidate's), each starting its term, taking commands and
    delivering each op to a random subset; a node that meets a conflict takes the master's
    state. ``logs`` shadows every node's log (the term of each index), which the states alone
    do not show."""

    N = 5
    MAJORITY = 3

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.states = [PlayerState() for _ in range(self.N)]
        self.logs: list[list[int]] = [[] for _ in range(self.N)]
        self.term = 0
        self.now = 0.0
        self.made: dict[tuple[int, int], PlayerState] = {}  # (term, index) -> the state it made
        self.acked: list[tuple[int, int]] = []  # ops f+1 nodes held when the master answered

    def elect(self) -> int | None:
        alive = self.rng.sample(range(self.N), self.rng.choice([3, 4, 5]))
        cand = self.rng.choice(alive)
        votes = [n for n in alive if self.states[n].last <= self.states[cand].last]
        if len(votes) < self.MAJORITY:
            return None
        self.term += 1
        return cand

    def deliver(self, master: int, op: dict[str, Any], to: list[int]) -> list[int]:
        """``op`` to the nodes ``to``; the ones that hold it afterwards (acks)."""
        acks = [master]
        for n in to:
            try:
                new = apply_op(self.states[n], op)
            except Mismatch:
                if takes_sync(self.states[n].last, self.states[master].last):
                    self.states[n] = self.states[master]
                    self.logs[n] = list(self.logs[master])
                    acks.append(n)
                continue
            except StaleOp:
                continue
            if new is not self.states[n]:
                self.logs[n].append(op["term"])
            self.states[n] = new
            acks.append(n)
        return acks

    def reign(self, master: int) -> None:
        others = [n for n in range(self.N) if n != master]
        new, op = start_term(self.states[master], self.term)
        ops = [(new, op)]
        state = new
        for _ in range(self.rng.randrange(4)):
            self.now += 1.0
            verb = self.rng.choice(["enqueue", "volume", "play", "pause", "forward"])
            arg = {"enqueue": self.rng.choice([A, B, C]), "volume": self.rng.randrange(101)}
            try:
                state, op = apply_command(state, verb, arg.get(verb), ctx(self.now, term=self.term))
            except (CommandError, Unchanged):
                continue
            ops.append((state, op))
        for new, op in ops:
            self.states[master] = new
            self.logs[master].append(self.term)
            self.made[new.last] = new
            to = self.rng.sample(others, self.rng.randrange(len(others) + 1))
            if len(self.deliver(master, op, to)) >= self.MAJORITY:
                self.acked.append(new.last)

    def check(self) -> None:
        for n in range(self.N):
            # the same (term, index) means the same state, and the same log behind it
            assert self.states[n] == self.made.get(self.states[n].last, PlayerState())
            assert len(self.logs[n]) == self.states[n].index
            for m in range(self.N):
                if self.states[m].last == self.states[n].last:
                    assert self.logs[m] == self.logs[n]

    def holds(self, n: int, entry: tuple[int, int]) -> bool:
        term, index = entry
        return len(self.logs[n]) >= index and self.logs[n][index - 1] == term


@pytest.mark.parametrize("seed", range(20))
def test_acknowledged_ops_survive_every_later_master(seed: int) -> None:
    sim = Cluster(seed)
    for _ in range(60):
        master = sim.elect()
        if master is None:
            continue
        for entry in sim.acked:  # leader completeness: a new master holds every acked op
            assert sim.holds(master, entry), (entry, master, sim.logs[master])
        sim.reign(master)
        sim.check()
    assert sim.term > 20 and len(sim.acked) > 20


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
        except (CommandError, Unchanged):
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
