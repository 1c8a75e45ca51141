"""Signed cluster messages (nsync_mqtt.seal): MAC, peers, replay window, boots, key files."""

from __future__ import annotations

import os
import stat

import pytest

from nsync_mqtt.errors import ConfigError
from nsync_mqtt.seal import (
    BAD_MAC,
    NOT_PEER,
    OLD_BOOT,
    REBOOT_SILENCE_S,
    REPLAYED,
    UNSIGNED,
    WINDOW,
    Boot,
    Opener,
    Sealer,
    next_boot,
    read_key,
    write_key,
)

KEY = bytes(range(32))
TOPIC = "nsync/home/internal/hb"
PEERS = {"a", "b", "c"}


def sealer(sender: str = "a", counter: int = 1, tag: str = "00000001", key: bytes = KEY) -> Sealer:
    return Sealer(key, "home", sender, Boot(counter, tag))


def opener(own: str = "b") -> Opener:
    return Opener(KEY, "home", own, PEERS)


def test_a_sealed_message_opens_to_its_sender_and_exact_bytes() -> None:
    payload = b'{"v":1,"t":"hb"}\n\x00binary'
    sealed = sealer().seal(TOPIC, payload)
    opened = opener().open(0.0, TOPIC, sealed)
    assert opened is not None
    assert (opened.sender, opened.payload) == ("a", payload)


def test_the_header_is_one_readable_line() -> None:
    sealed = sealer().seal(TOPIC, b"{}")
    head, _, body = sealed.partition(b"\n")
    assert head.startswith(b"NSS1 a 1-00000001 0 ") and body == b"{}"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s[:-1] + b"X",  # the payload
        lambda s: s.replace(b" 0 ", b" 7 ", 1),  # the sequence number
        lambda s: s.replace(b"1-00000001", b"2-00000001", 1),  # the boot
        lambda s: s.replace(b"NSS1 a ", b"NSS1 c ", 1),  # the sender
    ],
)
def test_any_change_breaks_the_signature(tamper) -> None:  # type: ignore[no-untyped-def]
    o = opener()
    assert o.open(0.0, TOPIC, tamper(sealer().seal(TOPIC, b'{"term":1}'))) is None
    assert o.rejected == {BAD_MAC: 1}


def test_the_topic_and_cluster_are_signed_too() -> None:
    sealed = sealer().seal(TOPIC, b"{}")
    o = opener()
    assert o.open(0.0, "nsync/home/internal/op", sealed) is None
    other_cluster = Opener(KEY, "attic", "b", PEERS)
    assert other_cluster.open(0.0, TOPIC, sealed) is None
    assert o.rejected == other_cluster.rejected == {BAD_MAC: 1}


def test_another_key_is_refused() -> None:
    o = opener()
    assert o.open(0.0, TOPIC, sealer(key=bytes(32)).seal(TOPIC, b"{}")) is None
    assert o.rejected == {BAD_MAC: 1}


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":1,"t":"hb","src":"a","term":99}',
        b"",
        b"NSS1",
        b"NSS1 a 1-00000001 0 zz\n{}",
        b"NSS1 A 1-00000001 0 " + b"0" * 32 + b"\n{}",
        b"NSS1 a 1-0000001 0 " + b"0" * 32 + b"\n{}",
        b"NSS1 a 1-00000001 -1 " + b"0" * 32 + b"\n{}",
        b"NSS1 a 1-00000001 0 " + b"0" * 32,  # no line end
        b"NSS1 " + b"a" * 5000 + b"\n",
        b"\xff\xfe" * 100,
    ],
)
def test_unsigned_or_malformed_is_refused_without_reading_it(payload: bytes) -> None:
    o = opener()
    assert o.open(0.0, TOPIC, payload) is None
    assert o.rejected == {UNSIGNED: 1}


def test_own_messages_are_dropped_quietly_and_strangers_refused() -> None:
    o = opener("a")
    assert o.open(0.0, TOPIC, sealer("a").seal(TOPIC, b"{}")) is None
    assert o.rejected == {}
    stranger = Sealer(KEY, "home", "mallory", Boot(1, "00000001"))
    assert o.open(0.0, TOPIC, stranger.seal(TOPIC, b"{}")) is None
    assert o.rejected == {NOT_PEER: 1}
    assert "mallory" not in o.windows


def test_a_duplicate_or_replay_is_refused_once_seen() -> None:
    s, o = sealer(), opener()
    first = s.seal(TOPIC, b"1")
    assert o.open(0.0, TOPIC, first) is not None
    assert o.open(0.1, TOPIC, first) is None  # a QoS 1 redelivery
    second = s.seal(TOPIC, b"2")
    assert o.open(0.2, TOPIC, second) is not None
    assert o.open(9.0, TOPIC, first) is None
    assert o.rejected == {REPLAYED: 2}


def test_reordered_messages_within_the_window_are_taken_once() -> None:
    s, o = sealer(), opener()
    msgs = [s.seal(TOPIC, str(i).encode()) for i in range(10)]
    order = [0, 3, 1, 2, 9, 5, 4, 8, 6, 7]
    assert all(o.open(0.0, TOPIC, msgs[i]) is not None for i in order)
    assert all(o.open(0.0, TOPIC, msgs[i]) is None for i in order)
    assert o.rejected == {REPLAYED: 10}


def test_gaps_are_fine_and_too_old_is_refused() -> None:
    """A node reads only some of a peer's messages (not what goes to the others)."""
    s, o = sealer(), opener()
    old = s.seal(TOPIC, b"old")
    s.seq = 10 * WINDOW
    assert o.open(0.0, TOPIC, s.seal(TOPIC, b"new")) is not None
    assert o.open(0.0, TOPIC, old) is None
    assert o.rejected == {REPLAYED: 1}
    s.seq = 11 * WINDOW - 5
    assert o.open(0.0, TOPIC, s.seal(TOPIC, b"later")) is not None
    s.seq = 11 * WINDOW - 6
    assert o.open(0.0, TOPIC, s.seal(TOPIC, b"just behind")) is not None


def test_a_restarted_peer_is_believed_and_its_old_boot_replays_are_not() -> None:
    o = opener()
    before = sealer(counter=5, tag="aaaaaaaa")
    recorded = [before.seal(TOPIC, str(i).encode()) for i in range(3)]
    assert o.open(0.0, TOPIC, recorded[0]) is not None
    after = sealer(counter=6, tag="bbbbbbbb")  # the peer restarted: counts from 0 again
    assert o.open(1.0, TOPIC, after.seal(TOPIC, b"x")) is not None
    assert o.open(1.1, TOPIC, recorded[1]) is None
    # even long after, while the new run keeps talking
    for t in range(2, 60):
        assert o.open(float(t), TOPIC, after.seal(TOPIC, b"hb")) is not None
    assert o.open(60.0, TOPIC, recorded[2]) is None
    assert o.rejected == {OLD_BOOT: 2}


def test_a_peer_that_lost_its_boot_counter_is_believed_after_a_silence() -> None:
    o = opener()
    old_run = sealer(counter=40, tag="aaaaaaaa")
    assert o.open(0.0, TOPIC, old_run.seal(TOPIC, b"x")) is not None
    fresh = sealer(counter=1, tag="cccccccc")  # a new SD card
    assert o.open(REBOOT_SILENCE_S / 2, TOPIC, fresh.seal(TOPIC, b"x")) is None
    assert o.open(REBOOT_SILENCE_S + 0.1, TOPIC, fresh.seal(TOPIC, b"x")) is not None
    assert o.open(REBOOT_SILENCE_S + 0.2, TOPIC, fresh.seal(TOPIC, b"x")) is not None


def test_a_replay_cannot_hold_back_a_peers_newer_boot() -> None:
    """Replaying an old boot after this node restarted does not lock the real peer out."""
    recorded = sealer(counter=3, tag="aaaaaaaa").seal(TOPIC, b"x")
    o = opener()  # this node just started: it knows no boot of "a"
    assert o.open(0.0, TOPIC, recorded) is not None  # taken: nothing tells it is old
    live = sealer(counter=4, tag="bbbbbbbb")
    assert o.open(0.05, TOPIC, live.seal(TOPIC, b"hb")) is not None
    assert o.open(0.06, TOPIC, recorded) is None


def test_same_counter_another_tag_needs_the_silence() -> None:
    o = opener()
    assert o.open(0.0, TOPIC, sealer(counter=2, tag="aaaaaaaa").seal(TOPIC, b"x")) is not None
    restored = sealer(counter=2, tag="bbbbbbbb")  # a data directory restored from a backup
    assert o.open(1.0, TOPIC, restored.seal(TOPIC, b"x")) is None
    assert o.rejected == {OLD_BOOT: 1}


def test_windows_are_kept_for_peers_only() -> None:
    o = opener()
    for i in range(100):
        o.open(0.0, TOPIC, Sealer(KEY, "home", f"n{i}", Boot(1, "00000000")).seal(TOPIC, b"x"))
    assert o.windows == {}


def test_keygen_writes_a_private_key_that_reads_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cluster.key"
    write_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key(path)
    assert len(key) == 32
    with pytest.raises(ConfigError, match="exists; pass --force"):
        write_key(path)
    write_key(path, force=True)
    assert read_key(path) != key


def test_a_key_open_to_others_or_malformed_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cluster.key"
    write_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_key(path)
    path.write_text("abc\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="64 hex digits"):
        read_key(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_key(tmp_path / "missing.key")


def test_boot_counter_grows_across_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "boot"
    first, second = next_boot(path, 0.0), next_boot(path, 0.0)
    assert (first.counter, second.counter) == (1, 2)
    assert first.tag != second.tag
    path.write_text("garbage")
    assert next_boot(path, 0.0).counter == 1


def test_boot_counter_follows_the_wall_clock_when_it_is_ahead(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "boot"
    assert next_boot(path, 1_800_000_000.7).counter == 1_800_000_000
    # the same second again, or a clock set back (no RTC, no network yet): still one more
    assert next_boot(path, 1_800_000_000.9).counter == 1_800_000_001
    assert next_boot(path, 5.0).counter == 1_800_000_002
    # the data directory wiped: a right clock still puts this run after the earlier ones
    path.unlink()
    assert next_boot(path, 1_800_000_100.0).counter == 1_800_000_100
