"""Nodes started before their broker (a box that boots before the broker's box, a household
Mosquitto restarting) keep trying, say so in their log, and join once the broker answers."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from nsync_lab.testing import (
    BrokerProcess,
    NodeCluster,
    free_port,
    ok,
    unique_cluster_name,
    wait_for,
)

pytestmark = pytest.mark.integration

OLD_GIVE_UP_S = 10.0  # nodes used to exit after this long without a broker


def test_nodes_started_before_the_broker_wait_for_it_and_join(
    broker_kind: str, tmp_path: Path
) -> None:
    port = free_port()
    broker = BrokerProcess(broker_kind, port, tmp_path)
    cluster = NodeCluster.of(
        f"mqtt://127.0.0.1:{port}", tmp_path / "c", 3, cluster=unique_cluster_name()
    )
    try:
        cluster.start()
        time.sleep(OLD_GIVE_UP_S + 1.0)
        assert cluster.alive() == ["n1", "n2", "n3"], cluster.logs_tail()
        for node in ("n1", "n2", "n3"):
            text = cluster.node_log(node).read_text()
            assert "no MQTT broker after 5 s" in text, text
            assert "no MQTT broker after 10 s" in text, text
            assert "still trying" in text, text
        broker.start()
        cluster.wait_ready(timeout_s=30.0)
        with cluster.client(timeout=5.0) as client:
            ok(client.status())
            ok(client.volume(40))
    finally:
        codes = cluster.stop()
        broker.stop()
    assert codes == {"n1": 0, "n2": 0, "n3": 0}, cluster.logs_tail()


def test_a_node_waiting_for_its_broker_stops_cleanly_when_told(tmp_path: Path) -> None:
    cluster = NodeCluster.of(f"mqtt://127.0.0.1:{free_port()}", tmp_path, 1)
    cluster.start()
    try:
        wait_for(
            lambda: "connecting to" in cluster.node_log("n1").read_text(),
            20.0,
            "the node to start connecting",
        )
        started = time.monotonic()
        code = cluster.stop_node("n1", signal.SIGTERM, timeout_s=5.0)
        assert code == 0, cluster.logs_tail()
        assert time.monotonic() - started < 5.0
    finally:
        cluster.stop()
