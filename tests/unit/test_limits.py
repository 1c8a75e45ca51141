"""Limits against a hostile client: payload sizes, the per-client command rate, and numbers
out of range, as pure logic (no broker, no clock)."""

from __future__ import annotations

import json

import pytest

from nsync_mqtt.errors import CommandError, ProtocolError
from nsync_mqtt.limits import ALL, CLIENT, PAYLOAD_LIMITS, RateLimiter, oversize
from nsync_mqtt.messages import MAX_WIRE_INT, decode
from nsync_mqtt.playlist import MAX_SECONDS, _number, _position, parse_volume
from nsync_mqtt.replication import MAX_CHUNK_SIZE


def test_payload_limits() -> None:
    assert not oversize("command", PAYLOAD_LIMITS["command"])
    assert oversize("command", PAYLOAD_LIMITS["command"] + 1)
    assert not oversize("chunk", MAX_CHUNK_SIZE + 1024)  # the largest chunk frame passes
    assert oversize("ha_status", 65)
    assert not oversize("unknown kind", 10**9)  # its handler checks what it reads
    assert oversize("x", 11, {"x": 10}) and not oversize("x", 10, {"x": 10})


def test_a_client_gets_a_burst_then_the_sustained_rate() -> None:
    rl = RateLimiter(burst=5, rate=2.0)
    assert [rl.allow(0.0, "ha") for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.refused == 2
    assert rl.allow(0.0, "phone")  # another client has its own bucket
    assert not rl.allow(0.4, "ha")  # 0.8 of a token back
    assert rl.allow(0.5, "ha")  # one token back after 0.5 s at 2/s
    assert not rl.allow(0.5, "ha")
    # a long pause refills it to the burst, no further
    assert [rl.allow(100.0, "ha") for _ in range(6)] == [True] * 5 + [False]
    # a clock stepping back gives no tokens (and takes none)
    assert not rl.allow(50.0, "ha")


def test_a_client_waiting_for_each_reply_is_never_limited() -> None:
    """The CLI, Home Assistant and the latency benchmark send one command per reply: a
    replicated command takes 2-5 ms on loopback, a status 0.7 ms (docs/benchmarks.md)."""
    rl = RateLimiter()
    now = 0.0
    for i in range(20_000):
        assert rl.allow(now, "bench")
        now += 0.0007 if i % 2000 < 500 else 0.0025  # runs of 500 statuses among commands
    assert rl.refused == 0


def test_the_buckets_are_bounded_full_ones_forgotten_first() -> None:
    rl = RateLimiter(burst=2, rate=1.0, max_keys=3)
    rl.allow(0.0, "a")
    rl.allow(0.0, "a")  # a: empty
    rl.allow(0.0, "b")
    rl.allow(0.0, "c")
    rl.allow(0.5, "d")  # no room: b and c are not full again yet at 0.5 s, a is the oldest
    assert len(rl) == 3
    for i in range(1000):  # a flood of made-up reply_to ids stays bounded
        rl.allow(1.0, f"fake-{i}")
    assert len(rl) == 3
    rl = RateLimiter(burst=2, rate=1.0, max_keys=2)
    rl.allow(0.0, "a")
    rl.allow(0.0, "a")  # empty
    rl.allow(0.0, "b")  # one left; full again at 1 s
    rl.allow(1.5, "c")  # b is full again and goes first; a stays (and stays limited)
    assert rl.allow(1.5, "a") and not rl.allow(1.5, "a")
    with pytest.raises(ValueError):
        RateLimiter(burst=0)
    with pytest.raises(ValueError):
        RateLimiter(rate=float("nan"))


@pytest.mark.parametrize("term", [-1, MAX_WIRE_INT + 1, 10**400, 1.5, True, "3", None])
def test_an_envelope_term_out_of_range_is_refused(term: object) -> None:
    payload = json.dumps({"v": 1, "t": "hb", "src": "a", "term": term}).encode()
    with pytest.raises(ProtocolError, match="term"):
        decode(payload)


def test_an_envelope_term_in_range_is_read() -> None:
    payload = json.dumps({"v": 1, "t": "hb", "src": "a", "term": MAX_WIRE_INT}).encode()
    assert decode(payload).term == MAX_WIRE_INT


@pytest.mark.parametrize(
    "arg", ["nan", "inf", "-1", float("nan"), 1e300, MAX_SECONDS + 1, "1e999", None, [1]]
)
def test_seconds_out_of_range_are_refused(arg: object) -> None:
    with pytest.raises(CommandError):
        _number(arg, "seek")


def test_seconds_in_range_are_read() -> None:
    assert _number("42.5", "seek") == 42.5
    assert _number(MAX_SECONDS, "seek") == MAX_SECONDS


def test_volume_numbers() -> None:
    assert parse_volume(40, 10) == 40
    assert parse_volume("+5", 10) == 15 and parse_volume("-20", 10) == 0
    for bad in (-5, 101, 1e300, float("nan"), True, "loud", [3]):
        with pytest.raises(CommandError):
            parse_volume(bad, 10)


def test_a_flood_without_waiting_is_limited() -> None:
    rl = RateLimiter()
    allowed = sum(rl.allow(i * 1e-5, "flood") for i in range(10_000))  # 10,000 in 0.1 s
    assert allowed < 1100


def test_a_client_naming_itself_anew_for_every_command_meets_the_cap_on_all_clients() -> None:
    rl = RateLimiter(burst=5, rate=2.0, total_burst=20, total_rate=10.0)
    got = [rl.check(0.0, f"rotating-{i}") for i in range(25)]
    assert got == [None] * 20 + [ALL] * 5  # each name is new, but all of them share 20
    assert rl.check(0.0, "ha") == ALL and rl.refused == 6
    assert rl.check(0.1, "ha") is None  # one shared token back after 0.1 s at 10/s
    assert rl.check(0.1, "ha") == ALL
    # a client over its own rate takes nothing from the others
    for _ in range(4):
        assert rl.check(10.0, "ha") is None  # 1 token left of its 5 at 10 s, the rest shared
    assert [rl.check(10.0, "ha") for _ in range(30)] == [None] + [CLIENT] * 29
    assert [rl.check(10.0, f"p{i}") for i in range(16)] == [None] * 15 + [ALL]


@pytest.mark.parametrize("value", ["\u00b2", "1" * 5000, "-3", "x"])
def test_a_playlist_position_that_int_refuses_is_a_command_error(value: str) -> None:
    """ "\u00b2" (superscript two) is a digit to str.isdigit but not to int(); 5000 digits are
    over int()'s limit: both once escaped as ValueError, and the client got no reply."""
    with pytest.raises(CommandError):
        _position(value, "remove", 3)
