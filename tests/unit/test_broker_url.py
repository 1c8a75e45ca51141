"""Broker passwords stay secret (redacted wherever a URL is shown, read from $NSYNC_BROKER
rather than the command line) and `ca_file` / `--ca-file` for a broker with a private CA."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest

from nsync_mqtt import cli
from nsync_mqtt.bus import Bus, new_paho_client, parse_broker_url, redact_url
from nsync_mqtt.config import BROKER_ENV, NodeConfig, broker_from_env, load_node_config
from nsync_mqtt.errors import BrokerError, ConfigError
from nsync_mqtt.ports import free_port

SECRET = "hunter2-s3cret"

# a self-signed CA certificate (public, no key kept), for ca_file
CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBoTCCAUegAwIBAgIUJPLUs6LVUIYKd1+n2scQs+/hgi0wCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSTlN5bmMgdW5pdC10ZXN0IENBMCAXDTI2MTIwNTIxMTA0MVoY
DzIxMjYxMTExMjExMDQxWjAdMRswGQYDVQQDDBJOU3luYyB1bml0LXRlc3QgQ0Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASbzunj3eoXPqdH1rxfS9wPu716nJzg
P5Rz864KW/t6QCsREfzsioL6m+2Kjt16LXktIUlljHoW86oI5N3EcK1Uo2MwYTAd
BgNVHQ4EFgQUSss1HhGJWXyXyHTOOK8+BlDfA/EwHwYDVR0jBBgwFoAUSss1HhGJ
WXyXyHTOOK8+BlDfA/EwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYw
CgYIKoZIzj0EAwIDSAAwRQIhAMXL3pUko+tvCVvWlZbyZjnABjCCyiQXDZq9bhBV
ZeoZAiAtDYTLg8OhcoGsgCkZRcignj2OkyqKRff0dfUcGeeKHA==
-----END CERTIFICATE-----
"""


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_text(CA_PEM)
    return path


@pytest.fixture(autouse=True)
def no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BROKER_ENV, raising=False)


# --- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"mqtt://ha:{SECRET}@host:1883", "mqtt://ha:***@host:1883"),
        (f"mqtts://ha:{SECRET}@host", "mqtts://ha:***@host"),
        ("mqtt://ha:p@ss@host:1883", "mqtt://ha:***@host:1883"),  # @ in the password
        ("mqtt://ha:a:b@host", "mqtt://ha:***@host"),  # : in the password
        (f"ha:{SECRET}@host:1883", "ha:***@host:1883"),  # no scheme
        (f"mqtt//ha:{SECRET}@host", "mqtt//ha:***@host"),  # a typo in the scheme
        ("mqtt://ha@host:1883", "mqtt://ha@host:1883"),  # no password: unchanged
        ("mqtt://host:1883", "mqtt://host:1883"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"ha:{SECRET}@host:1883",  # no scheme
        f"http://ha:{SECRET}@host",
        f"mqtt://ha:{SECRET}@host:99999",
        f"mqtt://ha:{SECRET}@host:1883/path",
        f"mqtt://ha:{SECRET}#x@host",  # a # the URL parser takes for a fragment
    ],
)
def test_bad_url_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker_url(url)
    assert SECRET not in str(info.value)
    assert "***" in str(info.value)


def test_bus_logs_and_errors_never_show_the_password(caplog: pytest.LogCaptureFixture) -> None:
    """A bus that cannot reach either broker of its list: every log line and the error name
    the brokers without their passwords."""
    urls = [f"mqtt://node:{SECRET}@127.0.0.1:{free_port()}" for _ in range(2)]
    bus = Bus(urls, "redaction-test", failover_after_s=0.1)
    caplog.set_level(logging.DEBUG, logger="nsync_mqtt")
    with pytest.raises(BrokerError) as info:
        asyncio.run(bus.start(timeout_s=0.6))
    assert "node:***@127.0.0.1" in str(info.value)
    assert SECRET not in str(info.value)
    assert "node:***@" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in repr(bus.url) and SECRET not in str(bus.url)


# --- $NSYNC_BROKER -----------------------------------------------------------------------------


def test_broker_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert broker_from_env() is None
    monkeypatch.setenv(BROKER_ENV, "  ")
    assert broker_from_env() is None
    monkeypatch.setenv(BROKER_ENV, "mqtt://a:pw@h:1883")
    assert broker_from_env() == "mqtt://a:pw@h:1883"


def run_node_config(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, NodeConfig | None, str]:
    """`nsync node ARGV` up to the point where the node would start: its exit code, the
    config it would run with, and stderr."""
    seen: list[NodeConfig] = []

    def fake_run_node(cfg: NodeConfig) -> int:
        seen.append(cfg)
        return 0

    monkeypatch.setattr("nsync_mqtt.node.run_node", fake_run_node)
    monkeypatch.setattr(cli, "_setup_logging", lambda verbose: None)
    code = cli.main(["node", "--id", "a", "--peers", "a", *argv])
    return code, (seen[0] if seen else None), capsys.readouterr().err


def test_node_takes_the_broker_list_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env_urls = f"mqtt://a:{SECRET}@one:1883, mqtt://a:{SECRET}@two:1883"
    monkeypatch.setenv(BROKER_ENV, env_urls)
    code, cfg, _ = run_node_config(monkeypatch, [], capsys)
    assert code == 0 and cfg is not None
    assert cfg.broker == (f"mqtt://a:{SECRET}@one:1883", f"mqtt://a:{SECRET}@two:1883")
    # the environment wins over the config file; --broker wins over both
    yaml = tmp_path / "node.yaml"
    yaml.write_text("broker: [mqtt://from-yaml:1883]\n")
    _, cfg, _ = run_node_config(monkeypatch, ["--config", str(yaml)], capsys)
    assert cfg is not None and cfg.broker[0].endswith("@one:1883")
    _, cfg, _ = run_node_config(monkeypatch, ["--broker", "mqtt://flag:1883"], capsys)
    assert cfg is not None and cfg.broker == ("mqtt://flag:1883",)
    monkeypatch.delenv(BROKER_ENV)
    _, cfg, _ = run_node_config(monkeypatch, ["--config", str(yaml)], capsys)
    assert cfg is not None and cfg.broker == ("mqtt://from-yaml:1883",)


def test_a_bad_broker_in_the_environment_is_a_config_error_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(BROKER_ENV, f"a:{SECRET}@host:1883")  # the scheme forgotten
    code, cfg, err = run_node_config(monkeypatch, [], capsys)
    assert code == 2 and cfg is None
    assert err.startswith("nsync: config error: broker:") and "a:***@host" in err
    assert SECRET not in err


class FakeClient:
    """Stands in for NSyncClient in `nsync COMMAND`: records how it was made."""

    made: ClassVar[list[tuple[Any, ...]]] = []

    def __init__(self, broker: str, cluster: str, timeout: float, ca_file: Any = None) -> None:
        parse_broker_url(broker)
        FakeClient.made.append((broker, cluster, ca_file))

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def request(self, verb: str) -> dict[str, Any]:
        return {"success": True, "command": verb, "params": {}, "msg": "ok", "client_req_id": 1}


def run_client(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, tuple[Any, ...] | None, str]:
    FakeClient.made = []
    monkeypatch.setattr("nsync_mqtt.client.NSyncClient", FakeClient)
    code = cli.main(argv)
    return code, (FakeClient.made[0] if FakeClient.made else None), capsys.readouterr().err


def test_client_commands_take_the_broker_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ca_file: Path
) -> None:
    code, made, _ = run_client(monkeypatch, ["status"], capsys)
    assert code == 0 and made == ("mqtt://127.0.0.1:1883", "home", None)
    url = f"mqtts://phone:{SECRET}@broker.lan:8883"
    monkeypatch.setenv(BROKER_ENV, f"{url},mqtts://phone:{SECRET}@other.lan")
    code, made, _ = run_client(monkeypatch, ["--ca-file", str(ca_file), "play"], capsys)
    assert code == 0 and made == (url, "home", ca_file)  # the first of a list
    code, made, _ = run_client(monkeypatch, ["--broker", "mqtt://flag:1883", "pause"], capsys)
    assert code == 0 and made is not None and made[0] == "mqtt://flag:1883"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ca-file", "/nonexistent/ca.crt"], "ca_file: cannot read /nonexistent/ca.crt"),
        (["--ca-file", "{junk}"], "holds no usable PEM CA certificate"),
        (["--broker", "mqtt://h:1883", "--ca-file", "{ca}"], "no broker URL is mqtts://"),
    ],
)
def test_client_ca_file_errors_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ca_file: Path,
    tmp_path: Path,
    argv: list[str],
    message: str,
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    monkeypatch.setenv(BROKER_ENV, "mqtts://broker.lan")
    argv = [a.format(junk=junk, ca=ca_file) for a in argv]
    code, made, err = run_client(monkeypatch, [*argv, "status"], capsys)
    assert code == 2 and made is None
    assert message in err, err


# --- ca_file -----------------------------------------------------------------------------------


def test_ca_file_in_the_config(tmp_path: Path, ca_file: Path) -> None:
    tls = {"id": "a", "broker": "mqtts://broker.lan:8883"}
    assert load_node_config(None, tls).ca_file is None
    assert load_node_config(None, {**tls, "ca_file": str(ca_file)}).ca_file == ca_file
    yaml = tmp_path / "node.yaml"
    yaml.write_text(f"id: a\nbroker: [mqtts://broker.lan]\nca_file: {ca_file}\n")
    assert load_node_config(str(yaml), {}).ca_file == ca_file


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/nonexistent/ca.crt", "ca_file: cannot read /nonexistent/ca.crt: No such file"),
        ("{dir}", "ca_file: cannot read"),
        ("{junk}", "ca_file: {junk} holds no usable PEM CA certificate"),
        (["a.crt"], "ca_file: must be a file path"),
    ],
)
def test_ca_file_that_cannot_be_used_is_a_config_error(
    tmp_path: Path, value: Any, message: str
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    if isinstance(value, str):
        value = value.format(dir=tmp_path, junk=junk)
    overrides = {"id": "a", "broker": "mqtts://broker.lan", "ca_file": value}
    with pytest.raises(ConfigError, match="^" + re.escape(message.format(junk=junk))):
        load_node_config(None, overrides)


def test_ca_file_without_tls_is_a_config_error(ca_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"^ca_file: given, but no broker URL is mqtts://"):
        load_node_config(None, {"id": "a", "ca_file": str(ca_file)})


def test_a_tls_client_trusts_the_ca_file(ca_file: Path) -> None:
    """With ca_file, the TLS context holds exactly that CA (not the system's)."""
    url = parse_broker_url("mqtts://broker.lan")
    client = new_paho_client("ca-test", url, ca_file)
    context = client._ssl_context  # paho keeps it there; no public accessor
    assert context is not None
    subjects = [dict(x[0] for x in c["subject"]) for c in context.get_ca_certs()]
    assert subjects == [{"commonName": "NSync unit-test CA"}]
    assert context.check_hostname
