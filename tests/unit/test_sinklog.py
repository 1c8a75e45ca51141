"""Sink log analysis with literal blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsync_mqtt.sinklog import (
    Block,
    SinkLogError,
    gaps_ns,
    max_skew,
    played_ranges,
    read_log,
    skew_ns,
    time_of_frame,
)

R = 44100
BLOCK_NS = 50_000_000  # 2205 frames at 44.1 kHz


def run(song: str | None, t0: int, frame0: int, n: int, frames: int = 2205) -> list[Block]:
    return [
        Block(t0 + i * round(frames * 1e9 / R), song, frame0 + i * frames, frames, R)
        for i in range(n)
    ]


def test_read_log_ignores_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "sink.jsonl"
    lines = [
        json.dumps({"t_ns": 10, "song": "a", "frame": 0, "frames": 5, "rate": R}),
        json.dumps({"t_ns": 20, "song": None, "frame": 5, "frames": 5, "rate": R}),
    ]
    path.write_text("\n".join(lines) + '\n{"t_ns": 30, "so')
    assert read_log(path) == [Block(10, "a", 0, 5, R), Block(20, None, 5, 5, R)]


def test_read_log_rejects_a_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "sink.jsonl"
    good = json.dumps({"t_ns": 10, "song": "a", "frame": 0, "frames": 5, "rate": R})
    path.write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(SinkLogError, match=":2:"):
        read_log(path)


def test_time_of_frame_interpolates_within_the_block() -> None:
    blocks = run("a", 1_000_000_000, 0, 3)
    assert time_of_frame(blocks, "a", 0) == 1_000_000_000
    assert time_of_frame(blocks, "a", 2205) == 1_000_000_000 + BLOCK_NS
    assert time_of_frame(blocks, "a", 2205 + 441) == 1_000_000_000 + BLOCK_NS + 10_000_000
    assert time_of_frame(blocks, "a", 3 * 2205) is None
    assert time_of_frame(blocks, "b", 10) is None


def test_time_of_frame_uses_the_first_time_a_frame_was_played() -> None:
    blocks = run("a", 0, 0, 2) + run("a", 10 * BLOCK_NS, 0, 2)
    assert time_of_frame(blocks, "a", 100) == round(100 * 1e9 / R)


def test_skew_is_a_minus_b() -> None:
    a = run("a", 1_000_300, 0, 4)
    b = run("a", 1_000_000, 0, 4)
    assert skew_ns(a, b, "a", 3000) == 300
    assert skew_ns(b, a, "a", 3000) == -300
    assert skew_ns(a, b, "a", 10**6) is None


def test_played_ranges_merge_contiguous_blocks_only() -> None:
    blocks = [
        *run("a", 0, 0, 2),
        *run(None, 2 * BLOCK_NS, 4410, 1),
        *run("a", 3 * BLOCK_NS, 6615, 2),
        *run("a", 5 * BLOCK_NS, 20000, 1),  # a seek
        *run("b", 6 * BLOCK_NS, 0, 1),
    ]
    assert played_ranges(blocks, "a") == [
        (0, 4410, 0),
        (6615, 11025, 3 * BLOCK_NS),
        (20000, 22205, 5 * BLOCK_NS),
    ]
    assert played_ranges(blocks, "b") == [(0, 2205, 6 * BLOCK_NS)]
    assert played_ranges(blocks, "c") == []


def test_a_frame_dropped_or_repeated_by_the_corrector_continues_the_run() -> None:
    frame_ns = round(1e9 / R)
    blocks = [
        Block(0, "a", 0, 100, R),
        Block(100 * frame_ns, "a", 101, 100, R),  # frame 100 dropped
        Block(201 * frame_ns, "a", 201, 100, R),  # one frame repeated before 201
        Block(302 * frame_ns, "a", 310, 100, R),  # 9 frames further on: a seek
    ]
    assert played_ranges(blocks, "a") == [(0, 301, 0), (310, 410, 302 * frame_ns)]


def test_max_skew_spans_all_logs_that_played_a_frame() -> None:
    logs = {
        "n1": run("a", 0, 0, 4),
        "n2": run("a", 200, 0, 4),
        "n3": run("a", -500, 2205, 3),  # joined late: did not play the first block
    }
    assert max_skew(logs, "a", [0]) == 200
    assert max_skew(logs, "a", [0, 3000]) == 200 + 500 + BLOCK_NS
    assert max_skew(logs, "a", [10**6]) is None
    assert max_skew({"n1": logs["n1"]}, "a", [0]) is None


def test_max_skew_handles_a_song_played_out_of_order() -> None:
    seeked = run("a", 0, 4410, 1) + run("a", BLOCK_NS, 0, 1)
    logs = {"n1": seeked, "n2": run("a", 7, 4410, 1) + run("a", BLOCK_NS + 9, 0, 1)}
    assert max_skew(logs, "a", [10, 5000]) == 9


def test_gaps_report_only_breaks_in_time() -> None:
    blocks = [*run("a", 0, 0, 2), *run("a", 3 * BLOCK_NS, 4410, 1)]
    assert gaps_ns(blocks) == [(2 * BLOCK_NS, BLOCK_NS)]
    overlap = [*run("a", 0, 0, 1), *run("a", BLOCK_NS - 5_000_000, 2205, 1)]
    assert gaps_ns(overlap) == [(BLOCK_NS, -5_000_000)]
    drifted = [Block(0, "a", 0, 2205, R), Block(BLOCK_NS - 50_000, "a", 2205, 2205, R)]
    assert gaps_ns(drifted) == []
    assert gaps_ns(drifted, tolerance_ns=10_000) == [(BLOCK_NS, -50_000)]
