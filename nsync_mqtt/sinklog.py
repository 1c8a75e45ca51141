"""Analysis of virtual sink logs: when did each frame reach the DAC, and how far apart were nodes.

A log is JSON lines ``{"t_ns", "song", "frame", "frames", "rate"}``, one per block of at most
50 ms, ``t_ns`` being the host ``time.monotonic_ns()`` at which the block's first frame reached
the virtual DAC. Logs written by nodes on one machine share that clock, so the skew between two
nodes at song frame k is the difference of their interpolated times for k.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from nsync_mqtt.errors import NSyncError


class SinkLogError(NSyncError):
    """A sink log line (other than a partly written last one) is not a valid block."""


@dataclass(frozen=True)
class Block:
    t_ns: int
    song: str | None
    frame: int
    frames: int
    rate: int

    @property
    def end_frame(self) -> int:
        return self.frame + self.frames

    def contains(self, song: str, k: int) -> bool:
        return self.song == song and self.frame <= k < self.frame + self.frames

    def time_of(self, k: int) -> int:
        """Host ns at which frame ``k`` of this block reached the DAC (nominal rate)."""
        return self.t_ns + round((k - self.frame) * 1e9 / self.rate)


def _block(obj: object) -> Block:
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    song = obj.get("song")
    if song is not None and not isinstance(song, str):
        raise ValueError("song must be a string or null")
    return Block(int(obj["t_ns"]), song, int(obj["frame"]), int(obj["frames"]), int(obj["rate"]))


def read_log(path: Path | str) -> list[Block]:
    """The blocks of a sink log; a last line still being written is ignored."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    blocks: list[Block] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            blocks.append(_block(json.loads(line)))
        except (ValueError, KeyError, TypeError) as err:
            if i == len(lines) - 1:  # no newline yet: the writer is mid-line
                break
            raise SinkLogError(f"{path}:{i + 1}: bad sink log line: {err}") from err
    return blocks


def time_of_frame(blocks: Iterable[Block], song: str, k: int) -> int | None:
    """Host ns at which frame ``k`` of ``song`` reached the DAC (first time), None if never."""
    for b in blocks:
        if b.contains(song, k):
            return b.time_of(k)
    return None


def skew_ns(log_a: Iterable[Block], log_b: Iterable[Block], song: str, k: int) -> int | None:
    """How much later frame ``k`` of ``song`` reached A's DAC than B's; None if one missed it."""
    ta = time_of_frame(log_a, song, k)
    tb = time_of_frame(log_b, song, k)
    return None if ta is None or tb is None else ta - tb


STEER_FRAMES = 2
"""A streaming sink steers by inserting or dropping single frames: a block that picks up this
close to where the previous one ended continues the same run."""


def played_ranges(
    blocks: Iterable[Block], song: str, tolerance_ns: int = 1_000_000
) -> list[tuple[int, int, int]]:
    """``(first_frame, end_frame_exclusive, t_start_ns)`` runs of contiguous blocks of ``song``.

    Blocks are contiguous when the next one continues both the frames (within ``STEER_FRAMES``:
    the drift corrector drops or repeats single frames) and the time (within ``tolerance_ns``):
    a pause resumed at the same frame starts a new run.
    """
    out: list[tuple[int, int, int]] = []
    prev: Block | None = None
    for b in blocks:
        if b.song != song:
            prev = None
            continue
        prev_end_ns = prev.t_ns + prev.frames * 1_000_000_000 // prev.rate if prev else 0
        if (
            prev is not None
            and out
            and 0 <= b.frame - prev.end_frame <= STEER_FRAMES
            and abs(b.t_ns - prev_end_ns) <= tolerance_ns
        ):
            first, _, t0 = out[-1]
            out[-1] = (first, b.end_frame, t0)
        else:
            out.append((b.frame, b.end_frame, b.t_ns))
        prev = b
    return out


class _FrameIndex:
    """Finds the first block of a song containing a frame, by bisection when frames only grow."""

    def __init__(self, blocks: Iterable[Block], song: str) -> None:
        self.blocks = [b for b in blocks if b.song == song]
        self.starts = [b.frame for b in self.blocks]
        self.sorted = all(a.end_frame <= b.frame for a, b in pairwise(self.blocks))

    def time_of(self, song: str, k: int) -> int | None:
        if not self.sorted:
            return time_of_frame(self.blocks, song, k)
        i = bisect_right(self.starts, k) - 1
        if i >= 0 and self.blocks[i].contains(song, k):
            return self.blocks[i].time_of(k)
        return None


def max_skew(logs: Mapping[str, Sequence[Block]], song: str, frames: Iterable[int]) -> int | None:
    """Largest spread (max - min) of the times the logs played each frame, over ``frames``.

    Only frames played by at least two logs count; None if there is none.
    """
    indexes = [_FrameIndex(blocks, song) for blocks in logs.values()]
    worst: int | None = None
    for k in frames:
        times = [t for t in (ix.time_of(song, k) for ix in indexes) if t is not None]
        if len(times) >= 2:
            spread = max(times) - min(times)
            worst = spread if worst is None else max(worst, spread)
    return worst


def gaps_ns(blocks: Sequence[Block], tolerance_ns: int = 1_000_000) -> list[tuple[int, int]]:
    """``(t_ns, gap_ns)`` wherever a block does not start when the previous one ended.

    ``t_ns`` is when the previous block ended (nominal rate) and ``gap_ns`` how long until the next
    one started (negative for an overlap); differences within ``tolerance_ns`` (rounding, DAC
    drift over one block) are not gaps.
    """
    out: list[tuple[int, int]] = []
    for a, b in pairwise(blocks):
        end = a.t_ns + round(a.frames * 1e9 / a.rate)
        gap = b.t_ns - end
        if abs(gap) > tolerance_ns:
            out.append((end, gap))
    return out
