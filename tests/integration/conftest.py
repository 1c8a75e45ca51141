"""Fixtures for integration tests: real MQTT brokers on loopback.

- ``amqtt_broker`` / ``mosquitto_broker``: one broker process per test session.
- ``broker_url``: parametrized over both brokers, yields ``mqtt://127.0.0.1:PORT``.
- ``broker_factory``: starts private broker processes a test may kill and restart;
  ``broker_kind`` parametrizes a test over the kinds it can start.
- ``unused_port``: a loopback port nothing listens on (from ``free_port()``).
Tests sharing a session broker use topics of their own (see ``unique_topic``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_CONF = REPO / "config" / "mosquitto-test.conf"
BROKER_START_TIMEOUT_S = 10.0

requires_mosquitto = pytest.mark.skipif(
    not MOSQUITTO.exists(), reason=f"mosquitto not installed ({MOSQUITTO} missing)"
)
BROKER_KINDS = ["amqtt", pytest.param("mosquitto", marks=requires_mosquitto)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class BrokerProcess:
    """A broker subprocess on a fixed loopback port, which can be killed and started again."""

    def __init__(self, kind: str, port: int, workdir: Path) -> None:
        self.kind = kind
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / f"{kind}-{port}.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        if self.kind == "amqtt":
            code = (
                "import sys; from nsync_mqtt.broker_embed import run_broker; "
                f"sys.exit(run_broker('127.0.0.1', {self.port}, None))"
            )
            return [sys.executable, "-c", code]
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        text = MOSQUITTO_CONF.read_text().replace(
            "listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1"
        )
        assert f"listener {self.port} 127.0.0.1" in text
        conf.write_text(text)
        return [str(MOSQUITTO), "-c", str(conf)]

    def start(self) -> None:
        assert self.proc is None, "broker already running"
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                self._command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not port_open(self.port):
            if self.proc.poll() is not None:
                output = self._log.read_text(errors="replace")
                self.proc = None
                pytest.fail(f"{self.kind} broker exited at start:\n{output}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.kind} broker did not listen on {self.port} in time")
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill the broker abruptly (SIGKILL), as a crash would."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
            self.proc = None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def _broker_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("brokers")


def _session_broker(kind: str, workdir: Path) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(kind, free_port(), workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def amqtt_broker(_broker_workdir: Path) -> Iterator[BrokerProcess]:
    yield from _session_broker("amqtt", _broker_workdir)


@pytest.fixture(scope="session")
def mosquitto_broker(_broker_workdir: Path) -> Iterator[BrokerProcess]:
    if not MOSQUITTO.exists():
        pytest.skip(f"mosquitto not installed ({MOSQUITTO} missing)")
    yield from _session_broker("mosquitto", _broker_workdir)


@pytest.fixture(params=BROKER_KINDS)
def broker_url(request: pytest.FixtureRequest) -> str:
    """``mqtt://127.0.0.1:PORT`` of a running session broker, once per broker kind."""
    broker: BrokerProcess = request.getfixturevalue(f"{request.param}_broker")
    return broker.url


@pytest.fixture(params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """``"amqtt"`` or ``"mosquitto"``, for tests that start private brokers with broker_factory."""
    return str(request.param)


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def broker_factory(_broker_workdir: Path) -> Iterator[Callable[[str], BrokerProcess]]:
    """Start private brokers by kind (``"amqtt"``/``"mosquitto"``); all stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(kind: str) -> BrokerProcess:
        broker = BrokerProcess(kind, free_port(), _broker_workdir)
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def unique_topic() -> str:
    """A topic prefix no other test uses, so tests can share a broker."""
    return f"test/{os.getpid()}/{uuid.uuid4().hex[:12]}"
