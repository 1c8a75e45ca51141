"""Limits against a hostile client, pure: payload limits per topic kind, the command rate per
client (token buckets with literal times), and the bounded maps and number checks behind them."""

from __future__ import annotations

import json

import pytest

from nsync_mqtt.errors import CommandError, ProtocolError
from nsync_mqtt.limits import PAYLOAD_LIMITS, RateLimiter, oversize
from nsync_mqtt.messages import MAX_WIRE_INT, decode, encode
from nsync_mqtt.playlist import MAX_SECONDS, _number, _position


def test_a_payload_over_its_kinds_limit_is_oversize_and_one_at_it_is_not() -> None:
    for kind, limit in PAYLOAD_LIMITS.items():
        assert not oversize(kind, limit)
        assert oversize(kind, limit + 1)
    assert not oversize("no such kind", 10**9)


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    r = RateLimiter(burst=3, rate=2.0)
    assert [r.allow(0.0, "cli") for _ in range(4)] == [True, True, True, False]
    assert r.allow(0.0, "other")  # another client has its own bucket
    assert not r.allow(0.4, "cli")  # 0.8 of a token
    assert r.allow(0.5, "cli")  # one token after 0.5 s at 2/s
    assert not r.allow(0.5, "cli")
    assert [r.allow(100.0, "cli") for _ in range(4)] == [True, True, True, False]  # burst cap
    assert r.refused == 4


def test_the_buckets_are_bounded_and_a_forgotten_one_was_full_first() -> None:
    r = RateLimiter(burst=2, rate=1.0, max_keys=3)
    r.allow(0.0, "busy")
    r.allow(0.0, "busy")  # empty now
    for i in range(10):
        r.allow(0.0, f"c{i}")
        assert len(r) <= 3
    r2 = RateLimiter(burst=2, rate=1.0, max_keys=2)
    r2.allow(0.0, "busy")
    r2.allow(0.0, "busy")
    r2.allow(0.0, "a")
    r2.allow(5.0, "b")  # "a" and "busy" are full again by now: forgotten, nothing lost
    assert len(r2) <= 2


def test_a_client_waiting_for_each_reply_is_never_limited() -> None:
    """bench_latency: ~1,400 commands from one client, one every 1 ms at the fastest."""
    r = RateLimiter()
    assert all(r.allow(i * 0.001, "bench") for i in range(1400))


def test_a_flood_without_waiting_is_limited() -> None:
    r = RateLimiter()
    allowed = sum(r.allow(i * 1e-5, "flood") for i in range(10_000))  # 10,000 in 0.1 s
    assert allowed < 1100


@pytest.mark.parametrize("value", ["²", "1" * 5000, "-3", "x"])
def test_a_playlist_position_that_int_refuses_is_a_command_error(value: str) -> None:
    with pytest.raises(CommandError):
        _position(value, "remove", 3)


@pytest.mark.parametrize("value", [MAX_SECONDS + 1, "1e300", "nan", "inf", -1, True])
def test_a_seek_beyond_any_song_or_not_a_number_is_refused(value: object) -> None:
    with pytest.raises(CommandError):
        _number(value, "seek")


def test_a_term_beyond_the_wire_range_is_refused() -> None:
    assert decode(encode("hb", "a", MAX_WIRE_INT)).term == MAX_WIRE_INT
    with pytest.raises(ProtocolError):
        decode(json.dumps({"v": 1, "t": "hb", "src": "a", "term": MAX_WIRE_INT + 1}).encode())
