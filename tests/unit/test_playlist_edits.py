"""Playlist editing: clear, remove, move, insert after the current song, replace; each one
``edit`` operation that speakers replay to the same playlist (checked by its hash)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from typing import Any

import pytest

from nsync_mqtt.errors import CommandError, ProtocolError
from nsync_mqtt.playlist import (
    IDLE,
    MAX_PLAYLIST_LEN,
    PAUSED,
    PLAYING,
    RATE,
    Context,
    Mismatch,
    Operation,
    PlayerState,
    Unchanged,
    apply_command,
    apply_op,
    edit_songs,
    moved_slot,
    next_song,
    playlist_hash,
)


def sha(name: str) -> str:
    return hashlib.sha224(name.encode()).hexdigest()


A, B, C, D = sha("a"), sha("b"), sha("c"), sha("d")
FRAMES = {A: 10 * RATE, B: 20 * RATE, C: 5 * RATE, D: 7 * RATE}
LEAD = 0.25
TERM = 3


def ctx(now: float = 0.0) -> Context:
    return Context(now=now, lead_s=LEAD, song_frames=FRAMES, term=TERM)


def step(state: PlayerState, verb: str, arg: Any = None, now: float = 0.0) -> PlayerState:
    """Apply a command on the master and replay its operation, through JSON, on a copy of the
    state before it (a speaker): both must end equal."""
    new, op = apply_command(state, verb, arg, ctx(now))
    replayed = apply_op(state, json.loads(json.dumps(op)))
    assert replayed == new
    assert new.hash == playlist_hash(new.playlist)
    return new


def queue(*songs: str) -> PlayerState:
    state = PlayerState()
    for s in songs:
        state = step(state, "enqueue", s)
    return state


def playing(state: PlayerState, slot: int, now: float = 0.0) -> PlayerState:
    state = step(state, "play", now=now)
    while state.playback.slot != slot:
        state = step(state, "forward", now=now)
    return state


def test_clear_empties_the_list_and_stops_at_the_lead_instant() -> None:
    state = playing(queue(A, B, C), 1, now=5.0)
    new = step(state, "clear", now=10.0)
    assert new.playlist == ()
    assert new.playback.state == IDLE and new.playback.song is None
    assert new.playback.at == 10.0 + LEAD  # every speaker stops at the same instant
    with pytest.raises(Unchanged):
        apply_command(new, "clear", None, ctx())


def test_remove_before_the_current_song_keeps_it_playing_where_it_is() -> None:
    state = playing(queue(A, B, C), 2, now=1.0)
    new = step(state, "remove", 0, now=2.0)
    assert new.playlist == (B, C)
    assert new.playback == replace(state.playback, slot=1)  # same song, frame and instant


def test_remove_after_the_current_song_leaves_playback_alone() -> None:
    state = playing(queue(A, B, C), 0)
    new = step(state, "remove", "2")  # a plain payload's text
    assert new.playlist == (A, B) and new.playback == state.playback


def test_removing_the_playing_song_plays_the_next_one() -> None:
    state = playing(queue(A, B, C), 1, now=1.0)
    new = step(state, "remove", 1, now=3.0)
    assert new.playlist == (A, C)
    pb = new.playback
    assert (pb.state, pb.slot, pb.song, pb.frame, pb.at) == (PLAYING, 1, C, 0, 3.0 + LEAD)


def test_removing_the_last_playing_song_stops() -> None:
    state = playing(queue(A, B), 1)
    new = step(state, "remove", 1, now=4.0)
    assert new.playback.state == IDLE and new.playback.song is None
    assert new.playback.slot == 1 and new.playback.at == 4.0 + LEAD


def test_removing_the_paused_song_cues_the_next_one_paused() -> None:
    state = step(playing(queue(A, B, C), 0), "pause", now=2.0)
    new = step(state, "remove", 0, now=3.0)
    assert (new.playback.state, new.playback.slot, new.playback.song) == (PAUSED, 0, B)
    assert new.playback.frame == 0


@pytest.mark.parametrize(
    ("src", "dst", "playlist", "slot"),
    [
        (0, 2, (B, C, A, D), 0),  # current is B (slot 1): it moves up one
        (1, 3, (A, C, D, B), 3),  # the current song itself
        (3, 0, (D, A, B, C), 2),
        (2, 3, (A, B, D, C), 1),  # behind the current one: no change
    ],
)
def test_move_keeps_the_current_song_current(
    src: int, dst: int, playlist: tuple[str, ...], slot: int
) -> None:
    state = playing(queue(A, B, C, D), 1)
    new = step(state, "move", (src, dst))
    assert new.playlist == playlist
    assert new.playback == replace(state.playback, slot=slot)
    assert new.slotted == B


def test_enqueue_next_goes_right_after_the_current_song() -> None:
    state = playing(queue(A, B, C), 0)
    new = step(state, "enqueue_next", D)
    assert new.playlist == (A, D, B, C) and new.playback == state.playback


def test_enqueue_next_on_an_empty_or_ended_playlist_makes_the_song_current() -> None:
    new = step(PlayerState(), "enqueue_next", A)
    assert new.playlist == (A,) and new.playback.song == A and new.playback.slot == 0
    ended = step(step(queue(A), "play"), "forward")
    assert ended.playback.song is None
    new = step(ended, "enqueue_next", B)
    assert new.playlist == (A, B) and (new.playback.slot, new.playback.song) == (1, B)


def test_enqueue_play_inserts_after_the_current_song_and_plays_it() -> None:
    state = playing(queue(A, B), 0, now=1.0)
    new = step(state, "enqueue_play", C, now=2.0)
    assert new.playlist == (A, C, B)
    pb = new.playback
    assert (pb.state, pb.slot, pb.song, pb.frame, pb.at) == (PLAYING, 1, C, 0, 2.0 + LEAD)


def test_replace_clears_enqueues_and_plays() -> None:
    state = playing(queue(A, B, C), 2)
    new = step(state, "replace", D, now=6.0)
    assert new.playlist == (D,)
    assert (new.playback.state, new.playback.slot, new.playback.song) == (PLAYING, 0, D)
    assert new.playback.at == 6.0 + LEAD


@pytest.mark.parametrize(
    ("verb", "arg", "words"),
    [
        ("remove", 3, "out of range: the playlist has positions 0-2"),
        ("remove", -1, "out of range"),
        ("remove", "two", "needs a playlist position"),
        ("remove", True, "needs a playlist position"),
        ("move", (0, 5), "move to 5 is out of range"),
        ("move", (0,), "two playlist positions"),
        ("replace", sha("never loaded"), "not loaded"),
        ("enqueue_next", "not a hash", "56 lowercase hex"),
    ],
)
def test_bad_edits_are_refused_with_a_clear_message(verb: str, arg: Any, words: str) -> None:
    state = queue(A, B, C)
    with pytest.raises((CommandError, ProtocolError), match=words):
        apply_command(state, verb, arg, ctx())


def test_remove_from_an_empty_playlist_says_it_is_empty() -> None:
    with pytest.raises(CommandError, match="the playlist is empty"):
        apply_command(PlayerState(), "remove", 0, ctx())


def test_moving_a_song_onto_its_own_place_changes_nothing() -> None:
    with pytest.raises(Unchanged):
        apply_command(queue(A, B), "move", (1, 1), ctx())


def test_the_playlist_is_bounded() -> None:
    songs = tuple(sha(str(i)) for i in range(MAX_PLAYLIST_LEN))
    full = PlayerState(playlist=songs)
    frames = {**FRAMES, **dict.fromkeys(songs, RATE)}
    c = Context(now=0.0, lead_s=LEAD, song_frames=frames, term=TERM)
    for verb in ("enqueue", "enqueue_next", "enqueue_play"):
        with pytest.raises(CommandError, match=f"the playlist is full \\({MAX_PLAYLIST_LEN}"):
            apply_command(full, verb, A, c)
    assert len(apply_command(full, "replace", A, c)[0].playlist) == 1  # replace still works


def test_a_speaker_whose_playlist_differs_refuses_the_edit() -> None:
    state = queue(A, B, C)
    _, op = apply_command(state, "remove", 1, ctx())
    other = replace(queue(A, C, B), index=state.index, term=state.term)
    with pytest.raises(Mismatch):
        apply_op(other, op)
    short = replace(queue(A), index=state.index, term=state.term)
    with pytest.raises(Mismatch):
        apply_op(short, {**op, "pre": short.hash, "at": 2})


def test_edit_operations_round_trip_and_refuse_bad_fields() -> None:
    _, op = apply_command(queue(A, B, C), "move", (0, 2), ctx())
    o = Operation.from_dict(op)
    assert Operation.from_dict(o.to_dict()) == o and o.to_dict() == op
    for bad in ({"edit": "shuffle"}, {"at": -1}, {"to": "1"}, {"at": True}):
        with pytest.raises(ProtocolError):
            Operation.from_dict({**op, **bad})
    _, ins = apply_command(queue(A), "enqueue_next", B, ctx())
    with pytest.raises(ProtocolError):
        Operation.from_dict({**ins, "song": "x"})


def test_random_edits_agree_with_a_list_model() -> None:
    """Edits chosen at random: the master's playlist equals a plain list's, the current song
    stays current unless removed, and every speaker's replay matches."""
    rng = random.Random(7)
    songs = [A, B, C, D]
    state = playing(queue(A, B, C), 1)
    model = list(state.playlist)
    for i in range(400):
        n = len(model)
        current = state.slotted
        verb = rng.choice(["remove", "move", "enqueue_next", "enqueue", "play", "pause"])
        try:
            if verb == "remove" and n:
                at = rng.randrange(n)
                state = step(state, "remove", at, now=i)
                removed_current = at == state.playback.slot and model[at] == current
                del model[at]
                if not removed_current:
                    assert state.slotted == current
            elif verb == "move" and n > 1:
                a, b = rng.sample(range(n), 2)
                state = step(state, "move", (a, b), now=i)
                model.insert(b, model.pop(a))
                assert state.slotted == current
            elif verb in ("enqueue_next", "enqueue"):
                song = rng.choice(songs)
                slot = state.playback.slot
                state = step(state, verb, song, now=i)
                if verb == "enqueue" or current is None:
                    model.append(song)
                else:
                    model.insert(slot + 1, song)
            elif verb in ("play", "pause"):
                state = step(state, verb, now=i)
        except (Unchanged, CommandError):
            pass
        assert list(state.playlist) == model


def test_moved_slot_matches_moving_in_a_list() -> None:
    for n in range(1, 6):
        for at in range(n):
            for to in range(n):
                for slot in range(n + 1):  # n: the playlist has ended
                    moved = list(edit_songs(tuple(map(str, range(n))), "move", at, to))
                    if slot < n:
                        assert moved[moved_slot(slot, "move", at, to)] == str(slot)
                    else:
                        assert moved_slot(slot, "move", at, to) == n


# --- announcements -------------------------------------------------------------------------


def finish(state: PlayerState, now: float) -> PlayerState:
    """The slotted song ended on a quorum (the master's ``next_song``), replayed as above."""
    new, op = next_song(state, state.playback.slot, ctx(now))
    assert apply_op(state, json.loads(json.dumps(op))) == new
    return new


def test_an_announcement_interrupts_and_playback_resumes_at_the_same_frame() -> None:
    state = playing(queue(A, B), 1, now=0.0)  # B from frame 0 at 0.25
    on = step(state, "announce", C, now=2.25)  # 2.25 s into B at the lead instant 2.5
    assert on.playlist == (A, C, B)
    assert (on.playback.state, on.playback.slot, on.playback.song) == (PLAYING, 1, C)
    assert on.playback.at == 2.25 + LEAD and on.playback.frame == 0
    assert on.resume is not None and on.resume.frame == 2.25 * RATE
    assert PlayerState.from_dict(on.to_dict()) == on  # survives a save and a sync
    back = finish(on, now=7.0)
    assert back.playlist == (A, B) and back.resume is None
    pb = back.playback
    assert (pb.state, pb.slot, pb.song, pb.frame, pb.at) == (PLAYING, 1, B, 2.25 * RATE, 7.0 + LEAD)


def test_an_announcement_while_paused_returns_to_paused() -> None:
    state = step(playing(queue(A), 0, now=0.0), "pause", now=3.75)  # stops 3.75 s in
    on = step(state, "announce", C, now=5.0)
    assert on.playback.state == PLAYING and on.playback.song == C
    back = finish(on, now=9.0)
    pb = back.playback
    assert back.playlist == (A,)
    assert (pb.state, pb.slot, pb.song, pb.frame) == (PAUSED, 0, A, 3.75 * RATE)


def test_an_announcement_on_an_idle_cluster_leaves_it_idle() -> None:
    on = step(PlayerState(), "announce", C, now=1.0)
    assert on.playlist == (C,) and on.playback.state == PLAYING
    back = finish(on, now=4.0)
    assert back.playlist == () and back.playback.state == IDLE and back.playback.song is None
    assert back.playback.at == 4.0 + LEAD  # the announcement stops at the lead instant


def test_skipping_an_announcement_ends_it_and_other_commands_keep_it_as_an_entry() -> None:
    on = step(playing(queue(A, B), 0), "announce", C, now=1.0)
    back = step(on, "forward", now=2.0)
    assert back.playlist == (A, B) and back.playback.song == A and back.resume is None
    on = step(playing(queue(A, B), 0), "announce", C, now=1.0)
    louder = step(on, "volume", 80, now=1.5)
    assert louder.resume == on.resume  # volume, pause and play keep the announcement on
    kept = step(louder, "enqueue", D, now=2.0)
    assert kept.resume is None and kept.playlist == (C, A, B, D)


def test_one_announcement_at_a_time() -> None:
    on = step(playing(queue(A), 0), "announce", C)
    with pytest.raises(CommandError, match="an announcement is playing already"):
        apply_command(on, "announce", D, ctx())
