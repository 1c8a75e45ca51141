"""Home Assistant MQTT discovery from a real cluster, on amqtt and Mosquitto: the master
publishes the retained device document, publishes it again when Home Assistant announces
``homeassistant/status online``, and a node configured with ``ha_discovery: false`` publishes
none. (Home Assistant's own checks of the document are in tests/homeassistant.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nsync_lab.testing import (
    NodeCluster,
    RawClient,
    ok,
    ready_cluster,
    tone_file,
    unique_cluster_name,
    wait_for,
)
from nsync_mqtt.bus import parse_broker_url
from nsync_mqtt.client import NSyncClient

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


def _sub_once(url: str, topic: str) -> str:
    """What ``mosquitto_sub -C 1`` prints for ``topic`` (a dashboard widget's first value)."""
    u = parse_broker_url(url)
    cmd = ["mosquitto_sub", "-h", u.host, "-p", str(u.port), "-C", "1", "-W", "5", "-t", topic]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout.strip()


def _pub(url: str, topic: str, payload: str) -> None:
    u = parse_broker_url(url)
    cmd = ["mosquitto_pub", "-h", u.host, "-p", str(u.port), "-t", topic, "-m", payload]
    subprocess.run(cmd, check=True, timeout=10)


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients missing")
def test_phone_dashboard_widgets_as_the_readme_gives_them(
    cluster: NodeCluster, client: NSyncClient, tmp_path: Path
) -> None:
    """README "Phone dashboard": buttons publish any payload to cmd/<verb>, the volume slider
    its value (a float too) to cmd/volume, and text widgets read the retained state/<field>."""
    url, base = cluster.broker_url, f"nsync/{cluster.cluster}"
    ok(client.enqueue_song(tone_file(tmp_path, "Dashboard Tone", 6.0, 523.0)))
    _pub(url, f"{base}/cmd/volume", "35.0")
    wait_for(lambda: _sub_once(url, f"{base}/state/volume") == "35", 10, "the slider's volume")
    _pub(url, f"{base}/cmd/play", "1")  # a button that sends "1"
    wait_for(lambda: _sub_once(url, f"{base}/state/playback") == "playing", 10, "playing")
    assert _sub_once(url, f"{base}/state/title") == "Dashboard Tone"
    _pub(url, f"{base}/cmd/pause", "")
    wait_for(lambda: _sub_once(url, f"{base}/state/playback") == "paused", 10, "paused")
