"""Home Assistant MQTT discovery from a real cluster, on amqtt and Mosquitto: the master
publishes the retained device document, publishes it again when Home Assistant announces
``homeassistant/status online``, and a node configured with ``ha_discovery: false`` publishes
none. (Home Assistant's own checks of the document are in tests/homeassistant.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nsync_lab.testing import NodeCluster, RawClient, ready_cluster, unique_cluster_name

pytestmark = pytest.mark.integration


def test_the_master_announces_the_cluster_and_again_when_home_assistant_restarts(
    cluster: NodeCluster,
) -> None:
    topic = f"homeassistant/device/nsync_{cluster.cluster}/config"
    with RawClient(cluster.broker_url, cluster.cluster, [topic]) as raw:
        msg = raw.wait(lambda m: m.topic == topic and bool(m.payload), "the retained document")
        assert msg.retain
        doc = json.loads(msg.payload)
        assert doc["device"]["identifiers"] == [f"nsync_{cluster.cluster}"]
        cmps = doc["components"]
        base = f"nsync/{cluster.cluster}"
        uid = f"nsync_{cluster.cluster}"
        assert cmps[f"{uid}_play"]["command_topic"] == f"{base}/cmd/play"
        assert cmps[f"{uid}_volume"]["state_topic"] == f"{base}/state/volume"
        for node in cluster.specs:
            assert cmps[f"{uid}_{node}_online"]["state_topic"] == f"{base}/node/{node}/status"

        since = raw.mark()
        raw.publish("homeassistant/status", "online")  # Home Assistant (re)started
        again = raw.wait(lambda m: m.topic == topic, "the document again", since)
        assert not again.retain and json.loads(again.payload) == doc


def test_discovery_can_be_switched_off(broker_url: str, tmp_path: Path) -> None:
    name = unique_cluster_name()
    topic = f"homeassistant/device/nsync_{name}/config"
    nodes = NodeCluster.of(broker_url, tmp_path, 1, cluster=name, settings={"ha_discovery": False})
    with ready_cluster(nodes), RawClient(broker_url, name, [topic, f"nsync/{name}/status"]) as raw:
        raw.wait(lambda m: m.payload == b"online", "the master online")
        raw.publish("homeassistant/status", "online")
        time.sleep(1.0)  # what would have come within a few milliseconds
        assert [m for m in raw.messages if m.topic == topic] == []
