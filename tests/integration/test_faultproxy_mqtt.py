"""A paho client talks to a real Mosquitto through FaultProxy, loses the link on cut() and
gets it back after heal()."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from nsync_lab.faultproxy import FaultProxy
from nsync_lab.testing import MOSQUITTO, BrokerProcess
from nsync_mqtt.bus import BrokerURL, new_paho_client

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MOSQUITTO.exists(), reason=f"mosquitto not installed ({MOSQUITTO})"),
]

TIMEOUT_S = 5.0


def test_pubsub_through_proxy_survives_cut_and_heal(
    broker_factory: Callable[[str], BrokerProcess], unique_topic: str
) -> None:
    broker = broker_factory("mosquitto")
    topic = f"{unique_topic}/fp"
    subscribed = threading.Event()
    disconnected = threading.Event()
    received: queue.Queue[bytes] = queue.Queue()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(topic, qos=1)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        subscribed.set()

    def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        disconnected.set()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received.put(msg.payload)

    with FaultProxy("127.0.0.1", broker.port) as proxy:
        client = new_paho_client(f"fp-{uuid.uuid4().hex[:8]}", BrokerURL("127.0.0.1", proxy.port))
        client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.connect_async("127.0.0.1", proxy.port, keepalive=30)
        client.loop_start()
        try:
            assert subscribed.wait(TIMEOUT_S), "no subscription through the proxy"
            assert proxy.connections == 1
            client.publish(topic, b"before", qos=1)
            assert received.get(timeout=TIMEOUT_S) == b"before"

            subscribed.clear()
            proxy.cut()
            assert disconnected.wait(TIMEOUT_S), "on_disconnect did not fire after cut()"
            assert proxy.connections == 0
            assert not subscribed.is_set()  # reconnect attempts are refused while cut

            proxy.heal()
            assert subscribed.wait(TIMEOUT_S), "no reconnect after heal()"
            client.publish(topic, b"after", qos=1)
            assert received.get(timeout=TIMEOUT_S) == b"after"
        finally:
            client.disconnect()
            client.loop_stop()
