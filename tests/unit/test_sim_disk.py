"""The simulated disk: what survives a crash."""

from __future__ import annotations

import random

import pytest

from nsync_lab.sim import SimDisk


def test_reads_see_writes_at_once() -> None:
    d = SimDisk()
    d.write("a", b"1")
    d.append("a", b"2")
    d.append("log", b"x")
    assert d.read("a") == b"12" and d.read("log") == b"x"
    assert d.names() == ["a", "log"] and d.exists("a") and not d.exists("b")
    with pytest.raises(FileNotFoundError):
        d.read("b")


def test_crash_keeps_synced_data_and_loses_the_rest() -> None:
    d = SimDisk()
    d.write("state", b"v1")
    d.fsync("state")
    d.write("state", b"v2")  # overwritten, not synced
    d.write("new", b"never synced")
    d.crash()
    assert d.read("state") == b"v1"
    assert not d.exists("new")
    assert d.crashes == 1


def test_unsynced_append_is_lost_without_rng_and_torn_with_one() -> None:
    d = SimDisk()
    d.append("log", b"synced;")
    d.fsync("log")
    d.append("log", b"0123456789")
    d.crash()
    assert d.read("log") == b"synced;"

    rng = random.Random(4)
    lengths = set()
    for _ in range(30):
        d.append("log", b"0123456789")
        d.crash(rng)
        got = d.read("log")
        assert got.startswith(b"synced;")
        assert b"0123456789".startswith(got[len(b"synced;") :])  # a prefix of the append
        lengths.add(len(got))
        d.write("log", b"synced;")
        d.fsync("log")
    assert len(lengths) > 3  # torn at different places


def test_unsynced_overwrite_is_never_torn() -> None:
    d = SimDisk()
    d.write("f", b"old")
    d.fsync("f")
    d.write("f", b"new")
    d.append("f", b"more")
    rng = random.Random(1)
    for _ in range(10):
        d.crash(rng)
        assert d.read("f") == b"old"
        d.write("f", b"new")
        d.append("f", b"more")


def test_write_fsync_replace_fsync_dir_is_safe() -> None:
    d = SimDisk()
    d.write("state", b"v1")
    d.fsync("state")
    d.write("state.tmp", b"v2")
    d.fsync("state.tmp")
    d.replace("state.tmp", "state")
    assert d.read("state") == b"v2" and not d.exists("state.tmp")
    d.fsync_dir()
    d.crash(random.Random(0))
    assert d.read("state") == b"v2" and d.names() == ["state"]


def test_an_unsynced_rename_may_or_may_not_survive_but_is_atomic() -> None:
    outcomes = set()
    for seed in range(20):
        d = SimDisk()
        d.write("state", b"v1")
        d.fsync("state")
        d.write("state.tmp", b"v2")
        d.fsync("state.tmp")
        d.replace("state.tmp", "state")
        d.crash(random.Random(seed))
        outcomes.add(d.read("state"))
        # atomic: either the old state and the tmp file, or the new state and no tmp file
        assert d.names() in (["state", "state.tmp"], ["state"])
        assert d.exists("state.tmp") == (d.read("state") == b"v1")
    assert outcomes == {b"v1", b"v2"}
    d = SimDisk()
    d.write("state", b"v1")
    d.fsync("state")
    d.write("state.tmp", b"v2")
    d.fsync("state.tmp")
    d.replace("state.tmp", "state")
    d.crash()  # without an rng every unsynced directory change is lost
    assert d.read("state") == b"v1" and d.read("state.tmp") == b"v2"


def test_renaming_an_unsynced_file_can_leave_it_empty_after_a_crash() -> None:
    d = SimDisk()
    d.write("state", b"v1")
    d.fsync("state")
    d.write("state.tmp", b"v2")  # no fsync of the data
    d.replace("state.tmp", "state")
    d.fsync_dir()
    d.crash(random.Random(0))
    assert d.read("state") == b""  # the rename is durable, the data never was


def test_remove_is_undone_by_a_crash_unless_the_directory_was_synced() -> None:
    d = SimDisk()
    d.write("a", b"1")
    d.fsync("a")
    d.remove("a")
    assert not d.exists("a")
    d.crash()
    assert d.read("a") == b"1"
    d.remove("a")
    d.fsync_dir()
    d.crash()
    assert not d.exists("a")
    with pytest.raises(FileNotFoundError):
        d.remove("a")
