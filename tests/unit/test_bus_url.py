"""Broker URL parsing: what `--broker` accepts, and errors that name the key."""

from __future__ import annotations

import pytest

from nsync_mqtt.bus import BrokerURL, parse_broker_url
from nsync_mqtt.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", BrokerURL("127.0.0.1", 1883)),
        ("mqtt://broker.lan", BrokerURL("broker.lan", 1883)),
        ("mqtts://broker.lan", BrokerURL("broker.lan", 8883, tls=True)),
        ("mqtts://broker.lan:9000", BrokerURL("broker.lan", 9000, tls=True)),
        ("mqtt://ha:pw@10.0.0.2:1884", BrokerURL("10.0.0.2", 1884, "ha", "pw")),
        ("mqtt://ha@10.0.0.2", BrokerURL("10.0.0.2", 1883, "ha", None)),
        ("mqtt://h%40a:p%3Aw%40@host/", BrokerURL("host", 1883, "h@a", "p:w@")),
        ("mqtt://[::1]:1883", BrokerURL("::1", 1883)),
    ],
)
def test_parses_valid_urls(url: str, expected: BrokerURL) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:1883",
        "http://host:1883",
        "ws://host:1883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://host:notaport",
        "mqtt://host:70000",
        "mqtt://host:0",
        "mqtt://host:1883/path",
        "mqtt://host:1883?x=1",
        "mqtt://host:1883#frag",
        "mqtt://:pw@host:1883",
    ],
)
def test_rejects_bad_urls_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^broker: "):
        parse_broker_url(url)


def test_rejects_non_string() -> None:
    with pytest.raises(ConfigError, match=r"^broker: "):
        parse_broker_url(1883)  # type: ignore[arg-type]


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker_url("mqtt://ha:hunter2@host:1883/path")
    assert "hunter2" not in str(info.value)
    assert "ha:***@host" in str(info.value)


def test_str_and_repr_hide_the_password() -> None:
    url = parse_broker_url("mqtts://ha:hunter2@host:8884")
    assert str(url) == "mqtts://ha:***@host:8884"
    assert "hunter2" not in repr(url)
    assert str(parse_broker_url("mqtt://ha@host")) == "mqtt://ha@host:1883"
    assert str(parse_broker_url("mqtt://[::1]")) == "mqtt://[::1]:1883"
