"""Fixtures of the chaos suite: it needs Mosquitto, and a chaos run must leave no process
behind (every node it killed or stopped was waited for, every broker stopped)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsync_lab.testing import MOSQUITTO


def children() -> set[int]:
    """Processes whose parent is this one (zombies included: a child never waited for)."""
    me = str(os.getpid())
    out = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == me:
            out.add(int(status.parent.name))
    return out


@pytest.fixture
def no_leaked_processes() -> Iterator[None]:
    before = children()
    yield
    leaked = children() - before
    assert not leaked, f"processes left running or unwaited: {sorted(leaked)}"


@pytest.fixture
def mosquitto() -> None:
    if not MOSQUITTO.exists():
        pytest.skip(f"mosquitto not installed ({MOSQUITTO} missing)")
