"""Fixtures for integration tests: real MQTT brokers and real node clusters on loopback.

- ``amqtt_broker`` / ``mosquitto_broker``: one broker process per test session.
- ``broker_url``: parametrized over both brokers, yields ``mqtt://127.0.0.1:PORT``.
- ``broker_factory``: starts private broker processes a test may kill and restart;
  ``broker_kind`` parametrizes a test over the kinds it can start.
- ``unused_port``: a loopback port nothing listens on (from ``free_port()``).
- ``cluster_kind``, ``cluster``, ``client``, ``watcher``: one 3-node cluster per test module and
  broker kind, with a command client and a watcher of its retained topics. A module that needs
  a differently set up cluster defines its own ``cluster`` (and ``client``).
Tests sharing a session broker use topics of their own (see ``unique_topic``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nsync_lab.testing import (
    MOSQUITTO,
    BrokerProcess,
    NodeCluster,
    Watcher,
    free_port,
    ready_cluster,
    unique_cluster_name,
)
from nsync_mqtt.client import NSyncClient

requires_mosquitto = pytest.mark.skipif(
    not MOSQUITTO.exists(), reason=f"mosquitto not installed ({MOSQUITTO} missing)"
)
BROKER_KINDS = ["amqtt", pytest.param("mosquitto", marks=requires_mosquitto)]


def start_broker(broker: BrokerProcess) -> BrokerProcess:
    """Start ``broker``, failing the test (with the broker's log) if it does not come up."""
    try:
        return broker.start()
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="session")
def _broker_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("brokers")


def _session_broker(kind: str, workdir: Path) -> Iterator[BrokerProcess]:
    broker = start_broker(BrokerProcess(kind, free_port(), workdir))
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
        return start_broker(broker)

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def unique_topic() -> str:
    """A topic prefix no other test uses, so tests can share a broker."""
    return f"test/{os.getpid()}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module", params=BROKER_KINDS)
def cluster_kind(request: pytest.FixtureRequest) -> str:
    """The broker kind the module's clusters run on: ``"amqtt"`` or ``"mosquitto"``."""
    return str(request.param)


@pytest.fixture(scope="module")
def cluster(
    cluster_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeCluster]:
    """Nodes n1-n3 on the session broker of ``cluster_kind``: songs up to 2 MB and 1 minute,
    a stalled upload given up after 1 s. Every node must exit cleanly at the end."""
    broker: BrokerProcess = request.getfixturevalue(f"{cluster_kind}_broker")
    nodes = NodeCluster.of(
        broker.url,
        tmp_path_factory.mktemp("cluster"),
        3,
        cluster=unique_cluster_name(),
        timing={"upload_idle_timeout_s": 1.0},
        settings={"max_song_mb": 2, "max_song_minutes": 1},
    )
    with ready_cluster(nodes) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: NodeCluster) -> Iterator[NSyncClient]:
    with contextlib.closing(cluster.client(timeout=5.0)) as c:
        yield c


@pytest.fixture(scope="module")
def watcher(cluster: NodeCluster) -> Iterator[Watcher]:
    with cluster.watch() as w:
        yield w
